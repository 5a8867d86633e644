"""Calibrate the cache's hit decision so that its false-hit rate has a proven bound, not a magic number.

A lookup serves a cached answer when the embedding cosine reaches `threshold` **and** the verification
step (`costopt.cache.verify`) agrees, with `min_phrase_sim` for differing content words. On labeled
pairs (`costopt.cache.pairs`):
- false-hit rate = near-miss pairs (different answers) the rule would serve / near-miss pairs;
- hit rate = same-answer pairs it serves / same-answer pairs.
`fit` picks, on the fit split, the setting with the highest hit rate whose false-hit rate's exact
(Clopper-Pearson) one-sided 95% upper bound stays within `max_false_hit` (default 1%); `measure`
then reports both rates with exact intervals on a split not used to fit, per kind of pair. The curve
(`sweep`) is what the report plots: hit rate against false-hit rate as the threshold moves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
from scipy.stats import beta

from costopt.cache.pairs import Pair
from costopt.cache.verify import PhraseSim, verify

THRESHOLDS = tuple(float(round(x, 3)) for x in np.arange(0.50, 0.995, 0.01))
PHRASE_SIMS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.01)  # 1.01: no content-word difference ever passes


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """Exact one-sided upper bound at `level` (Clopper-Pearson) for k of n."""
    if n == 0:
        return 1.0
    return 1.0 if k == n else float(beta.ppf(level, k + 1, n - k))


@dataclass(frozen=True)
class Setting:
    threshold: float  # embedding cosine at or above which a candidate is considered
    min_phrase_sim: float  # differing content words must reach this phrase similarity


@dataclass(frozen=True)
class Scored:
    """A pair's embedding cosine and what verification said, independent of the setting."""
    pair: Pair
    cosine: float
    structural_ok: bool  # hard tokens agree, and no content word stands alone
    phrase_sim: float | None  # the differing content phrases' similarity (None: no difference)

    def accepted(self, s: Setting) -> bool:
        if self.cosine < s.threshold or not self.structural_ok:
            return False
        return self.phrase_sim is None or self.phrase_sim >= s.min_phrase_sim


def score(pairs: Iterable[Pair], encode: Callable[[list[str]], np.ndarray],
          phrase_sim: PhraseSim | None = None) -> list[Scored]:
    """Each pair's cosine and verification. The differing phrases verification asks about are embedded in
    one batch with `encode` (the cosine of unit vectors, as `Embedder.phrase_sim` computes one at a time),
    so scoring a few thousand pairs takes seconds; `phrase_sim`, when given, is used instead."""
    pairs = list(pairs)
    va = encode([p.a for p in pairs])
    vb = encode([p.b for p in pairs])
    cos = np.einsum("ij,ij->i", va, vb)
    if phrase_sim is None:
        asked: set[tuple[str, str]] = set()
        for p in pairs:  # a first pass records which phrase pairs verification needs
            verify(p.a, p.b, lambda x, y: asked.add((x, y)) or 1.0, min_phrase_sim=-1.0)
        phrases = sorted({x for pair in asked for x in pair})
        vecs = dict(zip(phrases, encode(phrases))) if phrases else {}
        sims = {(x, y): float(vecs[x] @ vecs[y]) for x, y in asked}
        phrase_sim = lambda x, y: sims[(x, y)]  # noqa: E731
    out = []
    for p, c in zip(pairs, cos):
        v = verify(p.a, p.b, phrase_sim, min_phrase_sim=-1.0)  # -1: keep the similarity, decide later
        out.append(Scored(p, float(c), v.ok, v.phrase_sim))
    return out


@dataclass(frozen=True)
class Rates:
    hits: int
    same: int
    false_hits: int
    near_misses: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.same if self.same else 0.0

    @property
    def false_hit_rate(self) -> float:
        return self.false_hits / self.near_misses if self.near_misses else 0.0

    def to_dict(self) -> dict:
        return {"hit_rate": self.hit_rate, "hit_rate_ci95": list(clopper_pearson(self.hits, self.same)),
                "false_hit_rate": self.false_hit_rate,
                "false_hit_upper95": upper_bound(self.false_hits, self.near_misses),
                "false_hit_ci95": list(clopper_pearson(self.false_hits, self.near_misses)), **asdict(self)}


def rates(scored: list[Scored], s: Setting) -> Rates:
    same = [x for x in scored if x.pair.same]
    near = [x for x in scored if not x.pair.same]
    return Rates(sum(x.accepted(s) for x in same), len(same), sum(x.accepted(s) for x in near), len(near))


def fit(scored: list[Scored], max_false_hit: float = 0.01) -> tuple[Setting, Rates]:
    """The setting with the most hits whose false-hit upper bound (95%, exact) is within `max_false_hit`;
    among settings with as many hits, the highest threshold (fewer candidates to verify per lookup) and
    the lowest phrase setting tried first. Raises ValueError when no setting qualifies."""
    best: tuple[Setting, Rates] | None = None
    for s_min in PHRASE_SIMS:
        found: tuple[Setting, Rates] | None = None
        for t in THRESHOLDS:  # hits and false hits only fall as t rises
            r = rates(scored, Setting(t, s_min))
            if found is None:
                if upper_bound(r.false_hits, r.near_misses) <= max_false_hit:
                    found = (Setting(t, s_min), r)
            elif r.hits == found[1].hits:
                found = (Setting(t, s_min), r)  # as many hits with a stricter threshold: fewer candidates to verify
            else:
                break
        if found is not None and (best is None or found[1].hits > best[1].hits):
            best = found
    if best is None:
        raise ValueError(f"no cache setting keeps the false-hit upper bound within {max_false_hit:.2%} "
                         f"on {sum(not x.pair.same for x in scored)} near-miss pairs")
    return best


def measure(scored: list[Scored], s: Setting) -> dict:
    """Rates with exact intervals, overall and per kind of pair."""
    kinds = sorted({x.pair.kind for x in scored})
    return {"overall": rates(scored, s).to_dict(),
            "kinds": {k: rates([x for x in scored if x.pair.kind == k], s).to_dict() for k in kinds}}


def sweep(scored: list[Scored], min_phrase_sim: float) -> list[dict]:
    """Hit rate and false-hit rate as the threshold moves, the phrase setting fixed: the report's curve."""
    out = []
    for t in THRESHOLDS:
        r = rates(scored, Setting(t, min_phrase_sim))
        out.append({"threshold": t, "hit_rate": r.hit_rate, "false_hit_rate": r.false_hit_rate,
                    "false_hit_upper95": upper_bound(r.false_hits, r.near_misses)})
    return out


PAIRS_PER_TEMPLATE = 60


def calibrate_on_pairs(encode: Callable[[list[str]], np.ndarray], phrase_sim: PhraseSim, seed: int = 0,
                       per_template: int = PAIRS_PER_TEMPLATE, max_false_hit: float = 0.01) -> dict:
    """Fit on the project's pair set's fit split, measure on its held split: the setting, both splits'
    rates with exact intervals (per kind on the held split) and the held split's curve."""
    from costopt.cache.pairs import labeled_pairs, split_pairs

    fit_set, held = split_pairs(labeled_pairs(seed, per_template))
    setting, fitted = fit(score(fit_set, encode), max_false_hit)
    scored = score(held, encode)
    return {"setting": asdict(setting), "max_false_hit": max_false_hit, "pairs_seed": seed,
            "per_template": per_template, "fit": fitted.to_dict(), "held": measure(scored, setting),
            "curve": sweep(scored, setting.min_phrase_sim), "curve_cosine_only": sweep_cosine_only(scored)}


def sweep_cosine_only(scored: list[Scored]) -> list[dict]:
    """The same curve for a cosine threshold alone, no verification (GPTCache's rule), for comparison."""
    same = [x for x in scored if x.pair.same]
    near = [x for x in scored if not x.pair.same]
    out = []
    for t in THRESHOLDS:
        hits, false = sum(x.cosine >= t for x in same), sum(x.cosine >= t for x in near)
        out.append({"threshold": t, "hit_rate": hits / max(1, len(same)),
                    "false_hit_rate": false / max(1, len(near)), "false_hit_upper95": upper_bound(false, len(near))})
    return out
