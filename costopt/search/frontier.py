"""The accuracy-target search: the cheapest variant that passes the gates, and the Pareto front.

Pure logic on small tables, unit-tested on synthetic cost/quality tables with known answers; the
phase `tasks.search` feeds it measured numbers.

Two levels:
1. **Named candidates** (the presets the user picked, each quantized, benchmarked and validated):
   `cheapest_passing` returns the cheapest one whose gates pass (costs within `search.cost_tolerance`
   of the cheapest are a tie, won by the lower KL); `pareto_front` the variants no other
   variant beats on both cost and KL.
2. **Mixed precision**: one precision per block part out of int4 < int8 < fp32. There are 3^60
   assignments for SmolLM2, far too many to evaluate, so we predict instead: a part's KL cost comes
   from the sensitivity scan (`costopt.search.sensitivity`), assumed additive across parts, and its run-time
   cost from the measured kernel time of its Linears (`costopt.search.costmodel`). `greedy_path` starts
   with every part at the cheapest precision and repeatedly makes the upgrade that removes the most
   predicted KL per microsecond added, which traces the lower convex hull of predicted cost versus
   predicted KL (the Lagrangian solution of this multiple-choice knapsack). Rule-based assignments
   ("attention at full precision, MLP in INT4") join the path where they are not dominated.
   `bisect_path` then finds the cheapest point that really passes the gates, by binary search on the
   path (cost rises and KL falls along it), starting at the first point whose predicted KL is within
   `margin` x the KL gate: it evaluates at most ceil(log2(path length)) + 1 points, and stops early at
   `max_evaluations` (3 by default; the path has ~120 points for 60 parts and two upgrades each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

ORDER = ("int4", "int8", "fp32")  # cheapest first


@dataclass(frozen=True)
class Point:
    """One mixed assignment with its predicted cost (µs per decode step) and KL (nats/token)."""
    assign: dict[str, str]
    cost: float
    kl: float
    label: str = ""  # "greedy" or the rule's name

    def key(self) -> tuple:
        return tuple(sorted(self.assign.items()))


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of (name, cost, loss) points that no other point beats on both (ties kept), cheapest first."""
    ok = [(c, q, n) for n, c, q in points if c is not None and q is not None]
    front = []
    for c, q, n in ok:
        dominated = any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for c2, q2, _ in ok)
        if not dominated:
            front.append((c, q, n))
    return [n for _, _, n in sorted(front)]


def cheapest_passing(rows: list[dict[str, Any]], tolerance: float = 0.0) -> str | None:
    """The name of the cheapest row with `passed` true (cost in `cost`); None when none passes.

    Passing rows whose cost is within `tolerance` (a share) of the cheapest count as tied: a difference
    smaller than the benchmark's round-to-round noise is not a measured difference, and two runs of the
    same code picked different variants on it. A tie goes to the better quality (lowest `kl`, when the
    rows carry it), then the lower cost, then the name."""
    ok = [r for r in rows if r.get("passed") and r.get("cost") is not None]
    if not ok:
        return None
    floor = min(r["cost"] for r in ok)
    tied = [r for r in ok if r["cost"] <= floor * (1.0 + tolerance)]
    worst = float("inf")
    return min(tied, key=lambda r: (worst if r.get("kl") is None else r["kl"], r["cost"], r["name"]))["name"]


def mixed_cost_floor(path: list[Point], int8_cost: float, cost: dict[str, dict[str, float]]) -> float:
    """A lower bound on the measured cost of any point of `path`, from the measured cost of the all-INT8
    variant (`int8_cost`, same kernels): int8_cost x the cheapest point's predicted parts' time over the
    all-INT8 one's. Conservative: predictions count only the parts' GEMMs, and the time every step also
    spends outside them (attention, norms, dispatch) is the same in every mix, so measured ratios sit
    closer to 1 than predicted ones."""
    all_int8 = sum(c["int8"] for c in cost.values())
    return int8_cost * min(p.cost for p in path) / all_int8


def predict(assign: dict[str, str], sens: dict[str, dict[str, float]], cost: dict[str, dict[str, float]]
            ) -> tuple[float, float]:
    """(predicted cost, predicted KL) of an assignment: sums over parts; fp32 parts add no KL."""
    kl = sum(sens[p].get(prec, 0.0) for p, prec in assign.items() if prec != "fp32")
    return sum(cost[p][prec] for p, prec in assign.items()), kl


def greedy_path(sens: dict[str, dict[str, float]], cost: dict[str, dict[str, float]],
                allowed: tuple[str, ...] = ORDER) -> list[Point]:
    """Assignments from all-cheapest to all-fp32, one most-efficient upgrade at a time."""
    levels = [p for p in ORDER if p in allowed or p == "fp32"]
    assign = {part: levels[0] for part in sens}
    path = [Point(dict(assign), *predict(assign, sens, cost), "greedy")]
    while True:
        best, best_rate = None, -math.inf
        for part, prec in assign.items():
            i = levels.index(prec)
            if i + 1 == len(levels):
                continue
            nxt = levels[i + 1]
            gain = sens[part].get(prec, 0.0) - (0.0 if nxt == "fp32" else sens[part].get(nxt, 0.0))
            extra = max(cost[part][nxt] - cost[part][prec], 1e-9)
            if gain / extra > best_rate:
                best, best_rate = (part, nxt), gain / extra
        if best is None:
            return path
        assign[best[0]] = best[1]
        path.append(Point(dict(assign), *predict(assign, sens, cost), "greedy"))


def rule_points(sens: dict[str, dict[str, float]], cost: dict[str, dict[str, float]]) -> list[Point]:
    """Hand-written rules users ask about, as candidates: attention kept at fp32 or int8, MLP in INT4."""
    out = []
    for attn in ("fp32", "int8"):
        assign = {p: (attn if "attn" in p.split(".")[-1] else "int4") for p in sens}
        out.append(Point(assign, *predict(assign, sens, cost), f"attention {attn}, MLP int4"))
    return out


def merge_path(path: list[Point], extra: list[Point]) -> list[Point]:
    """Path plus the extra points not dominated by it, sorted by predicted cost (KL falls along it)."""
    pts = {p.key(): p for p in path}
    for p in extra:
        if not any(q.cost <= p.cost and q.kl <= p.kl for q in path):
            pts.setdefault(p.key(), p)
    merged = sorted(pts.values(), key=lambda p: (p.cost, -p.kl))
    front, best_kl = [], math.inf
    for p in merged:  # keep it monotone: a point must lower KL to be worth its cost
        if p.kl < best_kl:
            front.append(p)
            best_kl = p.kl
    return front


@dataclass
class Trial:
    index: int
    point: Point
    passed: bool
    measured_kl: float | None
    result: dict[str, Any] = field(default_factory=dict)


def start_index(path: list[Point], kl_gate: float, margin: float, scale: float = 1.0) -> int:
    """The first (cheapest) point whose predicted KL x `scale` is within margin x the KL gate."""
    for i, p in enumerate(path):
        if p.kl * scale <= margin * kl_gate:
            return i
    return len(path) - 1


def bisect_path(path: list[Point], evaluate: Callable[[Point], tuple[bool, float | None, dict]],
                kl_gate: float, margin: float, max_evaluations: int) -> tuple[int | None, list[Trial]]:
    """Binary search for the cheapest passing point; returns (its index or None, the trials run).

    Assumes passing is monotone along the path (more precision never fails where less passed). The
    first probe is the prediction's pick; afterwards the interval [lo, hi] holds the answer, with hi
    the cheapest point known to pass.
    """
    trials: list[Trial] = []
    lo, hi = 0, None  # every index < lo is known to fail
    probe = start_index(path, kl_gate, margin)
    while len(trials) < max_evaluations:
        passed, kl, result = evaluate(path[probe])
        trials.append(Trial(probe, path[probe], passed, kl, result))
        if passed:
            hi = probe
        else:
            lo = probe + 1
        if hi is not None and lo >= hi or lo >= len(path):
            break
        if hi is None:  # nothing passed yet: jump towards fp32, guided by how far off the prediction was
            ratio = (kl / path[probe].kl) if kl and path[probe].kl > 0 else 2.0
            probe = max(lo, start_index(path, kl_gate, margin, scale=max(ratio, 1.0)))
            if probe < lo or any(t.index == probe for t in trials):
                probe = min(len(path) - 1, lo + max(1, (len(path) - lo) // 2))
        else:
            probe = (lo + hi) // 2
            if any(t.index == probe for t in trials):
                break
    return hi, trials
