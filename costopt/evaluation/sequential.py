"""Quality gates as data, and the sequential rule that stops validating once a verdict is decided.

`GATES` lists each gate: the metric, the `validate.gates` threshold it is held to, and its direction.
`tasks.gates` runs them through Great Expectations; this module only decides *when enough is
measured*. Validation streams the held-out prompts in batches. At a few interim looks (a quarter,
half and three quarters of the prompts) each prompt metric's CI is recomputed at 99.9%; a gate whose
whole 99.9% interval lies on the failing side cannot pass with more data (Haybittle-Peto: interim
looks at a far stricter level leave the final 95% test's error rate essentially unchanged), so the
variant fails there and the rest of its prompts, passages and task items are skipped. After the last
prompt the prompt gates are final; if one fails under the configured statistic, the verdict is fail
whatever the other metrics say, so they are skipped too. Symmetrically, when at a look every prompt
metric's whole 99.9% interval lies on the passing side (`passed_for_sure`), more prompts cannot turn
those gates (`validate.early_pass`, on by default): prompt scoring stops there and the passages and
task items, whose gates are still open, are measured in full. The prompt metrics of such a variant
are then estimated on the prompts scored (at least a quarter of the set; the record says how many),
so their intervals are wider than a full pass would give.

Why our own rule rather than a library: the decision needs the same bootstrap CIs the gates use
(`costopt.evaluation.metrics`), at a few fixed looks; a general sequential-testing package would test
another statistic than the one the gate reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INTERIM_LEVEL = 0.999  # CI level of an interim look (Haybittle-Peto)
LOOKS = (0.25, 0.5, 0.75)  # shares of the held-out prompts at which an interim look is made
PROMPT_METRICS = ("kl_mean", "kl_p99", "top1_agreement")  # known once the prompts are scored


@dataclass(frozen=True)
class Gate:
    metric: str  # column of the gate table
    threshold: str  # field of `Gates`
    op: str  # "<=": the value must not exceed the threshold; ">=": must not fall below it
    unit: str  # printed after the measured value; "" for unitless ratios and shares
    meaning: str  # one line for the Data Docs page

    def bound(self, gates: Any) -> float:  # gates: costopt.params.Gates
        return float(getattr(gates, self.threshold))


GATES = (
    Gate("kl_mean", "kl_mean_max", "<=", "nats/token", "mean KL(fp32 || variant) over held-out tokens"),
    Gate("kl_p99", "kl_p99_max", "<=", "nats/token", "99th percentile of per-token KL(fp32 || variant)"),
    Gate("top1_agreement", "top1_agreement_min", ">=", "", "share of tokens whose argmax matches fp32's"),
    Gate("ppl_ratio", "ppl_ratio_max", "<=", "", "variant perplexity / fp32 perplexity on held-out text"),
    Gate("task_retention", "task_retention_min", ">=", "", "variant task accuracy / fp32 task accuracy"),
)


def _gate(metric: str) -> Gate:
    return next(g for g in GATES if g.metric == metric)


def failed_for_sure(metric: str, lo: float, hi: float, gates: Any) -> bool:
    """True when the whole interval [lo, hi] lies on the failing side of the metric's gate."""
    gate, bound = _gate(metric), _gate(metric).bound(gates)
    if math.isnan(lo) or math.isnan(hi):
        return False
    return lo > bound if gate.op == "<=" else hi < bound


def passed_for_sure(metric: str, lo: float, hi: float, gates: Any) -> bool:
    """True when the whole interval [lo, hi] lies on the passing side of the metric's gate."""
    gate, bound = _gate(metric), _gate(metric).bound(gates)
    if math.isnan(lo) or math.isnan(hi):
        return False
    return hi <= bound if gate.op == "<=" else lo >= bound


def fails(metric: str, entry: dict[str, Any], gates: Any) -> bool:
    """Whether a final metric entry {"value", "ci95"} fails its gate under `gates.statistic`."""
    gate, bound = _gate(metric), _gate(metric).bound(gates)
    value = entry["value"]
    if gates.statistic != "point":
        value = entry["ci95"][1] if gate.op == "<=" else entry["ci95"][0]
    if value is None or math.isnan(value):
        return False  # unmeasured: the gate suite fails it by itself
    return value > bound if gate.op == "<=" else value < bound


def look_points(batches: int) -> set[int]:
    """Batch counts after which to look: each LOOKS share, rounded, excluding the last batch."""
    return {max(1, round(share * batches)) for share in LOOKS} - {batches}


@dataclass(frozen=True)
class Stop:
    """Why validation stopped before the end: the metric, its interval and how much was measured."""
    metric: str
    lo: float
    hi: float
    level: float
    prompts: int  # prompts scored when it stopped
    of: int  # prompts in the held-out set

    def reason(self, gates: Any) -> str:
        gate = _gate(self.metric)
        side = ">" if gate.op == "<=" else "<"
        return (f"stopped early: {self.metric} {self.level:.1%} CI [{self.lo:.4g}, {self.hi:.4g}] {side} "
                f"{gate.threshold} = {gate.bound(gates):g} after {self.prompts} of {self.of} prompts")

    def to_dict(self, gates: Any) -> dict[str, Any]:
        return {"stopped": True, "metric": self.metric, "ci": [self.lo, self.hi], "level": self.level,
                "prompts": self.prompts, "of": self.of, "reason": self.reason(gates)}
