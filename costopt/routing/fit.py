"""Fitting a tier's escalation threshold to a quality target, and judging routed answers.

The quality of a routed answer is its **agreement** with the reference tier (the best passing one):
the share of its tokens that the reference, teacher-forced on the same answer, would itself have
chosen greedily. Tokens the reference generated agree by construction; a cheap tier's accepted token
agrees when it is the reference's argmax at that position. Retention is this agreement pooled over
prompts (a ratio of sums), with a 95% bootstrap interval over prompts; a tier's threshold is the
lowest (so the most traffic stays cheap) whose interval's lower end still meets its share of the
target.

Per prompt, a cheap tier contributes its greedy answer's token probabilities, whether the reference
agrees with each token, and the reference's own answer length (to count the tokens the reference
would add after an escalation). With N-1 tiers below the reference, each gets an equal share of the
allowed disagreement (1 - target) / (N - 1), so the chain as a whole keeps the target (checked end to
end on prompts the fit did not see, `tasks.route`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from costopt.evaluation.metrics import Estimate, bootstrap_ci, ratio_of_sums

MIN_TOKEN_SHARE = 0.05  # a tier generating less of the routed tokens is dropped (fit_threshold)
GRID = tuple(round(x, 3) for x in np.linspace(0.0, 1.0, 201))  # thresholds tried, 0.005 apart


@dataclass(frozen=True)
class TierSample:
    """One prompt's answer from one cheap tier, judged by the reference."""
    probs: Sequence[float]  # the tier's probability of each token it generated (greedy), in order
    agree: Sequence[bool]  # the reference's teacher-forced argmax equals that token
    reference_len: int  # tokens of the reference's own greedy answer to the prompt

    def __post_init__(self) -> None:
        if len(self.probs) != len(self.agree):
            raise ValueError(f"TierSample: {len(self.probs)} probabilities but {len(self.agree)} agreement flags")


def first_below(probs: Sequence[float], threshold: float) -> int:
    """The index of the first token whose probability is under `threshold` (the router's escalation
    point), or len(probs) when none is."""
    for i, p in enumerate(probs):
        if p < threshold:
            return i
    return len(probs)


def outcome(sample: TierSample, threshold: float) -> tuple[int, int, bool, int]:
    """(disagreeing tokens, routed answer length, stayed on this tier, tokens this tier contributed) for
    one prompt at `threshold`."""
    e = first_below(sample.probs, threshold)
    stayed = e == len(sample.probs)
    wrong = sum(1 for a in sample.agree[:e] if not a)
    length = len(sample.probs) if stayed else max(sample.reference_len, e)
    return wrong, max(length, 1), stayed, e


def retention(samples: Sequence[TierSample], threshold: float, resamples: int = 1000,
              seed: int = 0) -> tuple[Estimate, float, float]:
    """(agreement with the reference, pooled over prompts, with its 95% CI; share of prompts that
    stayed on the tier; share of the routed answers' tokens this tier generated) at `threshold`."""
    rows = np.array([outcome(s, threshold) for s in samples], dtype=float).reshape(-1, 4)
    good, length, stayed = rows[:, 1] - rows[:, 0], rows[:, 1], rows[:, 2]
    point = ratio_of_sums(good, length)
    stay = float(stayed.mean()) if len(rows) else 0.0
    tokens = ratio_of_sums(rows[:, 3], length) if len(rows) else 0.0
    if resamples <= 0:
        return Estimate(point, point, point), stay, tokens
    lo, hi = bootstrap_ci(lambda i: ratio_of_sums(good[i], length[i]), len(rows), resamples, seed)
    return Estimate(point, lo, hi), stay, tokens


def _check_fit(name: str, samples: Sequence[Any], unit: str, target: float) -> None:
    if not samples:
        raise ValueError(f"{name}: no samples; expected one per {unit}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{name}: target must be in (0, 1], got {target!r}")


def fit_threshold(samples: Sequence[TierSample], target: float, resamples: int = 1000,
                  grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The lowest threshold whose retention's 95% lower bound is at least `target`, and the curve
    (threshold, retention with CI, share staying, share of tokens) at every tenth grid point. At
    threshold 1 every prompt escalates on its first token, so a threshold always exists. `useful`: the
    tier would generate at least MIN_TOKEN_SHARE of the routed tokens (below that, its attempts cost
    more than they save: every request pays its prefill and the next tier's)."""
    _check_fit("fit_threshold", samples, "fit prompt", target)
    curve, chosen = [], None
    for k, t in enumerate(grid):
        point, stay, tokens = retention(samples, t, 0)
        if k % 10 == 0 or k == len(grid) - 1 or (chosen is None and point.value >= target):
            est, stay, tokens = retention(samples, t, resamples)  # the bound only where it matters or is shown
            row = {"threshold": t, "retention": est.to_dict(), "stay": stay, "token_share": tokens}
            if k % 10 == 0 or k == len(grid) - 1:
                curve.append(row)
            if chosen is None and est.lo >= target:
                chosen = row
    if chosen is None:  # even escalating at once misses: only when the reference disagrees with itself
        chosen = dict(curve[-1])
    return {**chosen, "target": target, "useful": chosen["token_share"] >= MIN_TOKEN_SHARE, "curve": curve}


def tier_targets(target: float, cheap_tiers: int) -> float:
    """Each cheap tier's share of the allowed disagreement: 1 - (1 - target) / cheap_tiers."""
    if cheap_tiers < 1:
        raise ValueError(f"tier_targets: expected at least one tier below the reference, got {cheap_tiers}")
    return 1.0 - (1.0 - target) / cheap_tiers


@dataclass(frozen=True)
class TaskSample:
    """One labeled item answered by one cheap tier, and whether its answer and the reference's are right."""
    probs: Sequence[float]  # the tier's probability of each token of its greedy answer, in order
    decided: int  # tokens of that answer that settle its verdict (through the first word and the next character)
    tier_correct: bool
    reference_correct: bool


def task_outcome(sample: TaskSample, threshold: float) -> bool:
    """Whether the routed answer to one item is right at `threshold`: the reference's verdict when the tier
    escalates on its first token, the tier's when it keeps every token that settles the verdict, and wrong
    when the judged word is split between the two (its continuation is not generated here: a pessimistic
    count, so the fitted bound stays a lower bound)."""
    e = first_below(sample.probs, threshold)
    if e == 0:
        return sample.reference_correct
    return sample.tier_correct if e >= sample.decided else False


def task_retention(samples: Sequence[TaskSample], threshold: float, resamples: int = 1000,
                   seed: int = 0) -> Estimate:
    """Routed task accuracy over the reference's alone at `threshold` (ratio of sums over items), 95% CI."""
    routed = np.array([task_outcome(s, threshold) for s in samples], dtype=float)
    ref = np.array([s.reference_correct for s in samples], dtype=float)
    point = ratio_of_sums(routed, ref)
    if resamples <= 0:
        return Estimate(point, point, point)
    lo, hi = bootstrap_ci(lambda i: ratio_of_sums(routed[i], ref[i]), len(samples), resamples, seed)
    return Estimate(point, lo, hi)


def fit_task_threshold(samples: Sequence[TaskSample], target: float, resamples: int = 1000,
                       grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The lowest threshold whose task retention's 95% lower bound is at least `target`, with the curve at
    every tenth grid point. At threshold 1 every item is answered by the reference, so one always exists
    (when the reference answers none right the retention is undefined and the threshold is 1)."""
    _check_fit("fit_task_threshold", samples, "labeled fit item", target)
    curve, chosen = [], None
    for k, t in enumerate(grid):
        shown = k % 10 == 0 or k == len(grid) - 1
        point = task_retention(samples, t, 0)
        if not (shown or (chosen is None and point.value >= target)):
            continue
        est = task_retention(samples, t, resamples)
        row = {"threshold": t, "task_retention": est.to_dict(),
               "stay": float(np.mean([first_below(s.probs, t) == len(s.probs) for s in samples]))}
        if shown:
            curve.append(row)
        if chosen is None and est.lo >= target:
            chosen = row
    if chosen is None:
        chosen = {**curve[-1], "threshold": 1.0}
    return {**chosen, "target": target, "curve": curve}


def judged_tokens(texts: Sequence[str], answer: str) -> int:
    """How many tokens of an answer settle its verdict under `costopt.evaluation.taskscore.generated_correct`:
    the fewest whose text (`texts[k - 1]`, the answer's first k tokens decoded) holds, after leading spaces,
    the right answer's length plus one character; every token when none does."""
    need = len(answer.strip()) + 1
    for k, text in enumerate(texts, 1):
        if len(text.lstrip()) >= need:
            return k
    return len(texts)
