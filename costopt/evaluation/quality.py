"""Quality of a model against the stored fp32 reference: every gate metric with its 95% bootstrap CI.

The measurement the validate phase gates on (`tasks.validate`), shared by every phase that measures a
model the same way (the distilled student in `tasks.distill`, the calibration curve in
`tasks.calibcurve`):
- KL mean and p99, top-1 agreement: teacher-forced over held-out chat prompts followed by the fp32
  model's own answer, at every real (non-pad) position after the prefix all prompts share (the chat
  template's system block), on the first held-out set and (`measure_crosscheck`) on the crosscheck set;
- perplexity ratio on held-out passages;
- task accuracy and retention on the labeled multiple-choice set (log-likelihood scoring).
With gates, `measure_quality` stops as soon as a prompt gate fails for sure (`costopt.evaluation.sequential`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from costopt.evaluation.metrics import (Estimate, Reference, accuracy_and_retention, mean_over_units, ppl_ratio,
                                        quantile_over_units, token_nll)
from costopt.evaluation.reference import PromptSet, Ref, batches, logits, task_correct
from costopt.evaluation.sequential import (INTERIM_LEVEL, PROMPT_METRICS, Stop, failed_for_sure, fails, look_points,
                                           passed_for_sure)
from costopt.params import Gates


@dataclass
class Tally:
    """Per-sequence accumulators for one variant."""
    kl_sum: list[float] = field(default_factory=list)
    kl_tokens: list[np.ndarray] = field(default_factory=list)
    top1_sum: list[float] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    nll_sum: list[float] = field(default_factory=list)
    nll_count: list[float] = field(default_factory=list)


def compare_prompts(model: Any, ref: Ref, tally: Tally, limit: int | None = None,
                    stop_after: Callable[[int, int], bool] | None = None, prompts: PromptSet | None = None) -> None:
    """KL and top-1 against the stored fp32 reference at every real position past the shared prefix,
    over `prompts` (default: the first held-out set).

    `stop_after(done, total)` is asked after each batch (counts of batches); True ends the scoring there."""
    pset = prompts or ref.prompt_set()
    row = 0
    encs = list(batches(ref.tok, pset.texts[:limit] if limit else pset.texts, ref.max_len))
    for done, enc in enumerate(tqdm(encs, desc=f"validate {pset.name}", unit="batch", leave=False), 1):
        mask = enc["attention_mask"].bool()  # [B, T]
        mask[:, :pset.skip] = False
        out = logits(model, enc)[mask]  # [N, V]
        n = out.shape[0]
        part = Reference(ref.logits(row, row + n, pset))
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
        if stop_after is not None and done < len(encs) and stop_after(done, len(encs)):
            return
    if limit is None and row != pset.hidden.shape[0]:
        raise RuntimeError(f"reference has {pset.hidden.shape[0]} {pset.name} positions, this run {row}: "
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


def prompt_estimates(tally: Tally, resamples: int, level: float = 0.95) -> dict[str, Estimate]:
    return {"kl_mean": mean_over_units(tally.kl_sum, tally.count, resamples, level=level),
            "kl_p99": quantile_over_units(tally.kl_tokens, 0.99, resamples, level=level),
            "top1_agreement": mean_over_units(tally.top1_sum, tally.count, resamples, level=level)}


def _interim(tally: Tally, resamples: int, gates: Gates, total: int, stops: list[Stop],
             passes: list[dict[str, Any]], early_pass: bool) -> Callable[[int, int], bool]:
    """The interim look of costopt.evaluation.sequential: stop the prompts once a prompt gate fails at
    99.9% (`stops`), or, with `early_pass`, once every prompt gate passes at 99.9% (`passes`)."""
    def stop_after(done: int, batches_total: int) -> bool:
        if done not in look_points(batches_total):
            return False
        estimates = prompt_estimates(tally, resamples, INTERIM_LEVEL)
        for metric, est in estimates.items():
            if failed_for_sure(metric, est.lo, est.hi, gates):
                stops.append(Stop(metric, est.lo, est.hi, INTERIM_LEVEL, len(tally.count), total))
                return True
        if early_pass and all(passed_for_sure(m, e.lo, e.hi, gates) for m, e in estimates.items()):
            cis = ", ".join(f"{m} [{e.lo:.4g}, {e.hi:.4g}]" for m, e in estimates.items())
            passes.append({"stopped": True, "decided": "pass", "prompts": len(tally.count), "of": total,
                           "level": INTERIM_LEVEL,
                           "reason": f"prompt scoring stopped early: every prompt gate passes at 99.9% after "
                                     f"{len(tally.count)} of {total} prompts ({cis}); passages and task items "
                                     f"measured in full"})
            return True
        return False
    return stop_after


def measure_quality(model: Any, ref: Ref, resamples: int, gates: Gates | None = None,
                    early_pass: bool = True) -> dict[str, Any]:
    """Every quality metric of `model` against the fp32 reference, as {"value", "ci95"} entries.

    With `gates`, validation stops as soon as the verdict is decided fail (costopt.evaluation.sequential):
    the metrics not measured are None and `sequential` says where and why it stopped. With `early_pass`
    too, the prompt scoring also stops once every prompt gate has passed for sure."""
    tally, stops, passes = Tally(), [], []
    stop_after = (_interim(tally, resamples, gates, len(ref.texts), stops, passes, early_pass)
                  if gates is not None else None)
    compare_prompts(model, ref, tally, stop_after=stop_after)
    est = {k: v.to_dict() for k, v in prompt_estimates(tally, resamples).items()}
    failed = [m for m in PROMPT_METRICS if gates is not None and fails(m, est[m], gates)]
    if stops or failed:
        unmeasured = {"value": None, "ci95": None}
        why = (stops[0].to_dict(gates) if stops else
               {"stopped": True, "metric": failed[0], "prompts": len(tally.count), "of": len(ref.texts),
                "reason": f"stopped after the prompts: {failed[0]} fails its gate on the full prompt set, so "
                          "perplexity and tasks cannot change the verdict"})
        return {**est, "ppl_ratio": unmeasured, "task_accuracy": unmeasured, "task_retention": unmeasured,
                "sequential": why}
    passage_nll(model, ref, tally)
    correct = task_correct(model, ref.tok, ref.items)
    ppl, _, _ = ppl_ratio(ref.nll_sum, tally.nll_sum, tally.nll_count, resamples)
    accuracy, retention = accuracy_and_retention(ref.correct, correct, resamples)
    est.update({"ppl_ratio": ppl.to_dict(), "task_accuracy": accuracy.to_dict(),
                "task_retention": retention.to_dict()})
    if gates is not None:
        est["sequential"] = passes[0] if passes else {"stopped": False, "prompts": len(tally.count),
                                                      "of": len(ref.texts)}
    return est


def measure_crosscheck(model: Any, ref: Ref, resamples: int) -> dict[str, Any] | None:
    """KL mean and p99 and top-1 agreement on the second held-out set (short factual questions written
    unlike the calibration prompts), with 95% CIs; reported next to the first set, not gated."""
    if ref.crosscheck is None:
        return None
    tally = Tally()
    compare_prompts(model, ref, tally, prompts=ref.crosscheck)
    return {**{k: v.to_dict() for k, v in prompt_estimates(tally, resamples).items()},
            "prompts": len(tally.count), "tokens": int(sum(tally.count))}
