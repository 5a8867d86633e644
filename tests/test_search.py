"""The accuracy-target search on synthetic cost/quality tables whose answers are known."""
import itertools
import random

import pytest

from costopt.search.frontier import (ORDER, Point, bisect_path, cheapest_passing, greedy_path, merge_path,
                            pareto_front, predict, rule_points, start_index)


def test_cheapest_passing_on_a_known_table():
    rows = [
        {"name": "fp32", "cost": 10.0, "passed": True},
        {"name": "int8", "cost": 5.0, "passed": True},
        {"name": "int4_rtn", "cost": 3.0, "passed": False},
        {"name": "int4_gptq", "cost": 3.1, "passed": True},
        {"name": "broken", "cost": 1.0, "passed": False},
        {"name": "unmeasured", "cost": None, "passed": True},
    ]
    assert cheapest_passing(rows) == "int4_gptq", "cheapest among the passing rows with a measured cost"
    assert cheapest_passing([r for r in rows if not r["passed"]]) is None, "nothing passes -> None"


def test_costs_within_the_tolerance_tie_and_the_lower_kl_wins():
    rows = [{"name": "q6", "cost": 10.0, "kl": 0.011, "passed": True},
            {"name": "q8", "cost": 10.8, "kl": 0.004, "passed": True},
            {"name": "int8", "cost": 12.0, "kl": 0.003, "passed": True},
            {"name": "q4", "cost": 8.0, "kl": 0.05, "passed": False}]
    assert cheapest_passing(rows) == "q6", "no tolerance: the strictly cheapest passing row"
    assert cheapest_passing(rows, 0.10) == "q8", "q8 is within 10% of q6: a tie, and q8's KL is lower"
    assert cheapest_passing(rows, 0.25) == "int8", "within 25% all three tie: the lowest KL wins"
    assert cheapest_passing(rows, 0.05) == "q6", "q8 is 8% dearer: outside a 5% tolerance"
    rows[0]["kl"] = rows[1]["kl"] = None
    assert cheapest_passing(rows[:2], 0.10) == "q6", "without KL the tie goes to the lower cost"


def test_pareto_front_on_a_known_table():
    pts = [("fp32", 10.0, 0.0), ("int8", 5.0, 0.004), ("bf16", 7.0, 0.01), ("int4", 3.0, 0.2),
           ("naive", 4.0, 1.6), ("tie", 5.0, 0.004)]
    assert pareto_front(pts) == ["int4", "int8", "tie", "fp32"], "bf16 and naive are dominated; ties stay"


def _synthetic(n_parts: int, seed: int):
    rng = random.Random(seed)
    sens, cost = {}, {}
    for i in range(n_parts):
        part = f"layers.{i // 2}.{'self_attn' if i % 2 == 0 else 'mlp'}"
        s4 = rng.uniform(0.001, 0.05)
        sens[part] = {"int4": s4, "int8": s4 * rng.uniform(0.01, 0.1)}
        base = rng.uniform(50, 200)
        cost[part] = {"int4": base * 0.3, "int8": base * 0.45, "fp32": base}
    return sens, cost


def test_greedy_path_goes_from_cheapest_to_fp32_monotonically():
    sens, cost = _synthetic(8, 0)
    path = greedy_path(sens, cost)
    assert set(path[0].assign.values()) == {"int4"}, "starts with every part at the cheapest precision"
    assert set(path[-1].assign.values()) == {"fp32"}, "ends with every part at fp32"
    assert len(path) == 1 + 2 * len(sens), "one upgrade per step, two per part"
    costs, kls = [p.cost for p in path], [p.kl for p in path]
    assert costs == sorted(costs), "cost rises along the path"
    assert kls == sorted(kls, reverse=True), "predicted KL falls along the path"


def test_greedy_path_points_are_on_the_brute_force_front():
    """On 5 parts (3^5 = 243 assignments), every greedy point is Pareto-optimal in (cost, KL)."""
    sens, cost = _synthetic(5, 1)
    everything = []
    for combo in itertools.product(ORDER, repeat=len(sens)):
        assign = dict(zip(sens, combo))
        everything.append(predict(assign, sens, cost))
    for p in greedy_path(sens, cost):
        better = [c for c, k in everything if c < p.cost - 1e-9 and k < p.kl - 1e-12]
        assert not better, f"greedy point (cost {p.cost:.1f}, KL {p.kl:.4f}) is dominated by {better[:1]}"


def test_bisect_finds_the_cheapest_passing_point_in_few_evaluations():
    sens, cost = _synthetic(30, 2)
    path = merge_path(greedy_path(sens, cost), rule_points(sens, cost))
    for true_scale in (0.5, 1.0, 2.0, 4.0):  # how wrong the additive prediction is
        gate = 0.1
        calls = []

        def evaluate(point: Point):
            calls.append(point)
            kl = point.kl * true_scale
            return kl <= gate, kl, {}

        best, trials = bisect_path(path, evaluate, gate, margin=0.6, max_evaluations=12)
        truth = next(i for i, p in enumerate(path) if p.kl * true_scale <= gate)
        assert best == truth, f"scale {true_scale}: found index {best}, cheapest passing is {truth}"
        assert len(calls) <= 9, f"scale {true_scale}: {len(calls)} evaluations for a path of {len(path)}"


def test_bisect_stops_at_the_budget_and_reports_none_when_nothing_passed():
    sens, cost = _synthetic(10, 3)
    path = greedy_path(sens, cost)
    best, trials = bisect_path(path, lambda p: (False, 9.9, {}), 0.01, 0.6, max_evaluations=2)
    assert best is None and len(trials) == 2, "two failing probes, no pick"


def test_rule_candidates_join_the_path_only_when_not_dominated():
    sens, cost = _synthetic(6, 4)
    path = greedy_path(sens, cost)
    merged = merge_path(path, rule_points(sens, cost))
    kls = [p.kl for p in merged]
    assert kls == sorted(kls, reverse=True), "merged path stays monotone"
    assert start_index(merged, kl_gate=1e9, margin=0.5) == 0, "a loose gate starts at the cheapest point"


@pytest.mark.parametrize("margin", [0.3, 0.6, 1.0])
def test_start_index_respects_the_margin(margin):
    sens, cost = _synthetic(12, 5)
    path = greedy_path(sens, cost)
    i = start_index(path, 0.05, margin)
    assert path[i].kl <= margin * 0.05 or i == len(path) - 1, "the start point is predicted within the margin"
    assert i == 0 or path[i - 1].kl > margin * 0.05, "and it is the cheapest such point"


def test_mixed_cost_floor_is_the_cheapest_mix_share_of_the_int8_cost():
    from costopt.search.frontier import mixed_cost_floor

    sens, cost = _synthetic(6, 2)
    path = greedy_path(sens, cost)
    all_int8 = sum(c["int8"] for c in cost.values())
    floor = mixed_cost_floor(path, 2.0, cost)
    assert floor == pytest.approx(2.0 * path[0].cost / all_int8), "all-INT4 is the path's cheapest point"
    assert floor < 2.0, "INT4 GEMMs are predicted cheaper than INT8 ones, so the floor is below INT8's cost"


def _search_ws(tmp_path, costs: dict[str, float], passed: dict[str, bool]):
    """A workspace holding what the search reads: bench and quality records, a sensitivity scan."""
    from costopt.storage.layout import Workspace, write_json

    ws = Workspace(tmp_path)
    for name, c in costs.items():
        write_json(ws.bench_file(name), {"cost_per_1m_requests_usd": c})
        write_json(ws.quality_file(name), {"gate": {"passed": passed[name]}})
    sens, cost = _synthetic(4, 3)
    write_json(ws.sensitivity_dir / "sensitivity.json",
               {"enabled": True, "scan": {"parts": sens}, "costs": {"parts": cost}})
    return ws


@pytest.mark.parametrize("q8_cost, q8_passed, skipped", [
    (0.10, True, True),    # a passing llama.cpp Q8_0 at half the torch INT8 cost: no mix can beat it
    (0.19, True, False),   # just under INT8's cost: a mix with INT4 parts might be cheaper, search on
    (0.10, False, False),  # it failed its gates: the cheapest passing one is INT8 itself, search on
])
def test_search_skips_mixed_candidates_only_when_none_can_win(tmp_path, q8_cost, q8_passed, skipped):
    from pathlib import Path

    from costopt.params import load_params
    from tasks.search import _mixed_cannot_win

    names = ["int8_weight_only", "gguf_q8_0"]
    ws = _search_ws(tmp_path, {"int8_weight_only": 0.20, "gguf_q8_0": q8_cost},
                    {"int8_weight_only": True, "gguf_q8_0": q8_passed})
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile="quick")
    why = _mixed_cannot_win(params, ws, names)
    assert (why is not None) == skipped, why
    if skipped:
        assert "gguf_q8_0" in why and "int8_weight_only" in why, f"the reason names both candidates: {why}"
