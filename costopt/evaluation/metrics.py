"""Quality metrics against the fp32 baseline, with bootstrap confidence intervals.

All functions take plain tensors or arrays, so they are unit-tested against hand-computed values:
- `token_kl(ref_logits, var_logits)`: KL(P_fp32 || P_variant) per token, in nats;
- `top1_match(ref_logits, var_logits)`: whether the argmax agrees, per token;
- `token_nll(logits, targets)`: negative log-likelihood per token (perplexity = exp(mean));
- `bootstrap_ci(...)`: a percentile bootstrap over sequences or items (tokens inside one sequence are
  correlated, so sequences are the unit that is resampled).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def token_kl(ref_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(var)) per position. [..., vocab] x2 -> [...], nats, float64."""
    ref_lp = F.log_softmax(ref_logits.double(), dim=-1)
    var_lp = F.log_softmax(var_logits.double(), dim=-1)
    return (ref_lp.exp() * (ref_lp - var_lp)).sum(dim=-1).clamp(min=0.0)


class Reference:
    """fp32 log-probabilities of one batch, computed once and compared with every variant.

    float32 is enough here: the gates sit at 1e-2 nats and float32 log-softmax errors are ~1e-6.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        self.logp = F.log_softmax(logits.float(), dim=-1)  # [N, vocab]
        self.p = self.logp.exp()
        self.top1 = logits.argmax(dim=-1)  # [N]

    def kl(self, var_logits: torch.Tensor) -> torch.Tensor:
        """KL(fp32 || variant) per row, nats. [N, vocab] -> [N]."""
        var_logp = F.log_softmax(var_logits.float(), dim=-1)
        return (self.p * (self.logp - var_logp)).sum(dim=-1).clamp(min=0.0)

    def top1_match(self, var_logits: torch.Tensor) -> torch.Tensor:
        return (var_logits.argmax(dim=-1) == self.top1).double()


def top1_match(ref_logits: torch.Tensor, var_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both argmaxes agree. [..., vocab] x2 -> [...]."""
    return (ref_logits.argmax(dim=-1) == var_logits.argmax(dim=-1)).double()


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position. logits [..., vocab], targets [...] -> [...], nats."""
    lp = F.log_softmax(logits.float(), dim=-1)  # float32: the [B, T, vocab] tensor is the cost here
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float  # 95% CI lower bound
    hi: float  # 95% CI upper bound

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95": [self.lo, self.hi]}


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    return float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")


def bootstrap_ci(stat: Callable[[np.ndarray], float], n_units: int, resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """`level` percentile interval of `stat(idx)` over `resamples` draws of unit indices with replacement."""
    if n_units < 2:
        value = stat(np.arange(n_units))
        return value, value
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(resamples)])
    tail = (1.0 - level) / 2 * 100
    return float(np.nanpercentile(draws, tail)), float(np.nanpercentile(draws, 100 - tail))


def mean_over_units(sums: Sequence[float], counts: Sequence[float], resamples: int,
                    seed: int = 0, level: float = 0.95) -> Estimate:
    """Token-weighted mean of per-sequence sums, with a CI from resampling sequences."""
    s, c = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    lo, hi = bootstrap_ci(lambda i: ratio_of_sums(s[i], c[i]), len(s), resamples, seed, level)
    return Estimate(ratio_of_sums(s, c), lo, hi)


def quantile_over_units(values_per_unit: Sequence[np.ndarray], q: float, resamples: int,
                        seed: int = 0, level: float = 0.95) -> Estimate:
    """The q-quantile of pooled token values, with a CI from resampling sequences."""
    units = [np.asarray(v, dtype=float) for v in values_per_unit]
    pooled = np.concatenate(units) if units else np.array([np.nan])

    def stat(idx: np.ndarray) -> float:
        return float(np.quantile(np.concatenate([units[i] for i in idx]), q))

    lo, hi = bootstrap_ci(stat, len(units), resamples, seed, level)
    return Estimate(float(np.quantile(pooled, q)), lo, hi)


def ppl_ratio(base_nll: Sequence[float], var_nll: Sequence[float], counts: Sequence[float],
              resamples: int, seed: int = 0) -> tuple[Estimate, float, float]:
    """Perplexity ratio variant/base over paired passages; also returns both perplexities."""
    b, v, c = (np.asarray(x, dtype=float) for x in (base_nll, var_nll, counts))

    def stat(i: np.ndarray) -> float:
        return math.exp(ratio_of_sums(v[i], c[i]) - ratio_of_sums(b[i], c[i]))

    lo, hi = bootstrap_ci(stat, len(c), resamples, seed)
    base_ppl, var_ppl = math.exp(ratio_of_sums(b, c)), math.exp(ratio_of_sums(v, c))
    return Estimate(var_ppl / base_ppl, lo, hi), base_ppl, var_ppl


def accuracy_and_retention(base_correct: Sequence[bool], var_correct: Sequence[bool], resamples: int,
                           seed: int = 0) -> tuple[Estimate, Estimate]:
    """Task accuracy and retention (variant acc / base acc), paired bootstrap over items."""
    b, v = np.asarray(base_correct, dtype=float), np.asarray(var_correct, dtype=float)
    acc_lo, acc_hi = bootstrap_ci(lambda i: float(v[i].mean()), len(v), resamples, seed)

    def retention(i: np.ndarray) -> float:
        base = b[i].mean()
        return float(v[i].mean() / base) if base > 0 else float("nan")

    ret_lo, ret_hi = bootstrap_ci(retention, len(v), resamples, seed + 1)
    return Estimate(float(v.mean()), acc_lo, acc_hi), Estimate(retention(np.arange(len(v))), ret_lo, ret_hi)
