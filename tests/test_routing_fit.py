"""Fitting an escalation threshold: a known answer on constructed samples."""
from __future__ import annotations

import pytest

from costopt.routing.fit import TierSample, first_below, fit_threshold, outcome, retention, tier_targets


def test_first_below_is_the_routers_escalation_point():
    assert first_below([0.9, 0.8, 0.3, 0.9], 0.5) == 2 and first_below([0.9, 0.8], 0.5) == 2
    assert first_below([0.4], 0.5) == 0 and first_below([], 0.5) == 0


def test_outcome_counts_the_accepted_tokens_that_disagree_and_the_routed_length():
    s = TierSample(probs=[0.9, 0.9, 0.2, 0.9], agree=[True, False, False, True], reference_len=6)
    assert outcome(s, 0.5) == (1, 6, False, 2), "escalates at 2: one accepted token disagrees; the reference adds 4"
    assert outcome(s, 0.1) == (2, 4, True, 4), "stays: both disagreeing tokens are in the answer"
    assert outcome(s, 0.95) == (0, 6, False, 0), "escalates at once: the reference's own answer"


def test_fit_finds_the_threshold_that_separates_confident_right_from_unsure_wrong():
    """Tokens above 0.6 always agree, tokens below 0.4 never do: the fitted threshold lies in
    (0.4, 0.6], nearly all prompts of the confident kind stay, and the bound holds."""
    confident = [TierSample([0.9, 0.8, 0.7, 0.65], [True] * 4, 4) for _ in range(60)]
    unsure = [TierSample([0.9, 0.35, 0.8], [True, False, True], 3) for _ in range(40)]
    fit = fit_threshold(confident + unsure, target=0.99, resamples=300)
    assert 0.35 < fit["threshold"] <= 0.65, fit["threshold"]
    assert fit["stay"] == pytest.approx(0.6) and fit["useful"], fit
    est, _, share = retention(confident + unsure, fit["threshold"], 300)
    assert share == pytest.approx((60 * 4 + 40 * 1) / (60 * 4 + 40 * 3)), "tokens the tier generated, of all"
    assert est.lo >= 0.99 and est.value == pytest.approx(1.0), est


def test_an_unreachable_target_escalates_everything_and_says_the_tier_is_useless():
    wrong = [TierSample([0.99, 0.99], [False, False], 2) for _ in range(20)]
    fit = fit_threshold(wrong, target=0.97, resamples=100)
    assert fit["stay"] == 0.0 and fit["token_share"] == 0.0 and not fit["useful"], fit


def test_each_cheap_tier_gets_an_equal_share_of_the_allowed_disagreement():
    assert tier_targets(0.97, 1) == pytest.approx(0.97) and tier_targets(0.97, 3) == pytest.approx(0.99)
    with pytest.raises(ValueError):
        tier_targets(0.97, 0)


def test_a_task_verdict_follows_whichever_tier_wrote_the_judged_word():
    from costopt.routing.fit import TaskSample, task_outcome

    s = TaskSample(probs=[0.9, 0.2, 0.8], decided=2, tier_correct=False, reference_correct=True)
    assert task_outcome(s, 0.95) is True, "escalating on the first token: the reference's verdict"
    assert task_outcome(s, 0.1) is False, "the tier keeps every token: its own verdict"
    assert task_outcome(s, 0.5) is False, "the judged word split between the tiers counts as wrong"
    right = TaskSample(probs=[0.9, 0.8, 0.1], decided=2, tier_correct=True, reference_correct=True)
    assert task_outcome(right, 0.5) is True, "an escalation after the judged tokens keeps the tier's verdict"


def test_the_task_fit_escalates_a_confident_wrong_answer():
    from costopt.routing.fit import TaskSample, fit_task_threshold

    good = [TaskSample([0.9, 0.9], 1, True, True)] * 30
    bad = [TaskSample([0.6, 0.9], 1, False, True)] * 10  # wrong, but sure enough to pass a low threshold
    out = fit_task_threshold(good + bad, 0.97, resamples=200)
    assert 0.6 < out["threshold"] <= 0.9, out["threshold"]
    assert out["task_retention"]["ci95"][0] >= 0.97 and out["stay"] == 0.75, out


def test_judged_tokens_count_through_the_first_word_and_the_next_character():
    from costopt.routing.fit import judged_tokens

    assert judged_tokens([" Par", " Paris", " Paris is"], " Paris") == 3
    assert judged_tokens([" 12", " 12."], " 12") == 2
    assert judged_tokens([" 1"], " 12") == 1, "every token when none settles it"
