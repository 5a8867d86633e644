"""The cost model: what one million requests cost on a machine billed by the hour.

cost per 1M requests = price per hour / 3600 x machine-seconds per request x 1e6 (DESIGN.md, "Cost").
Machine-seconds per request come from a measured trace (see costopt.evaluation.speed); prices from params.yaml
(`cost.price_per_hour_usd` for the CPU machine, `gpu.price_per_hour_usd` per GPU).

A deployment serving a trace at a measured throughput (requests per second, all its concurrent requests
together) spends 1 / throughput machine-seconds per request, so CPU and GPU deployments compare on the
same footing: `served_cost` of each, and `cheaper_deployment` says which costs less per 1M requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def cost_per_1m_requests(price_per_hour_usd: float, machine_seconds_per_request: float) -> float:
    """USD per 1M requests."""
    if price_per_hour_usd < 0 or machine_seconds_per_request < 0:
        raise ValueError(f"cost: expected non-negative price and seconds, got "
                         f"{price_per_hour_usd!r} USD/h and {machine_seconds_per_request!r} s/request")
    return price_per_hour_usd / 3600.0 * machine_seconds_per_request * 1e6


def price_per_hour(params: Any, device: str) -> float:
    """USD per hour of the machine a runtime's engine runs on (`Runtime.device`): the GPU-hour price
    (params.yaml `gpu`) for "cuda", the CPU machine's (`cost`) otherwise."""
    return params.gpu.price_per_hour_usd if device == "cuda" else params.cost.price_per_hour_usd


@dataclass(frozen=True)
class Deployment:
    """One machine class serving a trace, as measured: what an hour of it costs and what it sustained."""
    name: str  # e.g. "cpu" or "h200"
    price_per_hour_usd: float  # the whole machine's: for a GPU deployment, the GPU-hour price x GPUs
    throughput_req_s: float  # requests per second sustained on the trace (all in-flight requests together)
    tokens_per_request: float = 0.0  # mean generated tokens per request on the trace (0: unknown)

    def __post_init__(self) -> None:
        for name in ("price_per_hour_usd", "throughput_req_s", "tokens_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name}: {value!r}; expected a number >= 0")
        if self.throughput_req_s == 0:
            raise ValueError("throughput_req_s: 0; a deployment that served nothing has no cost per request")


def gpu_deployment(name: str, price_per_gpu_hour_usd: float, throughput_req_s: float, gpus: int = 1,
                   tokens_per_request: float = 0.0) -> Deployment:
    """A deployment on `gpus` GPUs billed per GPU-hour (params.yaml `gpu.price_per_hour_usd`)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus: {gpus!r}; expected an integer >= 1")
    return Deployment(name, price_per_gpu_hour_usd * gpus, throughput_req_s, tokens_per_request)


def served_cost(d: Deployment) -> dict[str, Any]:
    """USD per 1M requests (and per 1M generated tokens, when tokens per request is known) of `d`."""
    out: dict[str, Any] = {"name": d.name, "price_per_hour_usd": d.price_per_hour_usd,
                           "throughput_req_s": d.throughput_req_s,
                           "usd_per_1m_requests": cost_per_1m_requests(d.price_per_hour_usd, 1.0 / d.throughput_req_s)}
    if d.tokens_per_request > 0:
        out["usd_per_1m_tokens"] = out["usd_per_1m_requests"] / d.tokens_per_request
    return out


def cheaper_deployment(a: Deployment, b: Deployment) -> dict[str, Any]:
    """Which of two deployments of the same trace costs less per 1M requests, and by how much."""
    costs = [served_cost(a), served_cost(b)]
    low, high = sorted(costs, key=lambda c: c["usd_per_1m_requests"])
    return {"cheaper": low["name"], "ratio": high["usd_per_1m_requests"] / low["usd_per_1m_requests"],
            "deployments": costs}
