"""Phase 5, validate: one variant against the stored fp32 reference, then its quality gates.

Run it as `python -m tasks.validate [--variant NAME]` (all of quantize.variants without the flag);
the DAG maps it over the variants. Metrics (measured by costopt.evaluation.quality), each with a 95%
bootstrap CI:
- KL mean and p99, top-1 agreement: teacher-forced over held-out chat prompts followed by the fp32
  model's own answer, at every real (non-pad) position after the prefix all prompts share (the chat
  template's system block); fp32 is read from artifacts/reference (tasks.reference). The same three
  are measured on the crosscheck set (short factual questions written unlike the calibration prompts,
  costopt.evaluation.factual) for every variant, early-stopped ones included, and reported, not gated;
- perplexity ratio on held-out passages;
- task accuracy and retention on the labeled multiple-choice set (log-likelihood scoring).
The Great Expectations suite in `tasks.gates` decides the gates. Each variant's result is written to
artifacts/quality/variants/<name>.json (its Data Docs next to it), so variants validate independently.
"""
from __future__ import annotations

from typing import Any

from costopt.storage.layout import Workspace, write_json
from costopt.evaluation.quality import measure_crosscheck, measure_quality
from costopt.params import Params
from costopt.models.variants import read_failure, record_failure
from costopt.runtimes.registry import RuntimeFailure, load_scorer
from costopt.evaluation.reference import load_reference


def gate_one(name: str, metrics: dict[str, Any], params: Params, docs_dir) -> dict[str, Any]:
    from tasks.gates import evaluate_gates

    verdicts = evaluate_gates({name: metrics}, params.validate.gates, docs_dir, run_name=name)
    return verdicts["variants"][name]


def validate_variant(params: Params, ws: Workspace, name: str) -> dict[str, Any]:
    """Measure one variant against the fp32 reference and gate it; write its quality file."""
    failed = read_failure(ws, name)
    if failed:
        return {"name": name, "skipped": f"ruled out by {failed['phase']}: {failed['reason']}"}
    ref = load_reference(params, ws)
    try:
        model, _ = load_scorer(ws, name)
        metrics = measure_quality(model, ref, params.validate.bootstrap, params.validate.gates,
                                  params.validate.early_pass)
        crosscheck = measure_crosscheck(model, ref, params.validate.bootstrap)
    except RuntimeFailure as exc:  # e.g. non-finite logits from the runtime: never a silently wrong model
        return record_failure(ws, name, "validate", exc)
    out = ws.quality_file(name)
    docs = out.with_suffix(".docs")
    verdict = gate_one(name, metrics, params, docs)
    write_json(out, {"name": name, "metrics": metrics, "crosscheck": crosscheck, "gate": verdict,
                     "statistic": params.validate.gates.statistic,
                     "data_docs": str((docs / "index.html").relative_to(ws.root))})
    return {"name": name, "passed": verdict["passed"], "kl_mean": metrics["kl_mean"]["value"]}


def validate(params: Params, ws: Workspace) -> dict[str, Any]:
    """Validate every variant of quantize.variants (the DVC stage and the CLI without --variant)."""
    return {name: validate_variant(params, ws, name) for name in params.quantize.variants}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_variant_phase
    return run_variant_phase(__doc__.splitlines()[0], validate_variant, validate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
