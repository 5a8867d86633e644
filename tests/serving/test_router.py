"""The precision router's logic, without HTTP: tiers answer through a fake `generate` that records
what each tier was asked to continue from."""
from __future__ import annotations

import asyncio

import pytest

from costopt.routing.router import (Finish, RouterConfig, RouterConfigError, Tier, TierUnavailable, Token, route)


def tiers(threshold: float = 0.5) -> RouterConfig:
    return RouterConfig("routed", (Tier("student", 1.0, threshold), Tier("int4", 2.0, threshold),
                                   Tier("int8", 3.0, None)))


class Fake:
    """Each tier continues any prefix with its own deterministic tokens: tier k emits k*100 + position,
    with the probabilities given per tier (by absolute position in the answer)."""

    def __init__(self, probs: dict[str, list[float]], stop_at: int = 6, down: tuple[str, ...] = ()) -> None:
        self.probs, self.stop_at, self.down = probs, stop_at, down
        self.calls: list[tuple[str, list[int], int]] = []
        self.closed: list[str] = []

    def __call__(self, tier: str, ids: list[int], max_new: int):
        self.calls.append((tier, list(ids), max_new))
        return self._gen(tier, ids, max_new)

    async def _gen(self, tier: str, ids: list[int], max_new: int):
        try:
            if tier in self.down:
                raise TierUnavailable(f"{tier}: 503")
            start = len(ids) - 2  # the prompt is 2 tokens: answer positions continue from the prefix
            base = {"student": 100, "int4": 200, "int8": 300}[tier]
            for k in range(max_new):
                pos = start + k
                if pos == self.stop_at:
                    yield Finish("stop")
                    return
                p = self.probs.get(tier, [])
                yield Token(base + pos, p[pos] if pos < len(p) else 0.99)
            yield Finish("length")
        finally:
            self.closed.append(tier)


def run(config: RouterConfig, fake: Fake, max_tokens: int = 10):
    seen: list[tuple[int, str]] = []

    async def on_token(t: int, tier: str) -> None:
        seen.append((t, tier))
    result = asyncio.run(route(config, [1, 2], max_tokens, fake, on_token))
    return result, seen


def test_a_confident_cheap_tier_answers_alone():
    fake = Fake({"student": [0.9] * 10})
    result, seen = run(tiers(), fake)
    assert result.token_ids == [100, 101, 102, 103, 104, 105] and result.finish_reason == "stop", result
    assert result.tiers == ["student"] and not result.escalations, result
    assert [c[0] for c in fake.calls] == ["student"], f"no other tier was asked: {fake.calls}"
    assert [t for t, _ in seen] == result.token_ids, "every accepted token reached the client, in order"


def test_low_confidence_escalates_and_the_next_tier_continues_from_the_same_prefix():
    fake = Fake({"student": [0.9, 0.9, 0.2], "int4": [0.9] * 10})
    result, seen = run(tiers(), fake)
    # the student's token at position 2 (p = 0.2) is dropped; int4 continues after [100, 101]
    assert result.token_ids == [100, 101, 202, 203, 204, 205], result.token_ids
    assert fake.calls[1] == ("int4", [1, 2, 100, 101], 8), f"int4 prefills prompt + the accepted prefix: {fake.calls}"
    assert result.escalations == [{"from": "student", "to": "int4", "at": 2, "prob": 0.2}], result.escalations
    assert result.tiers == ["student", "int4"] and result.per_tier_tokens == {"student": 2, "int4": 4}
    assert "student" in fake.closed, "the escalated tier's generation is closed (cancelled upstream)"
    assert seen == [(100, "student"), (101, "student"), (202, "int4"), (203, "int4"), (204, "int4"), (205, "int4")]


def test_escalation_can_climb_every_tier_and_the_last_never_leaves():
    fake = Fake({"student": [0.1], "int4": [0.9, 0.1], "int8": [0.0] * 10})
    result, _ = run(tiers(), fake)
    assert [e["to"] for e in result.escalations] == ["int4", "int8"], result.escalations
    assert result.token_ids == [200, 301, 302, 303, 304, 305], "int8 keeps every token, however unsure"
    assert result.finished_on == "int8" and result.finish_reason == "stop"


def test_a_down_tier_is_skipped_and_counted_and_only_the_last_failing_fails():
    fake = Fake({"student": [0.9] * 10}, down=("student",))
    result, _ = run(tiers(), fake)
    assert result.skipped and result.skipped[0]["tier"] == "student" and result.finished_on == "int4", result
    with pytest.raises(TierUnavailable):
        run(tiers(), Fake({}, down=("student", "int4", "int8")))


def test_max_tokens_is_honoured_across_tiers():
    fake = Fake({"student": [0.9, 0.1]}, stop_at=99)
    result, _ = run(tiers(), fake, max_tokens=5)
    assert len(result.token_ids) == 5 and result.finish_reason == "length", result
    assert fake.calls[1][2] == 4, "the next tier may only add what is left of max_tokens"


def test_reference_only_routes_everything_to_the_best_tier():
    config = RouterConfig.reference_only("routed", "int8")
    result, _ = run(config, Fake({"int8": [0.0] * 10}))
    assert result.tiers == ["int8"] and not result.escalations


@pytest.mark.parametrize("data, field", [
    ({"format": 1, "model": "routed", "tiers": [{"name": "a", "cost_per_1m_requests_usd": 1, "threshold": 0.5}]},
     "tiers[0].threshold"),
    ({"format": 1, "model": "routed", "tiers": [{"name": "a", "cost_per_1m_requests_usd": 1, "threshold": 1.5},
                                               {"name": "b", "cost_per_1m_requests_usd": 2}]}, "tiers[0].threshold"),
    ({"format": 1, "model": "routed", "tiers": [{"name": "a", "cost_per_1m_requests_usd": 3, "threshold": 0.5},
                                               {"name": "b", "cost_per_1m_requests_usd": 2}]}, "cheapest first"),
    ({"format": 1, "model": "a", "tiers": [{"name": "a", "cost_per_1m_requests_usd": 1}]}, "model"),
    ({"format": 1, "model": "routed", "tiers": [{"name": "a", "speed": 1}]}, "tiers[0]: unknown"),
    ({"format": 0, "model": "routed", "tiers": []}, "format"),
])
def test_a_bad_router_file_names_the_field(data, field):
    with pytest.raises(RouterConfigError) as exc:
        RouterConfig.from_dict(data)
    assert field in str(exc.value), str(exc.value)


def test_the_file_form_round_trips():
    config = tiers(0.35)
    assert RouterConfig.from_dict(config.to_dict()) == config
