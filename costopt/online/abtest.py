"""A/B tests between serving variants: a sequential decision on quality, latency and cost per request.

Each metric is a stream of per-request values per arm (A: the variant in service, B: the challenger).
For each metric a mixture SPRT (`costopt.online.sequential.MixtureSPRT`) tests the difference of
means B - A with an always-valid interval, so the test may be read after every request. `alpha` is
split evenly over the metrics (Bonferroni). The decision:
- **undecided** while either arm has fewer than `min_samples` requests, or while nothing below is proven;
- **B** when the primary metric is proven better for B and every guard metric is proven within its
  `margin` (non-inferiority), so a winner is never declared on cost alone while quality is unknown;
- **A** when B is proven worse on the primary metric, or on a guard by more than its margin.
"Undecided" is an answer: with too few samples the test never says "winner".

    test = ABTest(ABConfig.default(), "gguf_q8_0", "gguf_q6_k")
    test.add("A", {"quality": 0.97, "latency_ms": 412.0, "cost_usd": 1.1e-6}) ...
    test.decision()  # {"decision": "undecided" | "A" | "B", "reason": ..., "metrics": {...evidence}}

`python -m costopt.online.abtest simulate` measures the false-positive rate on A/A data (every look, as
an operator refreshing a dashboard would) against a fixed-horizon z-test read at the same looks, and the
power on a planted difference (BENCHMARKS.md, section 14).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from costopt.online.sequential import MixtureSPRT


@dataclass(frozen=True)
class Metric:
    name: str
    better: str  # "higher" | "lower"
    tau: float  # the difference the test is tuned to find, in the metric's unit (the mixture's scale)
    margin: float = 0.0  # a guard may be worse by at most this much (non-inferiority), in the metric's unit

    def __post_init__(self) -> None:
        if self.better not in ("higher", "lower"):
            raise ValueError(f"metrics.{self.name}.better: expected 'higher' or 'lower', got {self.better!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"metrics.{self.name}.tau: expected a positive number, got {self.tau!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"metrics.{self.name}.margin: expected a number >= 0, got {self.margin!r}")


@dataclass(frozen=True)
class ABConfig:
    primary: str  # the metric the test is about (usually cost per request)
    metrics: tuple[Metric, ...]
    alpha: float = 0.05  # chance of a wrong decision on any metric, all together
    min_samples: int = 200  # requests per arm before any decision (the plug-in variance needs them)

    def __post_init__(self) -> None:
        names = [m.name for m in self.metrics]
        if self.primary not in names:
            raise ValueError(f"primary: {self.primary!r} is not among the metrics {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: names repeat: {names}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a number in (0, 1), got {self.alpha!r}")
        if not (isinstance(self.min_samples, int) and self.min_samples >= 10):
            raise ValueError(f"min_samples: expected an integer >= 10, got {self.min_samples!r}")

    @classmethod
    def default(cls) -> ABConfig:
        """Cost per request (USD) first; quality (a per-request score in [0, 1], e.g. the shadow top-1
        agreement with the reference) may not drop by more than 0.01; latency not grow by more than 100 ms."""
        return cls("cost_usd", (Metric("cost_usd", "lower", 2e-7), Metric("quality", "higher", 0.02, 0.01),
                                Metric("latency_ms", "lower", 200.0, 100.0)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ABConfig:
        metrics = tuple(Metric(**m) for m in d.get("metrics", []))
        return cls(d["primary"], metrics, float(d.get("alpha", 0.05)), int(d.get("min_samples", 200)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ABTest:
    config: ABConfig
    a: str  # the variant in service
    b: str  # the challenger
    tests: dict[str, MixtureSPRT] = field(init=False)

    def __post_init__(self) -> None:
        level = self.config.alpha / len(self.config.metrics)
        self.tests = {m.name: MixtureSPRT(tau=m.tau, alpha=level, min_n=10) for m in self.config.metrics}

    def add(self, arm: str, values: Mapping[str, float]) -> None:
        """One request's values; a metric missing from `values` (not measured for it) is skipped."""
        for name, test in self.tests.items():
            v = values.get(name)
            if v is not None and math.isfinite(v):
                test.add(arm, float(v))

    def decision(self) -> dict[str, Any]:
        c = self.config
        evidence: dict[str, Any] = {}
        verdicts: dict[str, str] = {}
        for m in c.metrics:
            t = self.tests[m.name]
            lo, hi = t.interval()
            sign = 1.0 if m.better == "higher" else -1.0  # B better <=> sign * (B - A) > 0
            better_lo = min(sign * lo, sign * hi)  # the interval of B's advantage
            better_hi = max(sign * lo, sign * hi)
            margin = 0.0 if m.name == c.primary else m.margin
            if better_lo > 0 and m.name == c.primary:
                verdicts[m.name] = "B better"
            elif better_hi < -margin:
                verdicts[m.name] = "B worse"
            elif better_lo > -margin and m.name != c.primary:
                verdicts[m.name] = "B within margin"
            else:
                verdicts[m.name] = "open"
            evidence[m.name] = {"n_a": t.a.n, "n_b": t.b.n, "mean_a": _r(t.a.mean if t.a.n else None),
                                "mean_b": _r(t.b.mean if t.b.n else None), "difference_b_minus_a": _r(t.difference),
                                "interval": [_r(lo), _r(hi)], "p_value": _r(t.p_value), "better": m.better,
                                "margin": m.margin, "verdict": verdicts[m.name]}
        n_a = min(t.a.n for t in self.tests.values())
        n_b = min(t.b.n for t in self.tests.values())
        out = {"a": self.a, "b": self.b, "alpha": c.alpha, "min_samples": c.min_samples, "metrics": evidence}
        if n_a < c.min_samples or n_b < c.min_samples:
            return {**out, "decision": "undecided",
                    "reason": f"too few samples: {n_a} (A) and {n_b} (B) of the {c.min_samples} per arm required"}
        worse = [n for n, v in verdicts.items() if v == "B worse"]
        if worse:
            return {**out, "decision": "A", "reason": f"{self.b} is worse on {', '.join(worse)}"}
        guards = [m.name for m in c.metrics if m.name != c.primary]
        if verdicts[c.primary] == "B better" and all(verdicts[g] == "B within margin" for g in guards):
            return {**out, "decision": "B", "reason": f"{self.b} is better on {c.primary} and within the margin "
                                                      f"on {', '.join(guards) or 'nothing else'}"}
        open_ = [n for n, v in verdicts.items() if v == "open"]
        return {**out, "decision": "undecided", "reason": f"not proven yet: {', '.join(open_)}"}


def paired_guard(a: list[float | None], b: list[float | None], margin: float, better: str = "lower",
                 alpha: float = 0.0125, tau: float = 0.1) -> dict[str, Any]:
    """Non-inferiority of B against A on a metric measured on the same units for both arms (the quality
    check scores both variants on one sample of live prompts): a paired mSPRT on B - A
    (`costopt.online.sequential.PairedMixtureSPRT`, mixture scale `tau`), its always-valid interval
    read after the last pair. "B worse" when B is worse by more than `margin` for sure, "B within
    margin" when it is within for sure, else "open". Units where either value is None are left out;
    fewer than 10 pairs decide nothing. `tau` 0.1 nats: with 0.01 the mixture was too narrow to prove
    even the one-liner's 1.3-nat gap on 12 prompts (per-prompt spread 0.4: interval half-width 3.9);
    at 0.1 a 0.04-nat gap (Q4_K_M against Q8_0) and a tie within 0.005 are both decided on 32."""
    from costopt.online.sequential import PairedMixtureSPRT

    if better not in ("higher", "lower"):
        raise ValueError(f"better: expected 'higher' or 'lower', got {better!r}")
    if len(a) != len(b):
        raise ValueError(f"paired_guard: {len(a)} values for A and {len(b)} for B; the units must pair up")
    test = PairedMixtureSPRT(tau=tau, alpha=alpha, min_n=10)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            test.add_pair(x, y)
    out: dict[str, Any] = {"n": test.d.n, "margin": margin, "better": better, "alpha": alpha, "tau": tau,
                           "test": "paired mSPRT on B - A, always-valid interval"}
    if not test.ready:
        return {**out, "verdict": "open", "reason": f"{test.d.n} paired units; {test.min_n} needed"}
    lo, hi = test.interval()
    worse_lo, worse_hi = (lo, hi) if better == "lower" else (-hi, -lo)  # B's disadvantage
    verdict = "B worse" if worse_lo > margin else "B within margin" if worse_hi <= margin else "open"
    return {**out, "mean_a": _r(test.a.mean), "mean_b": _r(test.b.mean), "difference_b_minus_a": _r(test.difference),
            "interval": [_r(lo), _r(hi)], "p_value": _r(test.p_value), "verdict": verdict}


def with_guard(result: dict[str, Any], name: str, guard: dict[str, Any]) -> dict[str, Any]:
    """An A/B decision (`ABTest.decision`) with a paired guard added under `name`: B proven worse on it
    makes the decision A; a B decision stands only when the guard is proven within its margin. Below the
    request sample sizes the decision stays undecided, as without the guard."""
    out = {**result, "metrics": {**result["metrics"], name: guard}}
    if result["decision"] == "undecided" and result["reason"].startswith("too few samples"):
        return out
    b = result["b"]
    if guard["verdict"] == "B worse":
        reason = (result["reason"] + f"; and on {name}") if result["decision"] == "A" else f"{b} is worse on {name}"
        return {**out, "decision": "A", "reason": reason}
    if result["decision"] == "B" and guard["verdict"] != "B within margin":
        return {**out, "decision": "undecided",
                "reason": f"{result['reason']}, but {name} is not proven within its margin ({guard['verdict']})"}
    return out


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 8)


# -- simulation ----------------------------------------------------------------------------------------
def _z_rejects(xa: np.ndarray, xb: np.ndarray, alpha: float) -> bool:
    from statistics import NormalDist

    v = xa.var(ddof=1) / len(xa) + xb.var(ddof=1) / len(xb)
    z = (xb.mean() - xa.mean()) / math.sqrt(max(v, 1e-18))
    return abs(z) > NormalDist().inv_cdf(1 - alpha / 2)


def simulate(runs: int = 1000, n: int = 1000, effect: float = 0.2, tau: float = 0.2, alpha: float = 0.05,
             look_every: int = 10, seed: int = 0) -> dict[str, Any]:
    """A/A and planted-difference runs of unit-variance normal data, `n` requests per arm, read every
    `look_every` pairs: the share of runs that ever reject, for the mSPRT and a peeked z-test."""
    rng = np.random.default_rng(seed)
    looks = range(look_every, n + 1, look_every)
    out: dict[str, Any] = {"runs": runs, "n_per_arm": n, "look_every": look_every, "alpha": alpha, "tau": tau,
                           "effect_sd": effect}
    for label, delta in (("aa", 0.0), ("planted", effect)):
        msprt_rej = z_peek_rej = z_final_rej = 0
        first: list[int] = []
        for _ in range(runs):
            xa, xb = rng.normal(size=n), rng.normal(delta, 1.0, size=n)
            t = MixtureSPRT(tau=tau, alpha=alpha, min_n=10)
            decided_at = None
            for i in range(n):
                t.add("A", xa[i])
                t.add("B", xb[i])
                if decided_at is None and (i + 1) % look_every == 0 and t.rejected:
                    decided_at = i + 1
            msprt_rej += decided_at is not None
            if decided_at is not None:
                first.append(decided_at)
            z_peek_rej += any(_z_rejects(xa[:k], xb[:k], alpha) for k in looks)
            z_final_rej += _z_rejects(xa, xb, alpha)
        out[label] = {"msprt_reject_rate": msprt_rej / runs, "z_peeked_reject_rate": z_peek_rej / runs,
                      "z_fixed_horizon_reject_rate": z_final_rej / runs,
                      "msprt_median_n_at_decision": float(np.median(first)) if first else None}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A/B test simulation: error rate under peeking, power")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--runs", type=int, default=1000)
    s.add_argument("--n", type=int, default=1000, help="requests per arm")
    s.add_argument("--effect", type=float, default=0.2, help="planted difference, in standard deviations")
    s.add_argument("--tau", type=float, default=0.2)
    s.add_argument("--alpha", type=float, default=0.05)
    s.add_argument("--look_every", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(simulate(args.runs, args.n, args.effect, args.tau, args.alpha, args.look_every, args.seed),
                     indent=2))


if __name__ == "__main__":
    main()
