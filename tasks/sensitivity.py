"""Phase 3a, sensitivity: per-part KL of INT4/INT8 against fp32, and each part's measured kernel cost.

Run it as `python -m tasks.sensitivity`. Writes artifacts/sensitivity/sensitivity.json: the scan of
`costopt.search.sensitivity` on `search.sensitivity_prompts` calibration prompts (drawn with the evaldata
seed; never held-out prompts) and the per-part cost table of `costopt.search.costmodel`. The search phase
reads both to plan mixed-precision candidates. Skipped (an "enabled": false record) when
search.enabled is false; cached while the model and settings are unchanged.
"""
from __future__ import annotations

import random
from typing import Any

import torch

from costopt.storage.layout import Workspace, read_json, write_json
from costopt.models.source import load_model_dir
from costopt.params import Params


def sensitivity_batches(params: Params, ws: Workspace, tok: Any, seed: int) -> tuple[list, int]:
    """Tokenized sensitivity prompts (a seeded draw from the calibration set) and the shared-prefix length."""
    from costopt.quantization.capture import encode
    from costopt.quantization.calibset import calibration_rows
    from costopt.evaluation.reference import prompt_texts, shared_prefix_len

    rows, _ = calibration_rows(params, ws)
    rows = random.Random(seed).sample(rows, min(params.search.sensitivity_prompts, len(rows)))
    texts = prompt_texts(tok, rows)  # chat template + the fp32 answer where evaldata made one
    return encode(tok, texts, params.calibrate.max_seq_len, batch=8), shared_prefix_len(tok, texts)


def run_scan(params: Params, ws: Workspace, seed: int) -> dict[str, Any]:
    from costopt.search.sensitivity import sensitivity_scan

    torch.set_num_threads(params.benchmark.threads)
    model, tok = load_model_dir(ws.model_dir)
    batches, skip = sensitivity_batches(params, ws, tok, seed)
    cfg = params.search
    return sensitivity_scan(model, batches, skip, tuple(cfg.precisions), cfg.group_size)


def sensitivity(params: Params, ws: Workspace) -> dict[str, Any]:
    """Scan every part and time every kernel; write artifacts/sensitivity/sensitivity.json."""
    from costopt.search.costmodel import part_costs

    out = ws.sensitivity_dir / "sensitivity.json"
    if not params.search.enabled:
        write_json(out, {"enabled": False})
        return {"enabled": False}
    fp = read_json(ws.model_dir / "fingerprint.json")["fingerprint"]
    identity = {"model": fp, "search": params.section("search"), "calibrate": params.section("calibrate"),
                "seed": params.evaldata.seed, "format": 1}
    if out.is_file() and read_json(out).get("identity") == identity:
        return {"cached": True}
    scan = run_scan(params, ws, params.evaldata.seed)
    model, _ = load_model_dir(ws.model_dir)
    costs = part_costs(model, params.search.group_size, params.benchmark.threads)
    write_json(out, {"enabled": True, "identity": identity, "scan": scan, "costs": costs})
    from costopt.search.sensitivity import ranking
    return {"parts": len(scan["parts"]), "seconds": scan["seconds"],
            "most_sensitive": ranking(scan, params.search.precisions[0])[:5]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], sensitivity, argv)


if __name__ == "__main__":
    raise SystemExit(main())
