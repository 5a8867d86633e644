"""Always-valid sequential tests: confidence sequences that may be looked at after every observation.

A canary or an A/B test is checked again and again while traffic arrives. A fixed-horizon test read
after every request rejects a true null far more often than its nominal level (peeking: about 30%
instead of 5% over a few hundred looks, `python -m costopt.online.abtest simulate` measures it). The
two tools here hold their level however often they are read, because they are built on
nonnegative supermartingales (Ville's inequality):

- `BettingCS`: a confidence sequence for the mean of observations in [lo, hi] by betting (Waudby-Smith &
  Ramdas 2023, "Estimating means of bounded random variables by betting", the hedged capital process
  with predictable plug-in bets). It adapts to the variance, so a rare-event rate (errors, slow
  requests) near 0 is bounded after a few hundred observations, where a Hoeffding bound would need
  thousands. The interval is the running intersection over a grid of candidate means (2,001 points:
  0.05% of the range), so it only ever narrows.
- `MixtureSPRT`: the mixture sequential probability ratio test for a difference of two means (Johari,
  Pekelis & Walsh 2017, "Always valid inference", the normal mixture Optimizely runs), with plug-in
  variances; its always-valid confidence interval for the difference and p-value.

Why our own code rather than a library: the one package with these boundaries (`confseq`, PyPI)
ships as a source archive that needs a C++ toolchain and Boost, and its last release is from 2022;
both tests are closed-form updates of a few lines each, checked here against their stated error rates
by simulation (tests/test_online.py; BENCHMARKS.md, section 14).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRID = 2001  # candidate means of BettingCS, over [lo, hi]
_BET_CAP = 0.75  # a bet stakes at most 3/4 of the capital (the paper allows any c < 1; 1/2 needed
# 1.5x the observations to bound a rate near 0: 300 error-free requests gave 0.0245 against 0.0165)


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha: {alpha!r}; expected a number in (0, 1)")
    return float(alpha)


class BettingCS:
    """Running (1 - alpha) confidence sequence for the mean of i.i.d. observations in [lo, hi].

    `add(x)` takes observations (values outside [lo, hi] are clipped: say so in the metric's meaning);
    `lower`, `upper` bound the mean, valid simultaneously at every n. Deterministic: no randomisation.
    """

    def __init__(self, alpha: float = 0.05, lo: float = 0.0, hi: float = 1.0) -> None:
        self.alpha = _check_alpha(alpha)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"range: [{lo!r}, {hi!r}]; expected finite bounds with hi > lo")
        self.lo, self.hi = float(lo), float(hi)
        self._m = np.linspace(0.0, 1.0, GRID)  # candidate means, scaled to [0, 1]
        self._log_up = np.zeros(GRID)  # log capital of the bettor on "mean > m"
        self._log_down = np.zeros(GRID)  # ... on "mean < m"
        self._alive = np.ones(GRID, dtype=bool)  # candidates no capital has ruled out yet
        self.n = 0
        self._sum = 0.0
        self._sq_dev = 0.0  # sum of (x_i - running mean before x_i)^2, for the plug-in variance

    def add(self, x: float) -> None:
        """One observation (clipped into [lo, hi])."""
        if not math.isfinite(x):
            raise ValueError(f"observation: {x!r}; expected a finite number")
        y = (min(max(float(x), self.lo), self.hi) - self.lo) / (self.hi - self.lo)
        t = self.n + 1
        mean_prev = (0.5 + self._sum) / t  # shrunk towards the middle, as in the paper
        var_prev = (0.25 + self._sq_dev) / t
        lam = math.sqrt(2.0 * math.log(2.0 / self.alpha) / (var_prev * t * math.log(t + 1.0)))
        m = self._m
        with np.errstate(divide="ignore", invalid="ignore"):
            lam_up = np.minimum(lam, _BET_CAP / np.maximum(m, 1e-12))  # stays > 0 for every y in [0, 1]
            lam_down = np.minimum(lam, _BET_CAP / np.maximum(1.0 - m, 1e-12))
        self._log_up += np.log1p(lam_up * (y - m))
        self._log_down += np.log1p(-lam_down * (y - m))
        hedged = np.logaddexp(self._log_up, self._log_down) + math.log(0.5)
        self._alive &= hedged < math.log(1.0 / self.alpha)
        self._sq_dev += (y - mean_prev) ** 2
        self._sum += y
        self.n = t

    def extend(self, xs) -> None:
        for x in xs:
            self.add(float(x))

    @property
    def mean(self) -> float:
        return float(self.lo + (self.hi - self.lo) * (self._sum / self.n)) if self.n else float("nan")

    def _bound(self, which: int) -> float:
        idx = np.flatnonzero(self._alive)
        if idx.size == 0:  # every candidate ruled out: only possible when the data are not i.i.d.
            return self.mean
        step = 1.0 / (GRID - 1)  # the true mean may lie between two grid points: widen by one step
        m = self._m[idx[0]] - step if which == 0 else self._m[idx[-1]] + step
        return float(self.lo + (self.hi - self.lo) * min(max(m, 0.0), 1.0))

    @property
    def lower(self) -> float:
        return self._bound(0)

    @property
    def upper(self) -> float:
        return self._bound(1)


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations of one stream (Welford)."""
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def var(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else float("nan")


class MixtureSPRT:
    """mSPRT for theta = mean(B) - mean(A) against theta0, with a N(theta0, tau^2) mixture.

    With z the difference of the sample means and v its plug-in variance (var_A/n_A + var_B/n_B):
        Lambda = sqrt(v / (v + tau^2)) * exp(tau^2 (z - theta0)^2 / (2 v (v + tau^2)))
    H0 is rejected, at any time it is read, once Lambda >= 1/alpha; `p_value` is the always-valid
    p-value min over looks of 1/Lambda, and `interval()` the always-valid interval of the thetas not
    rejected. `tau` is the size of difference the test is tuned to detect, in the metric's unit.
    Undefined (p = 1, infinite interval) until each arm has `min_n` observations: the plug-in
    variance of a handful is noise.
    """

    def __init__(self, tau: float, alpha: float = 0.05, theta0: float = 0.0, min_n: int = 10) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau: {tau!r}; expected a positive number (the difference to detect)")
        if not (isinstance(min_n, int) and min_n >= 2):
            raise ValueError(f"min_n: {min_n!r}; expected an integer >= 2")
        self.tau, self.alpha, self.theta0, self.min_n = float(tau), _check_alpha(alpha), float(theta0), min_n
        self.a, self.b = _Moments(), _Moments()
        self._p = 1.0
        self._lo, self._hi = -math.inf, math.inf

    def add(self, arm: str, x: float) -> None:
        """One observation of arm "A" or "B"; the p-value and interval are updated at once."""
        if arm not in ("A", "B"):
            raise ValueError(f"arm: {arm!r}; expected 'A' or 'B'")
        if not math.isfinite(x):
            raise ValueError(f"observation: {x!r}; expected a finite number")
        (self.a if arm == "A" else self.b).add(float(x))
        self._look()

    @property
    def ready(self) -> bool:
        return self.a.n >= self.min_n and self.b.n >= self.min_n

    def _v(self) -> float:
        return max(self.a.var / self.a.n + self.b.var / self.b.n, 1e-18)

    def _look(self) -> None:
        if not self.ready:
            return
        v, t2 = self._v(), self.tau ** 2
        z = self.b.mean - self.a.mean
        log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * (z - self.theta0) ** 2 / (2.0 * v * (v + t2))
        self._p = min(self._p, math.exp(-log_lambda) if log_lambda < 700 else 0.0)
        half = math.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / self.alpha) + math.log((v + t2) / v)))
        self._lo, self._hi = max(self._lo, z - half), min(self._hi, z + half)  # running intersection

    @property
    def difference(self) -> float:
        return self.b.mean - self.a.mean if self.a.n and self.b.n else float("nan")

    @property
    def p_value(self) -> float:
        return self._p

    @property
    def rejected(self) -> bool:
        return self._p <= self.alpha

    def interval(self) -> tuple[float, float]:
        """Always-valid (1 - alpha) interval for mean(B) - mean(A); (-inf, inf) until `ready`."""
        if self._lo > self._hi:  # crossing running bounds: the plug-in variance moved; report the newest
            return (min(self._lo, self._hi), max(self._lo, self._hi))
        return (self._lo, self._hi)


class PairedMixtureSPRT(MixtureSPRT):
    """The mSPRT on paired observations, both arms measured on the same unit (a prompt scored by both
    variants): theta = mean(B - A), with the plug-in variance var(B - A) / n of the differences, which
    pairing makes far smaller than the unpaired one when units differ more than the arms do. The same
    mixture, always-valid p-value and running interval."""

    def __init__(self, tau: float, alpha: float = 0.05, theta0: float = 0.0, min_n: int = 10) -> None:
        super().__init__(tau, alpha, theta0, min_n)
        self.d = _Moments()

    def add(self, arm: str, x: float) -> None:
        raise TypeError("PairedMixtureSPRT takes pairs: add_pair(a, b)")

    def add_pair(self, a: float, b: float) -> None:
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"pair: ({a!r}, {b!r}); expected finite numbers")
        self.a.add(float(a))
        self.b.add(float(b))
        self.d.add(float(b) - float(a))
        self._look()

    @property
    def ready(self) -> bool:
        return self.d.n >= self.min_n

    def _v(self) -> float:
        return max(self.d.var / self.d.n, 1e-18)
