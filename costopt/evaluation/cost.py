"""The cost model: what one million requests cost on a machine billed by the hour.

cost per 1M requests = price per hour / 3600 x machine-seconds per request x 1e6 (DESIGN.md, "Cost").
Machine-seconds per request come from a measured trace (see costopt.evaluation.speed); prices from params.yaml.
"""
from __future__ import annotations


def cost_per_1m_requests(price_per_hour_usd: float, machine_seconds_per_request: float) -> float:
    """USD per 1M requests."""
    if price_per_hour_usd < 0 or machine_seconds_per_request < 0:
        raise ValueError(f"cost: expected non-negative price and seconds, got "
                         f"{price_per_hour_usd!r} USD/h and {machine_seconds_per_request!r} s/request")
    return price_per_hour_usd / 3600.0 * machine_seconds_per_request * 1e6
