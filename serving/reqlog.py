"""The request log: one JSON line per request, so the pipeline can calibrate on real traffic.

Each line holds the time, tenant, variant, priority, a SHA-256 of the prompt, token counts, latency,
outcome and finish reason. The prompt itself (chat `messages` or completion `prompt`, the fields the
quantize phase's `calibrate.logs` reader takes) is written only when the server runs with
`--log_prompts`, since prompts may hold user data. Lines are appended by one lock-guarded writer and
flushed per line, so a crash loses at most the line being written.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any


def prompt_hash(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RequestLog:
    def __init__(self, path: Path | None, log_prompts: bool = False) -> None:
        self.path, self.log_prompts = path, log_prompts
        self._lock = threading.Lock()
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, *, tenant: str, variant: str, priority: str, prompt: Any, prompt_field: str,
              prompt_tokens: int, completion_tokens: int, latency_ms: float, outcome: str,
              finish_reason: str | None, status: int) -> None:
        if self._fh is None:
            return
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
               "tenant": tenant, "variant": variant, "priority": priority, "prompt_sha256": prompt_hash(prompt),
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "latency_ms": round(latency_ms, 2), "outcome": outcome, "finish_reason": finish_reason,
               "status": status}
        if self.log_prompts:
            rec[prompt_field] = prompt
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
