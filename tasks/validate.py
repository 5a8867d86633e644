"""Phase 5, validate: one variant against the stored fp32 reference, then its quality gates.

Run it as `python -m tasks.validate [--variant NAME]` (all of quantize.variants without the flag);
the DAG maps it over the variants. Metrics (costopt.evaluation.metrics), each with a 95% bootstrap CI:
- KL mean and p99, top-1 agreement: teacher-forced over held-out chat prompts followed by the fp32
  model's own answer, at every real (non-pad) position after the prefix all prompts share (the chat
  template's system block); fp32 is read from artifacts/reference (tasks.reference);
- perplexity ratio on held-out passages;
- task accuracy and retention on the labeled multiple-choice set (log-likelihood scoring).
The Great Expectations suite in `tasks.gates` decides the gates. Each variant's result is written to
artifacts/quality/variants/<name>.json (its Data Docs next to it), so variants validate independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from costopt.storage.layout import Workspace, write_json
from costopt.evaluation.metrics import Reference, accuracy_and_retention, mean_over_units, ppl_ratio, quantile_over_units, token_nll
from costopt.params import Params
from costopt.models.variants import load_variant_model
from costopt.evaluation.reference import Ref, batches, load_reference, logits, read_jsonl, task_correct


@dataclass
class Tally:
    """Per-sequence accumulators for one variant."""
    kl_sum: list[float] = field(default_factory=list)
    kl_tokens: list[np.ndarray] = field(default_factory=list)
    top1_sum: list[float] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    nll_sum: list[float] = field(default_factory=list)
    nll_count: list[float] = field(default_factory=list)


def compare_prompts(model: Any, ref: Ref, tally: Tally, limit: int | None = None) -> None:
    """KL and top-1 against the stored fp32 reference at every real position past the shared prefix."""
    row = 0
    encs = list(batches(ref.tok, ref.texts[:limit] if limit else ref.texts, ref.max_len))
    for enc in tqdm(encs, desc="validate prompts", unit="batch", leave=False):
        mask = enc["attention_mask"].bool()  # [B, T]
        mask[:, :ref.skip] = False
        out = logits(model, enc)[mask]  # [N, V]
        n = out.shape[0]
        part = Reference(ref.logits(row, row + n))
        kl, top1 = part.kl(out).double(), part.top1_match(out)  # [N]
        lengths = mask.sum(dim=1).tolist()
        start = 0
        for length in lengths:
            tally.kl_sum.append(float(kl[start:start + length].sum()))
            tally.kl_tokens.append(kl[start:start + length].numpy())
            tally.top1_sum.append(float(top1[start:start + length].sum()))
            tally.count.append(float(length))
            start += length
        row += n
    if limit is None and row != ref.hidden.shape[0]:
        raise RuntimeError(f"reference has {ref.hidden.shape[0]} positions, this run {row}: "
                           "the reference is stale; rerun the reference phase")


def passage_nll(model: Any, ref: Ref, tally: Tally) -> None:
    for enc in tqdm(list(batches(ref.tok, ref.passages, ref.max_len)), desc="validate perplexity",
                    unit="batch", leave=False):
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        nll = token_nll(logits(model, enc)[:, :-1], ids[:, 1:])  # [B, T-1]
        valid = mask[:, 1:]
        for b in range(ids.shape[0]):
            tally.nll_sum.append(float(nll[b][valid[b]].sum()))
            tally.nll_count.append(float(valid[b].sum()))


def measure_quality(model: Any, ref: Ref, resamples: int) -> dict[str, Any]:
    """Every quality metric of `model` against the fp32 reference, as {"value", "ci95"} entries."""
    tally = Tally()
    compare_prompts(model, ref, tally)
    passage_nll(model, ref, tally)
    correct = task_correct(model, ref.tok, ref.items)
    est = {
        "kl_mean": mean_over_units(tally.kl_sum, tally.count, resamples),
        "kl_p99": quantile_over_units(tally.kl_tokens, 0.99, resamples),
        "top1_agreement": mean_over_units(tally.top1_sum, tally.count, resamples),
    }
    est["ppl_ratio"], _, _ = ppl_ratio(ref.nll_sum, tally.nll_sum, tally.nll_count, resamples)
    est["task_accuracy"], est["task_retention"] = accuracy_and_retention(ref.correct, correct, resamples)
    return {k: v.to_dict() for k, v in est.items()}


def gate_one(name: str, metrics: dict[str, Any], params: Params, docs_dir) -> dict[str, Any]:
    from tasks.gates import evaluate_gates

    verdicts = evaluate_gates({name: metrics}, params.validate.gates, docs_dir, run_name=name)
    return verdicts["variants"][name]


def validate_variant(params: Params, ws: Workspace, name: str) -> dict[str, Any]:
    """Measure one variant against the fp32 reference and gate it; write its quality file."""
    ref = load_reference(params, ws)
    model, _ = load_variant_model(ws, name)
    metrics = measure_quality(model, ref, params.validate.bootstrap)
    out = ws.quality_file(name)
    docs = out.with_suffix(".docs")
    verdict = gate_one(name, metrics, params, docs)
    write_json(out, {"name": name, "metrics": metrics, "gate": verdict,
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
