"""Prometheus metrics of the model server, on KServe's own `/metrics` (the default registry).

Counts and latency histograms by variant and priority, queue depth, batch size per step, generated
tokens (tokens/s is `rate(costopt_generated_tokens_total[1m])`), prompt tokens computed and reused from
the prefix cache (hit rate: reused / `costopt_prompt_tokens_total`) and rejections by reason. Labels are
bounded: variants are the served ones, priorities three, outcomes and reasons fixed lists.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = ("ok", "rejected", "expired", "invalid", "cancelled", "error")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)  # s
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # sequences per engine step

REQUESTS = Counter("costopt_requests", "Requests by variant, priority and outcome",
                   ["variant", "priority", "outcome"])
LATENCY = Histogram("costopt_request_latency_seconds", "Request latency, arrival to last token",
                    ["variant", "priority"], buckets=_LATENCY_BUCKETS)
TTFT = Histogram("costopt_time_to_first_token_seconds", "Arrival to first generated token",
                 ["variant", "priority"], buckets=_LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("costopt_queue_depth", "Requests waiting for a batch slot", ["variant"])
RUNNING = Gauge("costopt_running_sequences", "Sequences in the running batch", ["variant"])
BATCH = Histogram("costopt_batch_size", "Sequences per engine step", ["variant"], buckets=_BATCH_BUCKETS)
STEP = Histogram("costopt_step_seconds", "Engine step time", ["variant"],
                 buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
TOKENS = Counter("costopt_generated_tokens", "Tokens generated", ["variant"])
PROMPT_TOKENS = Counter("costopt_prompt_tokens", "Prompt tokens prefilled", ["variant"])
PREFILL_TOKENS = Counter("costopt_prefill_computed_tokens", "Prompt tokens the engine computed", ["variant"])
PREFIX_REUSED = Counter("costopt_prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache",
                        ["variant"])
REJECTIONS = Counter("costopt_rejections", "Requests refused, by reason", ["variant", "priority", "reason"])
LOADED = Gauge("costopt_variant_loaded", "1 while a variant serves", ["variant"])


def observe_step(variant: str, batch: int, seconds: float, tokens: int, prefill: int = 0, reused: int = 0) -> None:
    BATCH.labels(variant).observe(batch)
    STEP.labels(variant).observe(seconds)
    TOKENS.labels(variant).inc(tokens)
    PREFILL_TOKENS.labels(variant).inc(prefill)
    PREFIX_REUSED.labels(variant).inc(reused)


def observe_request(variant: str, priority: str, outcome: str, latency_s: float | None = None,
                    ttft_s: float | None = None) -> None:
    REQUESTS.labels(variant, priority, outcome).inc()
    if latency_s is not None:
        LATENCY.labels(variant, priority).observe(latency_s)
    if ttft_s is not None:
        TTFT.labels(variant, priority).observe(ttft_s)


def observe_queue(variant: str, queued: int, running: int) -> None:
    QUEUE_DEPTH.labels(variant).set(queued)
    RUNNING.labels(variant).set(running)
