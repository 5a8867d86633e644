"""Drift in the prompts: has recent traffic moved away from what the variants were calibrated on?

A two-sample test on sentence embeddings (all-MiniLM-L6-v2, the semantic cache's embedder): the
unbiased squared maximum mean discrepancy (MMD, Gretton et al. 2012) under a Gaussian kernel whose
width is the median pairwise distance of the pooled sample, with a permutation test for its p-value.
MMD compares whole distributions (a new topic, a new language, longer prompts all move it), needs no
training, and its permutation p-value is exact at any sample size; Evidently's default for embeddings
is a domain classifier, which needs more samples to train and says less about small sets.

    result = mmd_test(reference_embeddings, recent_embeddings, alpha=0.01)
    result.drifted, result.p_value, result.mmd2

Why our own code: the test is twenty lines of numpy over one kernel matrix; the libraries that ship it
(alibi-detect, torch-two-sample) pull TensorFlow or an unmaintained torch extension into the
environment for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MAX_PER_SIDE = 600  # rows kept per side (a seeded subsample beyond): the kernel matrix is (2 x 600)^2 floats


@dataclass(frozen=True)
class DriftResult:
    mmd2: float  # unbiased MMD^2 estimate (can be slightly negative when the two samples agree)
    p_value: float  # permutation p-value: (1 + #{permuted >= observed}) / (1 + permutations)
    drifted: bool  # p_value < alpha
    alpha: float
    n_reference: int
    n_recent: int
    permutations: int
    bandwidth: float  # the kernel's width (median pairwise distance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _subsample(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= MAX_PER_SIDE else x[rng.choice(len(x), MAX_PER_SIDE, replace=False)]


def _mmd2(k: np.ndarray, idx_x: np.ndarray, idx_y: np.ndarray) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix `k` and the two index sets (diagonal excluded)."""
    m, n = len(idx_x), len(idx_y)
    kxx = k[np.ix_(idx_x, idx_x)]
    kyy = k[np.ix_(idx_y, idx_y)]
    kxy = k[np.ix_(idx_x, idx_y)]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def mmd_test(reference: np.ndarray, recent: np.ndarray, alpha: float = 0.01, permutations: int = 500,
             seed: int = 0) -> DriftResult:
    """Test whether `recent` ([n, d] embeddings) comes from the distribution of `reference` ([m, d])."""
    reference, recent = np.asarray(reference, dtype=np.float64), np.asarray(recent, dtype=np.float64)
    if reference.ndim != 2 or recent.ndim != 2 or reference.shape[1] != recent.shape[1]:
        raise ValueError(f"mmd_test: expected two [rows, dim] arrays of one dim, got {reference.shape} and "
                         f"{recent.shape}")
    if len(reference) < 5 or len(recent) < 5:
        raise ValueError(f"mmd_test: at least 5 rows per side, got {len(reference)} reference and {len(recent)} "
                         f"recent; too few to say anything")
    if not (0.0 < alpha < 1.0) or permutations < 19:
        raise ValueError(f"mmd_test: alpha in (0, 1) and permutations >= 19, got {alpha} and {permutations}")
    rng = np.random.default_rng(seed)
    x, y = _subsample(reference, rng), _subsample(recent, rng)
    z = np.concatenate([x, y])  # [m + n, d]
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)  # squared distances
    upper = d2[np.triu_indices(len(z), 1)]
    bandwidth2 = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    k = np.exp(-d2 / bandwidth2)
    m = len(x)
    idx = np.arange(len(z))
    observed = _mmd2(k, idx[:m], idx[m:])
    exceed = 0
    for _ in range(permutations):
        perm = rng.permutation(len(z))
        exceed += _mmd2(k, perm[:m], perm[m:]) >= observed
    p = (1 + exceed) / (1 + permutations)
    return DriftResult(round(observed, 6), round(p, 6), p < alpha, alpha, len(x), len(y), permutations,
                       round(float(np.sqrt(bandwidth2)), 6))
