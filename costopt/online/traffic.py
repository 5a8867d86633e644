"""Production traffic as the continuous-optimization DAG reads it: the request log and `/metrics`.

`read_log(path, last)` parses the predictor's JSONL request log (`serving/reqlog.py`): corrupt or
truncated lines (a crash mid-write, a disk that filled) are skipped and counted, never raised, so one
bad line cannot stop the nightly run. `prompt_texts` turns logged prompts (present with
`--log_prompts`) into the text the drift test embeds. `variant_stats` summarises each variant's
requests; `scrape_metrics` reads a server's Prometheus text into {sample: value}.
"""
from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED = ("variant", "latency_ms", "outcome")  # a line without these is not a request record


@dataclass
class TrafficLog:
    records: list[dict[str, Any]]
    lines: int  # lines read (blank ones excluded)
    skipped: int  # corrupt, truncated or not a request record
    skipped_examples: list[str] = field(default_factory=list)  # "line N: why", the first few


def read_log(path: Path, last: int | None = None) -> TrafficLog:
    """The request records of `path` (the newest `last` when given); a missing file reads as empty."""
    path = Path(path)
    out = TrafficLog([], 0, 0)
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            out.lines += 1
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and all(k in rec for k in REQUIRED) and \
                    isinstance(rec["latency_ms"], (int, float)) and math.isfinite(rec["latency_ms"])
            except ValueError:
                ok, rec = False, None
            if not ok:
                out.skipped += 1
                if len(out.skipped_examples) < 5:
                    out.skipped_examples.append(f"line {n}: " + ("not JSON (truncated or corrupt)" if rec is None
                                                                 else "not a request record"))
                continue
            out.records.append(rec)
    if last is not None and len(out.records) > last:
        out.records = out.records[-last:]
    return out


def prompt_texts(records: list[dict[str, Any]]) -> list[str]:
    """The logged prompt of each record that has one: a completion's text, or a chat's turns joined."""
    texts = []
    for rec in records:
        if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            texts.append(rec["prompt"])
        elif isinstance(rec.get("messages"), list):
            turns = [m.get("content") for m in rec["messages"] if isinstance(m, dict)]
            text = "\n".join(t for t in turns if isinstance(t, str))
            if text.strip():
                texts.append(text)
    return texts


def variant_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: requests, error share, latency p50/p95 (ms), mean completion tokens."""
    by: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for rec in records:
        by[str(rec["variant"])].append(rec)
    out = {}
    for name, recs in sorted(by.items()):
        lat = sorted(float(r["latency_ms"]) for r in recs)
        out[name] = {"requests": len(recs), "error_share": sum(r["outcome"] != "ok" for r in recs) / len(recs),
                     "latency_ms_p50": lat[len(lat) // 2], "latency_ms_p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
                     "completion_tokens_mean": sum(int(r.get("completion_tokens") or 0) for r in recs) / len(recs)}
    return out


def scrape_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}; comments and malformed lines are ignored."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out
