"""The online library: always-valid tests hold their level under peeking, the canary judge's verdicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from costopt.online.canary import CanaryConfig, CanaryConfigError, CanaryJudge
from costopt.online.sequential import BettingCS, MixtureSPRT
from costopt.online.shadow import compare


def test_betting_cs_covers_the_mean_at_every_look():
    """Read after every observation, the interval still misses the true mean in at most ~alpha of runs."""
    rng = np.random.default_rng(1)
    misses, runs = 0, 80
    for _ in range(runs):
        cs = BettingCS(alpha=0.1)
        missed = False
        for x in rng.random(300) < 0.3:  # Bernoulli(0.3)
            cs.add(float(x))
            missed |= not (cs.lower <= 0.3 <= cs.upper)
        misses += missed
    assert misses / runs <= 0.1 + 0.06, f"anytime miss rate {misses / runs:.3f} well above alpha 0.1"


def test_betting_cs_bounds_a_rare_rate_after_a_few_hundred():
    cs = BettingCS(alpha=0.05)
    for _ in range(400):
        cs.add(0.0)
    assert cs.upper < 0.015, f"400 error-free requests should bound the rate near 1%, got {cs.upper}"
    assert cs.lower == 0.0


def test_betting_cs_scales_and_clips_to_its_range():
    cs = BettingCS(alpha=0.05, lo=0.0, hi=2.0)
    for _ in range(50):
        cs.add(5.0)  # clipped to 2.0
    assert cs.mean == pytest.approx(2.0) and cs.lower > 1.8, (cs.mean, cs.lower)
    with pytest.raises(ValueError, match="observation"):
        cs.add(float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        BettingCS(alpha=1.5)
    with pytest.raises(ValueError, match="range"):
        BettingCS(lo=1.0, hi=1.0)


def test_msprt_holds_its_level_on_aa_data_under_peeking():
    rng = np.random.default_rng(2)
    rejected, runs = 0, 150
    for _ in range(runs):
        t = MixtureSPRT(tau=0.5, alpha=0.05)
        for a, b in zip(rng.normal(size=400), rng.normal(size=400)):
            t.add("A", a)
            t.add("B", b)
        rejected += t.rejected
    assert rejected / runs <= 0.09, f"A/A false-positive rate {rejected / runs:.3f} at nominal 0.05"


def test_msprt_finds_a_planted_difference_and_bounds_it():
    rng = np.random.default_rng(3)
    t = MixtureSPRT(tau=0.5, alpha=0.05)
    assert t.p_value == 1.0 and t.interval() == (-np.inf, np.inf), "undefined before min_n per arm"
    for a, b in zip(rng.normal(size=600), rng.normal(0.5, 1.0, size=600)):
        t.add("A", a)
        t.add("B", b)
    lo, hi = t.interval()
    assert t.rejected and lo <= 0.5 <= hi and lo > 0, (t.p_value, lo, hi)
    with pytest.raises(ValueError, match="arm"):
        t.add("C", 1.0)
    with pytest.raises(ValueError, match="tau"):
        MixtureSPRT(tau=0)


def _judge(**kw) -> CanaryJudge:
    cfg = CanaryConfig(**{"latency_ms_max": 1000.0, "min_judged": 10, **kw})
    return CanaryJudge(cfg, started_s=0.0)


def test_a_worse_canary_is_rolled_back_after_a_few_judgements():
    j = _judge()
    rng = np.random.default_rng(4)
    for i in range(200):
        j.canary_request(True, 200.0, now_s=i)
        j.judgement(kl_mean=float(rng.uniform(0.5, 2.0)), top1=float(rng.uniform(0.3, 0.6)))
        v = j.decide(now_s=i)
        if v.state != "running":
            break
    assert v.state == "rollback" and "gate failed" in v.reason and ("kl" in v.reason or "top1" in v.reason), v
    assert j.judged <= 15, f"a canary this far off should go within ~15 judgements, took {j.judged}"


def test_an_equal_canary_is_promoted_and_only_after_min_judged():
    j = _judge(min_judged=30)
    rng = np.random.default_rng(5)
    states = []
    for i in range(3000):
        j.canary_request(True, float(rng.uniform(100, 400)), now_s=i)
        j.judgement(kl_mean=float(rng.exponential(0.004)), top1=float(rng.uniform(0.95, 1.0)))
        v = j.decide(now_s=i)
        states.append(v.state)
        if v.state != "running":
            break
    assert v.state == "promote", v
    assert j.judged >= 30, "promoted before min_judged"
    assert set(v.evidence["gates"]) == {"kl", "top1", "errors", "latency"}
    assert all(g["status"] == "pass" for g in v.evidence["gates"].values()), v.evidence


def test_errors_and_missing_metrics_roll_back():
    j = _judge()
    for i in range(100):
        j.canary_request(i % 2 == 0, 100.0, now_s=i)  # half of its requests fail
        j.judgement(0.001, 1.0)
        if j.decide(i).state != "running":
            break
    v = j.decide(100)
    assert v.state == "rollback" and "errors" in v.reason, v
    j = _judge(missing_after=20, shadow_sample=0.5)
    for i in range(20):
        j.canary_request(True, 100.0, now_s=i)  # judgements never land
    v = j.decide(20)
    assert v.state == "rollback" and "metrics missing" in v.reason, v
    j = _judge(max_idle_s=60)
    j.canary_request(True, 100.0, now_s=0)
    assert j.decide(30).state == "running"
    assert "no canary request" in j.decide(61).reason


def test_an_undecided_canary_is_rolled_back_at_its_limit():
    j = _judge(max_requests=50)
    for i in range(50):
        j.canary_request(True, 100.0, now_s=i)
        j.judgement(0.05, 0.9)  # right at the gates: never decided
    v = j.decide(50)
    assert v.state == "rollback" and "undecided" in v.reason, v


def test_the_latency_bound_comes_from_the_current_variant():
    j = CanaryJudge(CanaryConfig(latency_reference=10, latency_tolerance=0.5), started_s=0.0)
    for _ in range(5):
        j.canary_request(True, 900.0, now_s=0)  # held until the bound is known
    assert j.cs["latency"].n == 0
    for _ in range(10):
        j.current_request(100.0)
    assert j.latency_bound_ms == pytest.approx(150.0)
    assert j.cs["latency"].n == 5 and j.cs["latency"].mean == 1.0, "held latencies judged once the bound is known"


def test_canary_config_errors_name_the_field():
    with pytest.raises(CanaryConfigError, match="canary.share"):
        CanaryConfig(share=1.5)
    with pytest.raises(CanaryConfigError, match="canary.kl_max"):
        CanaryConfig(kl_max=2.0, kl_clip=1.0)
    with pytest.raises(CanaryConfigError, match="missing_after"):
        CanaryConfig(shadow_sample=0.05, missing_after=20)
    with pytest.raises(CanaryConfigError, match="unknown field"):
        CanaryConfig.from_dict({"shares": 0.1})
    assert CanaryConfig.from_dict(CanaryConfig().to_dict()) == CanaryConfig()


def test_shadow_compare():
    a = torch.randn(7, 50)
    kl, top1 = compare(a, a.clone())
    assert kl == pytest.approx(0.0, abs=1e-9) and top1 == 1.0
    kl, top1 = compare(a, -a)
    assert kl > 0.5 and top1 == 0.0, (kl, top1)
    with pytest.raises(ValueError, match="shape"):
        compare(a, a[:3])
    with pytest.raises(FloatingPointError):
        compare(a, torch.full_like(a, float("nan")))


# -- A/B tests -------------------------------------------------------------------------------------------
from costopt.online.abtest import ABConfig, ABTest, Metric, simulate  # noqa: E402
from costopt.online.drift import mmd_test  # noqa: E402


def _ab(rng, n, cost_b=1.0, quality_b=0.95) -> dict:
    test = ABTest(ABConfig("cost", (Metric("cost", "lower", 0.1), Metric("quality", "higher", 0.02, 0.01)),
                           min_samples=50), "a", "b")
    for _ in range(n):
        test.add("A", {"cost": rng.normal(1.0, 0.3), "quality": rng.normal(0.95, 0.03)})
        test.add("B", {"cost": rng.normal(cost_b, 0.3), "quality": rng.normal(quality_b, 0.03)})
    return test.decision()


def test_ab_says_undecided_with_too_few_samples_never_winner():
    d = _ab(np.random.default_rng(6), 30, cost_b=0.5)
    assert d["decision"] == "undecided" and "too few samples" in d["reason"], d


def test_ab_picks_a_cheaper_equal_challenger_and_refuses_a_worse_one():
    d = _ab(np.random.default_rng(7), 400, cost_b=0.8)
    assert d["decision"] == "B", d
    assert d["metrics"]["cost"]["verdict"] == "B better" and d["metrics"]["quality"]["verdict"] == "B within margin"
    d = _ab(np.random.default_rng(8), 400, cost_b=0.8, quality_b=0.90)
    assert d["decision"] == "A" and "quality" in d["reason"], d
    d = _ab(np.random.default_rng(9), 400, cost_b=1.0)
    assert d["decision"] == "undecided", f"equal arms must not produce a winner: {d}"


def test_ab_simulation_shows_peeking_inflation_and_msprt_level():
    s = simulate(runs=120, n=400, effect=0.3, tau=0.2, look_every=10, seed=1)
    assert s["aa"]["msprt_reject_rate"] <= 0.08, s["aa"]
    assert s["aa"]["z_peeked_reject_rate"] > 0.12, f"a peeked z-test should inflate its level: {s['aa']}"
    assert s["planted"]["msprt_reject_rate"] >= 0.8, s["planted"]


def test_ab_config_errors_name_the_field():
    with pytest.raises(ValueError, match="primary"):
        ABConfig("cost", (Metric("quality", "higher", 0.1),))
    with pytest.raises(ValueError, match="better"):
        Metric("cost", "smaller", 0.1)


# -- drift -----------------------------------------------------------------------------------------------
def test_mmd_finds_a_planted_shift_and_not_noise():
    rng = np.random.default_rng(10)
    ref = rng.normal(size=(200, 32))
    same = mmd_test(ref, rng.normal(size=(120, 32)), alpha=0.01, permutations=200)
    shifted = rng.normal(size=(120, 32))
    shifted[:, :4] += 0.8
    moved = mmd_test(ref, shifted, alpha=0.01, permutations=200)
    assert not same.drifted and same.p_value > 0.01, same
    assert moved.drifted and moved.p_value < 0.01, moved
    with pytest.raises(ValueError, match="at least 5 rows"):
        mmd_test(ref, ref[:3])
    with pytest.raises(ValueError, match="dim"):
        mmd_test(ref, rng.normal(size=(10, 8)))


def test_verdict_reasons_read_as_plain_numbers():
    j = _judge()
    for i in range(30):
        j.canary_request(True, 100.0, now_s=i)
        j.judgement(0.9, 0.5)
    v = j.decide(30)
    assert v.state == "rollback" and "np.float" not in v.reason and "kl [0." in v.reason, v.reason


# -- quality drift on live traffic (costopt.online.livequality) ------------------------------------------------
def _live(kl=(0.010, 0.008, 0.012), p99=(0.1, 0.08, 0.12), top1=(0.97, 0.96, 0.98)):
    return {m: {"value": v[0], "ci95": [v[1], v[2]]} for m, v in
            (("kl_mean", kl), ("kl_p99", p99), ("top1_agreement", top1))}


def test_quality_judge_needs_the_whole_interval_past_the_gate():
    from costopt.online.livequality import judge
    from costopt.params import Gates

    gates = Gates()  # kl_mean <= 0.02, kl_p99 <= 0.5, top1 >= 0.93
    assert judge(_live(), None, gates) == ("no drift", [])
    decision, reasons = judge(_live(kl=(0.05, 0.03, 0.07)), None, gates)
    assert decision == "drift" and len(reasons) == 1 and reasons[0].startswith("kl_mean fails its gate"), reasons
    assert judge(_live(kl=(0.021, 0.015, 0.027)), None, gates)[0] == "no drift", \
        "an interval straddling the gate is not evidence of drift"
    decision, reasons = judge(_live(top1=(0.90, 0.88, 0.92)), None, gates)
    assert decision == "drift" and reasons[0].startswith("top1_agreement"), reasons


def test_quality_judge_flags_a_significant_drop_from_the_validated_value():
    from costopt.online.livequality import judge
    from costopt.params import Gates

    validated = {"kl_mean": {"value": 0.006, "ci95": [0.005, 0.007]}}
    decision, reasons = judge(_live(kl=(0.012, 0.010, 0.015)), validated, Gates())
    assert decision == "drift" and "worse on live traffic than when validated" in reasons[0], reasons
    assert judge(_live(kl=(0.008, 0.0065, 0.010)), validated, Gates())[0] == "no drift", "overlapping intervals"


def test_logged_conversations_are_checked_and_sampled_reproducibly():
    from costopt.online.livequality import conversation, sample_conversations

    assert conversation({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    assert conversation({"messages": [{"role": "user", "content": "a", "extra": 1}]}) == \
        [{"role": "user", "content": "a"}]
    for bad in ({"prompt": "  "}, {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
                {"messages": [{"role": "user", "content": 3}]}, {"messages": ["hi"]}, {"latency_ms": 3}):
        assert conversation(bad) is None, bad
    records = [{"prompt": f"q{i % 40}"} for i in range(200)] + [{"messages": "junk"}]
    first, again = sample_conversations(records, 10, seed=1), sample_conversations(records, 10, seed=1)
    assert first == again and len(first) == 10 and len({c[0]["content"] for c in first}) == 10, first
    assert len(sample_conversations(records, 1000)) == 40, "duplicates count once"


def test_paired_quality_guard_verdicts():
    """B's per-prompt KL against A's on the same prompts: a clear loss is "B worse", a tie "within margin",
    a noisy small sample "open"; mismatched units are refused."""
    import numpy as np
    import pytest

    from costopt.online.abtest import paired_guard

    rng = np.random.default_rng(0)
    a = list(rng.uniform(0.002, 0.01, 40))
    worse = paired_guard(a, [x + 0.02 for x in a], margin=0.005)
    assert worse["verdict"] == "B worse" and worse["interval"][0] > 0.005 and worse["n"] == 40, worse
    same = paired_guard(a, [x + rng.normal(0, 0.001) for x in a], margin=0.005)
    assert same["verdict"] == "B within margin", same
    noisy = paired_guard(a[:12], [x + rng.normal(0.004, 0.02) for x in a[:12]], margin=0.005)
    assert noisy["verdict"] == "open", noisy
    assert paired_guard(a[:9], a[:9], margin=0.005)["verdict"] == "open", "fewer than 10 pairs decide nothing"
    assert paired_guard([0.1] * 20, [None] + [0.1] * 19, margin=0.0)["n"] == 19, "unmeasured prompts are left out"
    higher = paired_guard([0.9] * 20, [0.8] * 20, margin=0.05, better="higher")
    assert higher["verdict"] == "B worse", higher
    with pytest.raises(ValueError, match="must pair up"):
        paired_guard([0.1, 0.2], [0.1], margin=0.0)


def test_quality_guard_overrides_a_cost_win():
    from costopt.online.abtest import with_guard

    win = {"a": "int8", "b": "q4", "decision": "B", "reason": "q4 is better on ms_per_token", "metrics": {}}
    open_ = {"verdict": "open"}
    assert with_guard(win, "kl", {"verdict": "B within margin"})["decision"] == "B"
    held = with_guard(win, "kl", open_)
    assert held["decision"] == "undecided" and "not proven within its margin" in held["reason"], held
    lost = with_guard(win, "kl", {"verdict": "B worse"})
    assert lost["decision"] == "A" and lost["reason"] == "q4 is worse on kl" and lost["metrics"]["kl"], lost
    few = {**win, "decision": "undecided", "reason": "too few samples: 3 (A) and 4 (B) of the 200 per arm required"}
    assert with_guard(few, "kl", {"verdict": "B worse"})["decision"] == "undecided", "sample sizes come first"


def test_paired_msprt_keeps_its_level_under_peeking_and_gains_from_pairing():
    """A/A pairs read after every pair: the paired mSPRT rejects in at most about alpha of the runs. With
    prompt-to-prompt spread 10x the arms' difference, pairing finds a difference the unpaired test misses."""
    import numpy as np
    import pytest

    from costopt.online.sequential import MixtureSPRT, PairedMixtureSPRT

    rng = np.random.default_rng(3)
    false = 0
    for _ in range(300):
        t = PairedMixtureSPRT(tau=0.5, alpha=0.05)
        unit = rng.normal(0, 1, 150)
        for u, e1, e2 in zip(unit, rng.normal(0, 1, 150), rng.normal(0, 1, 150)):
            t.add_pair(u + e1, u + e2)
            false += t.rejected
            if t.rejected:
                break
    assert false / 300 <= 0.07, f"A/A rejections {false / 300:.3f} above alpha 0.05"
    unit = rng.normal(0, 1.0, 60)
    paired, unpaired = PairedMixtureSPRT(tau=0.1, alpha=0.05), MixtureSPRT(tau=0.1, alpha=0.05)
    for u in unit:
        x, y = u + rng.normal(0, 0.02), u + 0.1 + rng.normal(0, 0.02)
        paired.add_pair(x, y)
        unpaired.add("A", x)
        unpaired.add("B", y)
    assert paired.rejected and paired.interval()[0] > 0.05, paired.interval()
    assert not unpaired.rejected, "the unit spread hides the difference without pairing"
    with pytest.raises(TypeError, match="add_pair"):
        paired.add("A", 1.0)
