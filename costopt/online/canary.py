"""The canary judged on answer quality: when a new variant may take all the traffic, and when it must go.

A canary takes `share` of a deployment's requests. On a sample of them the current variant answers in
shadow: it is teacher-forced on the canary's own answer, and the two next-token distributions give a
per-request mean KL(current || canary) and top-1 agreement (`costopt.online.shadow`). The judge holds
four gates, each on an always-valid confidence sequence (`costopt.online.sequential.BettingCS`), so it
may be read after every request without inflating its error rate:

| gate | observation per request | passes when | fails when |
|---|---|---|---|
| `kl` | shadow mean KL, nats/token, clipped at `kl_clip` | upper bound <= `kl_max` | lower bound > `kl_max` |
| `top1` | shadow top-1 agreement | lower bound >= `top1_min` | upper bound < `top1_min` |
| `errors` | 1 if the canary failed the request (5xx, unreachable) | upper bound <= `error_rate_max` | lower bound > `error_rate_max` |
| `latency` | 1 if the request took longer than the latency bound | upper bound <= 0.05 (p95 within it) | lower bound > 0.05 |

The latency bound is `latency_ms_max`, or else the current variant's p95 over its first
`latency_reference` requests of the canary, times 1 + `latency_tolerance`, frozen once known.
`alpha` is split evenly over the four gates (Bonferroni), so the chance that a canary worse than a gate
is promoted stays below `alpha` however long it runs.

Verdicts (`decide()`): **rollback** as soon as any gate fails; **promote** once every gate passes and
at least `min_judged` shadow judgements landed; **rollback** when the metrics are missing (`missing_after`
canary requests in a row without a judgement landing, or no canary request at all for
`max_idle_s`), or when still undecided after `max_requests` canary requests or `max_duration_s`: an
unproven canary never takes the traffic. Flagger and Argo Rollouts judge only success rate and
latency, at a fixed interval; this judges whether the canary answers like the variant it replaces.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from costopt.online.sequential import BettingCS

SLOW_SHARE_MAX = 0.05  # the latency gate bounds the p95: at most 5% of requests above the bound
GATES = ("kl", "top1", "errors", "latency")
MISSING_FALSE_ALARM = 1e-3  # most a healthy canary may be rolled back as "metrics missing" by chance


class CanaryConfigError(ValueError):
    """A canary setting out of range; the message names the field."""


def _num(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise CanaryConfigError(f"canary.{name}: expected {kind} in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class CanaryConfig:
    share: float = 0.2  # of the deployment's requests sent to the canary
    shadow_sample: float = 0.5  # share of the canary's answered requests the current variant re-scores
    alpha: float = 0.05  # chance of promoting a canary that breaks a gate, all gates together
    kl_max: float = 0.05  # nats/token: mean teacher-forced KL(current || canary) over judged requests
    kl_clip: float = 1.0  # nats/token: one request's mean KL counts at most this (an answer that far off fails anyway)
    top1_min: float = 0.90  # mean share of answer tokens where both variants' most likely token agrees
    error_rate_max: float = 0.01  # share of canary requests that fail (Flagger's default: 99% success)
    latency_ms_max: float | None = None  # ms: the p95 bound; None: the current's p95 x (1 + latency_tolerance)
    latency_tolerance: float = 0.25  # the canary's p95 may exceed the current's by this share
    latency_reference: int = 30  # current-variant requests whose p95 sets the bound (when latency_ms_max is None)
    min_judged: int = 20  # shadow judgements before a promotion, whatever the bounds say
    missing_after: int = 60  # canary requests in a row with no judgement landing: metrics missing, roll back
    max_requests: int = 3000  # canary requests after which an undecided canary is rolled back
    max_duration_s: float = 6 * 3600.0  # s; likewise by time
    max_idle_s: float = 600.0  # s without any canary request: metrics missing, roll back

    def __post_init__(self) -> None:
        _num("share", self.share, 0.001, 0.9)
        _num("shadow_sample", self.shadow_sample, 0.01, 1.0)
        _num("alpha", self.alpha, 1e-6, 0.5)
        _num("kl_max", self.kl_max, 0.0, 100.0)
        _num("kl_clip", self.kl_clip, 1e-6, 100.0)
        if self.kl_max >= self.kl_clip:
            raise CanaryConfigError(f"canary.kl_max: {self.kl_max} must be below canary.kl_clip ({self.kl_clip})")
        _num("top1_min", self.top1_min, 0.0, 1.0)
        _num("error_rate_max", self.error_rate_max, 0.0, 1.0)
        if self.latency_ms_max is not None:
            _num("latency_ms_max", self.latency_ms_max, 1.0, 3_600_000.0)
        _num("latency_tolerance", self.latency_tolerance, 0.0, 10.0)
        _num("latency_reference", self.latency_reference, 5, 100_000, integer=True)
        _num("min_judged", self.min_judged, 1, 1_000_000, integer=True)
        _num("missing_after", self.missing_after, 1, 1_000_000, integer=True)
        _num("max_requests", self.max_requests, 1, 100_000_000, integer=True)
        _num("max_duration_s", self.max_duration_s, 1.0, 30 * 86400.0)
        _num("max_idle_s", self.max_idle_s, 1.0, 30 * 86400.0)
        if (1.0 - self.shadow_sample) ** self.missing_after > MISSING_FALSE_ALARM:
            need = math.ceil(math.log(MISSING_FALSE_ALARM) / math.log(1.0 - self.shadow_sample))
            raise CanaryConfigError(f"canary.missing_after: {self.missing_after} requests without a judgement happen "
                                    f"by chance at shadow_sample {self.shadow_sample}; raise it to at least {need} "
                                    f"(or raise shadow_sample)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CanaryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CanaryConfigError(f"canary: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verdict:
    state: str  # "running" | "promote" | "rollback"
    reason: str
    evidence: dict[str, Any]


class CanaryJudge:
    """The gates' evidence for one canary; feed it requests and judgements, read `decide(now)`.

    Time is passed in (seconds on any monotonic clock), so the judge is synchronous and testable."""

    def __init__(self, config: CanaryConfig, started_s: float) -> None:
        self.config = config
        a = config.alpha / len(GATES)
        self.cs = {"kl": BettingCS(a, 0.0, config.kl_clip), "top1": BettingCS(a), "errors": BettingCS(a),
                   "latency": BettingCS(a)}
        self.started_s = self.last_request_s = started_s
        self.requests = self.errors = self.judged = self.judge_failures = 0
        self.since_judged = 0  # canary requests answered since the last judgement landed
        self._pending_latency: list[float] = []  # canary latencies seen before the bound is known
        self._reference: list[float] = []  # the current's latencies, until the bound is known
        self.latency_bound_ms = config.latency_ms_max

    # -- observations ---------------------------------------------------------------------------------
    def canary_request(self, ok: bool, latency_ms: float | None, now_s: float) -> None:
        """One request the canary served (ok) or failed (5xx, unreachable: the client got the current's
        answer instead). A failed request's latency does not count: it says nothing about speed; None
        (a streamed answer, whose total time the client paces) counts for the error rate only."""
        self.requests += 1
        self.last_request_s = now_s
        self.since_judged += 1
        self.cs["errors"].add(0.0 if ok else 1.0)
        if not ok:
            self.errors += 1
            return
        if latency_ms is None:
            return
        if self.latency_bound_ms is None:
            self._pending_latency.append(latency_ms)
        else:
            self.cs["latency"].add(1.0 if latency_ms > self.latency_bound_ms else 0.0)

    def current_request(self, latency_ms: float) -> None:
        """One request the current variant served during the canary (sets the latency bound once)."""
        if self.latency_bound_ms is not None:
            return
        self._reference.append(latency_ms)
        if len(self._reference) >= self.config.latency_reference:
            p95 = float(np.percentile(self._reference, 95))
            self.latency_bound_ms = p95 * (1.0 + self.config.latency_tolerance)
            for ms in self._pending_latency:
                self.cs["latency"].add(1.0 if ms > self.latency_bound_ms else 0.0)
            self._pending_latency.clear()

    def judgement(self, kl_mean: float, top1: float) -> None:
        """One shadow judgement of a canary answer (see `costopt.online.shadow.compare`)."""
        if not (math.isfinite(kl_mean) and math.isfinite(top1)):  # a broken shadow pass, not evidence
            self.judge_failure()
            return
        self.judged += 1
        self.since_judged = 0
        self.cs["kl"].add(max(kl_mean, 0.0))
        self.cs["top1"].add(top1)

    def judge_failure(self) -> None:
        self.judge_failures += 1

    # -- the verdict ------------------------------------------------------------------------------------
    def _gate(self, name: str) -> tuple[str, dict[str, Any]]:
        c, cs = self.config, self.cs[name]
        bound, higher_is_better = {"kl": (c.kl_max, False), "top1": (c.top1_min, True),
                                   "errors": (c.error_rate_max, False), "latency": (SLOW_SHARE_MAX, False)}[name]
        if cs.n == 0:
            status = "open"
        elif higher_is_better:
            status = "pass" if cs.lower >= bound else "fail" if cs.upper < bound else "open"
        else:
            status = "pass" if cs.upper <= bound else "fail" if cs.lower > bound else "open"
        info = {"status": status, "n": cs.n, "mean": None if cs.n == 0 else round(cs.mean, 6),
                "interval": None if cs.n == 0 else [round(cs.lower, 6), round(cs.upper, 6)],
                "threshold": bound, "direction": ">=" if higher_is_better else "<="}
        if name == "latency":
            info["bound_ms"] = None if self.latency_bound_ms is None else round(self.latency_bound_ms, 1)
        return status, info

    def evidence(self) -> dict[str, Any]:
        gates = {name: self._gate(name)[1] for name in GATES}
        return {"requests": self.requests, "errors": self.errors, "judged": self.judged,
                "judge_failures": self.judge_failures, "alpha": self.config.alpha, "gates": gates}

    def decide(self, now_s: float) -> Verdict:
        c = self.config
        ev = self.evidence()
        statuses = {name: g["status"] for name, g in ev["gates"].items()}
        failed = [n for n, s in statuses.items() if s == "fail"]
        if failed:
            parts = [f"{n} {ev['gates'][n]['interval']} vs {ev['gates'][n]['direction']} {ev['gates'][n]['threshold']}"
                     for n in failed]
            return Verdict("rollback", "gate failed: " + "; ".join(parts), ev)
        if all(s == "pass" for s in statuses.values()) and self.judged >= c.min_judged:
            return Verdict("promote", f"every gate passed after {self.requests} canary requests "
                                      f"({self.judged} judged in shadow)", ev)
        if self.since_judged >= c.missing_after:
            return Verdict("rollback", f"metrics missing: {self.since_judged} canary requests in a row without a "
                                       f"shadow judgement ({self.judge_failures} failed)", ev)
        if now_s - self.last_request_s >= c.max_idle_s:
            return Verdict("rollback", f"metrics missing: no canary request for {now_s - self.last_request_s:.0f} s", ev)
        if self.requests >= c.max_requests or now_s - self.started_s >= c.max_duration_s:
            open_ = [n for n, s in statuses.items() if s != "pass"]
            return Verdict("rollback", f"undecided after {self.requests} requests and "
                                       f"{now_s - self.started_s:.0f} s (open: {', '.join(open_) or 'min_judged'})", ev)
        return Verdict("running", "collecting evidence", ev)
