"""Precision routing with escalation: a request starts on the cheapest tier and moves up when that tier
is unsure, the next tier continuing from the same tokens, so the client sees one answer.

Tiers are deployed variants ordered by measured cost (cheapest first; e.g. the distilled student, an
INT4, the INT8 pick). The last tier is the reference (the best passing tier); it never escalates. Every
other tier has a threshold on its confidence in each token it generates: the probability its own
distribution gives the greedy token (the top-1 probability; `costopt_entropy` is logged beside it).
The first token below the threshold is dropped and the next tier continues from the prompt plus the
tokens accepted so far (it prefills them: `prompt` as token ids on /v1/completions), so the answer's
tokens are the cheap tier's prefix followed by the next tier's continuation. The first tokens act as
the difficulty probe: a prompt the cheap tier finds hard escalates on its first token, before any text
reaches the client.

Only greedy requests are routed (temperature 0): the thresholds were fitted on greedy answers
(`tasks.route`), and a sampled token's probability says little about the tier's knowledge.

A tier that is down or overloaded (connection error, 429, 503) is skipped, counted, and the next one
continues; only the last tier failing fails the request. Without fitted thresholds the router sends
everything to the last tier and says so once in the log.

    config = RouterConfig.from_dict(json.load(open(".costopt/route/router.json")))
    result = await route(config, prompt_ids, max_tokens, generate, on_token)

`generate(tier, ids, max_new)` is the one transport-specific part (HTTP to the predictor in the gateway,
`serving.gateway.server`; the engines themselves in `tasks.route`; a fake in the tests): an async iterator
of `Token`s, ending with a `Finish`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

_log = logging.getLogger(__name__)
FORMAT = 1


class RouterConfigError(ValueError):
    """A router file that cannot be used (the message names the field)."""


class TierUnavailable(Exception):
    """The tier did not answer (down, overloaded, or broke off): the router skips to the next one.
    `status`: the HTTP status it refused with, when it did (429: overloaded or a deadline it would miss)."""

    def __init__(self, message: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class Tier:
    name: str  # the variant, as the predictor serves it
    cost_per_1m_requests_usd: float  # measured (the benchmark phase's served cost)
    threshold: float | None = None  # least top-1 probability a token may have to stay here; None: never leaves

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RouterConfig:
    model: str  # the name clients ask for to be routed (listed by /v1/models beside the variants)
    tiers: tuple[Tier, ...]  # cheapest first; the last is the reference
    fitted: dict[str, Any] = field(default_factory=dict)  # how the thresholds were fitted (tasks.route)

    def __post_init__(self) -> None:
        if not self.model or not isinstance(self.model, str):
            raise RouterConfigError(f"model: expected the routed model's name, got {self.model!r}")
        if not self.tiers:
            raise RouterConfigError("tiers: expected at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise RouterConfigError(f"tiers: names must be unique, got {names}")
        if self.model in names:
            raise RouterConfigError(f"model: {self.model!r} is also a tier's name; pick another routed name")
        for i, t in enumerate(self.tiers):
            last = i == len(self.tiers) - 1
            if last and t.threshold is not None:
                raise RouterConfigError(f"tiers[{i}].threshold: the last tier ({t.name}) never escalates; "
                                        f"expected null, got {t.threshold!r}")
            if not last and (t.threshold is None or not 0.0 <= t.threshold <= 1.0):
                raise RouterConfigError(f"tiers[{i}].threshold: expected a probability in [0, 1] for {t.name}, "
                                        f"got {t.threshold!r}")
            if not isinstance(t.cost_per_1m_requests_usd, (int, float)) or t.cost_per_1m_requests_usd < 0:
                raise RouterConfigError(f"tiers[{i}].cost_per_1m_requests_usd: expected a number >= 0, "
                                        f"got {t.cost_per_1m_requests_usd!r}")
        costs = [t.cost_per_1m_requests_usd for t in self.tiers]
        if costs != sorted(costs):
            raise RouterConfigError(f"tiers: expected cheapest first (by cost_per_1m_requests_usd), got "
                                    f"{[(t.name, t.cost_per_1m_requests_usd) for t in self.tiers]}")

    @property
    def reference(self) -> Tier:
        return self.tiers[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "tiers": [t.to_dict() for t in self.tiers],
                "fitted": self.fitted}

    @classmethod
    def from_dict(cls, data: Any) -> "RouterConfig":
        if not isinstance(data, dict):
            raise RouterConfigError(f"expected a mapping with 'model' and 'tiers', got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise RouterConfigError(f"format: expected {FORMAT}, got {data.get('format')!r}; re-run the route "
                                    f"phase (python -m tasks.route)")
        tiers = data.get("tiers")
        if not isinstance(tiers, list):
            raise RouterConfigError(f"tiers: expected a list, got {tiers!r}")
        out = []
        for i, t in enumerate(tiers):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise RouterConfigError(f"tiers[{i}]: expected a mapping with a 'name', got {t!r}")
            unknown = sorted(set(t) - {"name", "cost_per_1m_requests_usd", "threshold"})
            if unknown:
                raise RouterConfigError(f"tiers[{i}]: unknown field(s) {unknown}")
            out.append(Tier(t["name"], t.get("cost_per_1m_requests_usd", 0.0), t.get("threshold")))
        return cls(str(data.get("model") or ""), tuple(out), dict(data.get("fitted") or {}))

    @classmethod
    def reference_only(cls, model: str, tier: str) -> "RouterConfig":
        """No fitted thresholds: every request goes to `tier` (the best passing one)."""
        return cls(model, (Tier(tier, 0.0, None),), {"note": "no thresholds: everything on the reference tier"})


@dataclass(frozen=True)
class Token:
    id: int
    prob: float  # the generating tier's probability of this (greedy) token
    entropy: float | None = None  # nats, of the tier's whole next-token distribution, when the tier gives it


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length"


@dataclass
class RouteResult:
    token_ids: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)  # every tier that contributed a token (or finished), in order
    per_tier_tokens: dict[str, int] = field(default_factory=dict)
    escalations: list[dict[str, Any]] = field(default_factory=list)  # {"from", "to", "at", "prob"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"tier", "to", "reason", "at"}: down or overloaded
    finish_reason: str = "length"

    @property
    def finished_on(self) -> str:
        return self.tiers[-1] if self.tiers else ""


Generate = Callable[[str, list[int], int], AsyncIterator["Token | Finish"]]
OnToken = Callable[[int, str], Awaitable[None]]


async def route(config: RouterConfig, prompt_ids: Sequence[int], max_tokens: int, generate: Generate,
                on_token: OnToken | None = None) -> RouteResult:
    """Generate up to `max_tokens` greedy tokens for `prompt_ids`, cheapest tier first (module docstring).
    `on_token(id, tier)` is awaited for every accepted token, in order (the stream to the client).
    Raises TierUnavailable only when the last tier cannot answer."""
    result = RouteResult()
    i = 0
    while True:
        tier = config.tiers[i]
        last = i == len(config.tiers) - 1
        remaining = max_tokens - len(result.token_ids)
        if remaining <= 0:
            result.finish_reason = "length"
            return result
        escalated_at: Token | None = None
        stream = generate(tier.name, [*prompt_ids, *result.token_ids], remaining)
        try:
            async for event in stream:
                if isinstance(event, Finish):
                    _visit(result, tier.name)
                    result.finish_reason = event.reason
                    return result
                if not last and event.prob < tier.threshold:
                    escalated_at = event
                    break
                result.token_ids.append(event.id)
                _visit(result, tier.name)
                result.per_tier_tokens[tier.name] = result.per_tier_tokens.get(tier.name, 0) + 1
                if on_token is not None:
                    await on_token(event.id, tier.name)
            else:  # the stream ended without saying why: the tier broke off
                raise TierUnavailable(f"{tier.name}: the stream ended without a finish reason")
        except TierUnavailable as exc:
            if last:
                raise
            result.skipped.append({"tier": tier.name, "to": config.tiers[i + 1].name, "reason": str(exc),
                                   "at": len(result.token_ids)})
            _log.warning("router: tier %s skipped (%s); %s continues", tier.name, exc, config.tiers[i + 1].name)
            i += 1
            continue
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()  # an escalation cancels the cheap tier's generation
        result.escalations.append({"from": tier.name, "to": config.tiers[i + 1].name, "at": len(result.token_ids),
                                   "prob": round(escalated_at.prob, 6)})
        i += 1


def _visit(result: RouteResult, tier: str) -> None:
    if not result.tiers or result.tiers[-1] != tier:
        result.tiers.append(tier)

