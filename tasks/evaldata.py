"""Phase 1b, evaldata: build the held-out prompts, crosscheck questions, perplexity texts, calibration set
and task set.

Run it as `python -m tasks.evaldata`. The sets come from `costopt.evaluation.evaldata` (a pure function of
the seed and counts); each prompt of both held-out sets (prompts, crosscheck) and of the calibration set
also gets `reference`, the fp32 model's greedy answer, so teacher-forced metrics see answer positions.
Files go to a staging folder that is swapped in whole, so a crash never leaves a half-written set; a
second run with the same seed, counts and model fingerprint finds the files intact and returns at once.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from costopt.evaluation.evaldata import GENERATOR_VERSION, build_sets, to_jsonl
from costopt.storage.layout import Workspace, read_json, replace_dir, staging_dir, write_json
from costopt.models.source import ModelSourceError, load_model_dir
from costopt.params import EvalDataParams, Params
from costopt.evaluation.taskscore import chance_accuracy

FILES = {"prompts": "prompts.jsonl", "crosscheck": "crosscheck.jsonl", "ppl": "ppl.jsonl",
         "calibration": "calibration.jsonl", "tasks": "tasks.jsonl"}
MANIFEST = "manifest.json"
REFERENCE_DECODER = "engine-1"  # greedy references from costopt's engine (was: left-padded HF generate)


def model_fingerprint(ws: Workspace) -> str:
    path = ws.model_dir / "fingerprint.json"
    if not path.is_file():
        raise ModelSourceError(f"{path}: missing; run the ingest phase first (python -m tasks.ingest)")
    return read_json(path)["fingerprint"]


def _counts(p: EvalDataParams) -> dict[str, int]:
    return {"prompts": p.prompts, "crosscheck": p.crosscheck, "ppl_texts": p.ppl_texts,
            "calibration": p.calibration, "task_items": p.task_items}


def _identity(p: EvalDataParams, fingerprint: str) -> dict[str, Any]:
    """What the data depends on; a manifest that records the same identity describes the same files."""
    return {"seed": p.seed, "counts": _counts(p), "reference_tokens": p.reference_tokens,
            "model_fingerprint": fingerprint, "generator_version": GENERATOR_VERSION,
            "reference_decoder": REFERENCE_DECODER}


def cached_manifest(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it records `identity` and every file still has its recorded sha256."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_json(out / MANIFEST)
    if any(manifest.get(k) != v for k, v in identity.items()):
        return None
    files = manifest.get("files", {})
    if set(files) != set(FILES.values()):
        return None
    for name, digest in files.items():
        path = out / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return None
    return manifest


def _write_sets(stage: Path, sets: dict[str, list[dict]]) -> dict[str, str]:
    """Write each set as JSONL; return {file name: sha256}."""
    digests = {}
    for key, name in FILES.items():
        data = to_jsonl(sets[key])
        (stage / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def evaldata(params: Params, ws: Workspace) -> dict[str, Any]:
    """Build artifacts/data/ for `params.evaldata` and the ingested model; return path, counts, cached."""
    p = params.evaldata
    out = ws.data_dir
    identity = _identity(p, model_fingerprint(ws))
    if (manifest := cached_manifest(out, identity)) is not None:
        return {"path": str(out), "counts": manifest["counts"], "cached": True,
                "chance_accuracy": manifest["chance_accuracy"]}
    from costopt.runtimes.engine import greedy_answers

    sets = build_sets(p)  # before the model loads: bad counts fail in milliseconds
    model, tok = load_model_dir(ws.model_dir)
    # Held-out prompts and calibration prompts both get the fp32 model's greedy answer: teacher-forced
    # metrics then see answer positions, and calibration sees the text a served model reads back while
    # it decodes (prompts alone are ~20 tokens each: too few rows for GPTQ/AWQ statistics).
    for key in ("prompts", "crosscheck", "calibration"):
        refs = greedy_answers(model, tok, [r["messages"] for r in sets[key]], p.reference_tokens,
                              desc="reference answers")
        sets[key] = [{**row, "reference": ref} for row, ref in zip(sets[key], refs)]
    families: dict[str, int] = {}
    for item in sets["tasks"]:
        families[item["family"]] = families.get(item["family"], 0) + 1
    stage = staging_dir(out)
    try:
        manifest = {"seed": p.seed, "counts": _counts(p), "files": _write_sets(stage, sets),
                    "chance_accuracy": chance_accuracy(sets["tasks"]), **identity,
                    "task_families": families}
        write_json(stage / MANIFEST, manifest)
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # the earlier good set stays in place
        raise
    return {"path": str(out), "counts": manifest["counts"], "cached": False,
            "chance_accuracy": manifest["chance_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], evaldata, argv)


if __name__ == "__main__":
    raise SystemExit(main())
