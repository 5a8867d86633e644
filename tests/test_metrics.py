"""Quality metrics against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from costopt.evaluation.cost import cost_per_1m_requests
from costopt.evaluation.metrics import (Reference, accuracy_and_retention, bootstrap_ci, mean_over_units, ppl_ratio,
                             quantile_over_units, token_kl, token_nll, top1_match)


def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2, 5, dtype=torch.float64)), "KL(p||p) must be 0"
    assert top1_match(logits, logits).mean().item() == 1.0, "identical logits must agree everywhere"


def test_kl_matches_hand_computation():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p/q) = 0.1733 nats
    got = token_kl(p.log(), q.log()).item()
    assert got == pytest.approx(expected, abs=1e-9), f"KL should be {expected}, got {got}"
    assert token_kl(p.log() + 3.0, q.log() - 1.0).item() == pytest.approx(expected, abs=1e-9), \
        "KL must not depend on a constant shift of the logits"


def test_kl_is_asymmetric_and_positive():
    p, q = torch.tensor([0.9, 0.1]).log(), torch.tensor([0.5, 0.5]).log()
    assert token_kl(p, q).item() > 0 and token_kl(q, p).item() > 0, "KL of different distributions is positive"
    assert token_kl(p, q).item() != pytest.approx(token_kl(q, p).item()), "KL(p||q) != KL(q||p) here"


def test_top1_and_nll():
    ref = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])
    var = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]])
    assert top1_match(ref, var).tolist() == [[1.0, 0.0]], "second position's argmax differs"
    uniform = torch.zeros(1, 4)
    assert token_nll(uniform, torch.tensor([2])).item() == pytest.approx(math.log(4)), "uniform NLL is log V"


def test_token_weighted_mean_and_ci_cover_the_value():
    est = mean_over_units([1.0, 3.0, 2.0, 6.0], [1, 1, 2, 2], resamples=500)
    assert est.value == pytest.approx(12.0 / 6.0), "mean is total / tokens, not the mean of means"
    assert est.lo <= est.value <= est.hi, f"CI {est.lo, est.hi} must contain {est.value}"


def test_bootstrap_ci_is_deterministic_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    ci_small = bootstrap_ci(lambda i: float(small[i].mean()), len(small), 400, seed=3)
    ci_large = bootstrap_ci(lambda i: float(large[i].mean()), len(large), 400, seed=3)
    assert ci_small == bootstrap_ci(lambda i: float(small[i].mean()), len(small), 400, seed=3), "same seed, same CI"
    assert (ci_large[1] - ci_large[0]) < (ci_small[1] - ci_small[0]), "more data must give a narrower CI"


def test_quantile_over_units():
    units = [np.arange(100, dtype=float), np.arange(100, 200, dtype=float)]
    est = quantile_over_units(units, 0.99, resamples=100)
    assert est.value == pytest.approx(np.quantile(np.arange(200), 0.99)), "p99 of the pooled tokens"


def test_ppl_ratio_and_retention():
    est, base, var = ppl_ratio([10.0, 20.0], [10.0, 20.0], [10, 20], resamples=100)
    assert est.value == pytest.approx(1.0) and base == pytest.approx(math.e), "identical NLL -> ratio 1, ppl e"
    est, _, _ = ppl_ratio([10.0], [10.0 + 10 * math.log(1.1)], [10], resamples=10)
    assert est.value == pytest.approx(1.1), "NLL up by log(1.1) per token -> ppl ratio 1.1"
    acc, ret = accuracy_and_retention([1, 1, 1, 1, 0], [1, 1, 0, 1, 0], resamples=200)
    assert acc.value == pytest.approx(0.6) and ret.value == pytest.approx(0.75), "acc 3/5, retention 0.6/0.8"


def test_cost_per_1m_requests():
    assert cost_per_1m_requests(3.6, 1.0) == pytest.approx(1000.0), "3.6 USD/h x 1 s = 1e-3 USD per request"
    with pytest.raises(ValueError, match="non-negative"):
        cost_per_1m_requests(-1.0, 1.0)


def test_reference_matches_the_float64_definition():
    torch.manual_seed(1)
    ref, var = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    r = Reference(ref)
    assert torch.allclose(r.kl(var).double(), token_kl(ref, var), atol=1e-5), "float32 reuse path = definition"
    assert torch.equal(r.top1_match(var), top1_match(ref, var)), "top-1 agreement matches"
