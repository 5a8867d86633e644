"""The calibration set of the calibrated schemes (GPTQ, AWQ, static INT8), the sensitivity scan and the
calibration curve: the serving request log when `calibrate.source` allows it and the log holds prompt
text, otherwise the project's calibration prompts. Either way it must be non-empty and disjoint from
the held-out prompts. `request_log_rows` reads the log for the distill phase too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from costopt.params import Params, ParamsError
from costopt.quantization.schemes import Calibration
from costopt.storage.layout import Workspace

_log = logging.getLogger("costopt.calibset")


def request_log_rows(path: Path) -> list[dict[str, Any]]:
    """Prompts from a serving request log: JSONL rows with a "prompt" text or chat "messages". A corrupt or
    truncated line (a crash mid-write) is skipped, and the count logged with the first such line: the log
    is production data the continuous DAG re-optimizes on, and one bad line must not stop that run."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"line {n}: not JSON ({exc.msg})")
                continue
            if not isinstance(rec, dict):
                bad.append(f"line {n}: not a JSON object")
                continue
            if isinstance(rec.get("messages"), list):
                rows.append({"id": f"log{n}", "messages": rec["messages"]})
            elif isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                rows.append({"id": f"log{n}", "messages": [{"role": "user", "content": rec["prompt"]}]})
    if bad:
        _log.warning("calibrate.logs: %s: skipped %d corrupt line(s), the first %s", path, len(bad), bad[0])
    return rows


def calibration_rows(params: Params, ws: Workspace, samples: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """(calibration conversations, source): the first `samples` (default calibrate.samples), checked
    non-empty and disjoint from both held-out prompt sets."""
    from costopt.evaluation.evaldata import check_disjoint
    from costopt.evaluation.reference import read_jsonl

    cfg = params.calibrate
    logs = (ws.root / cfg.logs) if cfg.logs else None
    rows, source = [], "prompts"
    if cfg.source in ("auto", "logs") and logs is not None and logs.is_file():
        rows, source = request_log_rows(logs), "logs"
    if cfg.source == "logs" and not rows:
        raise ParamsError(f"calibrate.source: 'logs' but {logs} is missing or holds no prompt text "
                          "(serving writes prompts only where configured)")
    if not rows:
        rows, source = read_jsonl(ws.data_dir / "calibration.jsonl"), "prompts"
    want = samples or cfg.samples
    rows = rows[-want:] if source == "logs" else rows[:want]  # logs: the latest traffic
    if not rows:
        raise ParamsError(f"calibrate: the calibration set from {source} is empty; expected at least one prompt")
    held = read_jsonl(ws.data_dir / "prompts.jsonl")
    if (ws.data_dir / "crosscheck.jsonl").is_file():  # the second held-out set (evaldata generator 3 on)
        held += read_jsonl(ws.data_dir / "crosscheck.jsonl")
    try:
        check_disjoint(held, rows)
    except ValueError as exc:
        raise ParamsError(f"calibrate ({source}): {exc}") from exc
    return rows, source


def calibration_set(params: Params, ws: Workspace, tok: Any, samples: int | None = None) -> Calibration:
    """The tokenized calibration set (first `samples` rows, default calibrate.samples)."""
    from costopt.quantization.capture import encode
    from costopt.evaluation.reference import prompt_texts

    rows, source = calibration_rows(params, ws, samples)
    texts = prompt_texts(tok, rows)  # chat template + the fp32 answer where evaldata made one
    # Every position counts, the system block every request shares included: its first tokens carry
    # the model's massive activations (attention sinks), and leaving them out of the statistics made
    # GPTQ's KL 4x worse on the built-in model (measured: 0.58 vs 0.15 nats/token).
    return Calibration(encode(tok, texts, params.calibrate.max_seq_len, batch=16), source)
