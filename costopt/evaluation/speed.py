"""Speed measurements: batch-1 decode, batched throughput, the served cost and the naive batch-1 trace.

The cost of a record is its served cost (`costopt.evaluation.served`: the serving trace replayed on
the continuous-batching engine deploy serves it with); the fp32 baseline also times the naive path
(one request at a time, batch 1, no cache) on a fixed chat trace, the cost every figure is compared to.

Every torch variant is timed with the same lean greedy loop (`greedy_decode`): one prefill, then one
forward per new token with a KV cache, no sampling and no stopping criteria. It is HF `generate` with
the per-token Python bookkeeping removed, so the figures compare kernels, not framework overhead.
A variant on another runtime (llama.cpp, the compiled torch step) is timed through its
continuous-batching engine (`EngineDecoder`) under the same contract: the same prompts, one prefill
step, then one step per new token for the whole batch, exactly `new_tokens` tokens (no EOS stop).

    record = measure(model, tok, prompts, trace, cfg=params.benchmark, price_per_hour=0.1)
    record = measure(EngineDecoder(engine), tok, prompts, ...)   # any runtime's engine
"""
from __future__ import annotations

import hashlib
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from costopt.evaluation.cost import cost_per_1m_requests

TRACE_NAME = "chat-v1"  # bump when the trace's construction changes
TRACE_NEW_TOKENS = (8, 16, 32, 48, 64)  # answer lengths a chat trace draws from, tokens


@dataclass(frozen=True)
class TraceRequest:
    prompt: str
    max_new_tokens: int


def build_trace(prompts: Sequence[str], n: int, seed: int, cap_tokens: int) -> list[TraceRequest]:
    """A fixed request trace: `n` prompts drawn with their answer lengths, a pure function of the seed."""
    if not prompts:
        raise ValueError("benchmark: the held-out prompt set is empty; run the evaldata phase first")
    rng = random.Random(seed)
    lengths = [t for t in TRACE_NEW_TOKENS if t <= cap_tokens] or [cap_tokens]
    return [TraceRequest(rng.choice(list(prompts)), rng.choice(lengths)) for _ in range(n)]


def trace_fingerprint(trace: Sequence[TraceRequest]) -> str:
    blob = json.dumps([[r.prompt, r.max_new_tokens] for r in trace], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def device_label(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {threads} threads)"


def encode(tok: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Chat-template each prompt and left-pad the batch (decode appends on the right)."""
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True) for t in texts]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(rendered, return_tensors="pt", padding=True)


class EngineDecoder:
    """A runtime's continuous-batching engine behind `greedy_decode`'s contract.

    The engine must be built with no EOS ids, so every sequence runs exactly `new_tokens` tokens."""

    def __init__(self, engine: Any) -> None:
        if getattr(engine, "eos_token_ids", None):
            raise ValueError("EngineDecoder: build the engine with eos_token_ids=[] so every row runs to length")
        self.engine = engine

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               new_tokens: int) -> tuple[torch.Tensor, float, float]:
        from costopt.runtimes.engine import SamplingParams

        rows = [ids[keep.bool()].tolist() for ids, keep in zip(input_ids, attention_mask)]  # unpadded
        params = SamplingParams(max_new_tokens=new_tokens)
        out: dict[int, list[int]] = {i: [] for i in range(len(rows))}
        for i, r in enumerate(rows):
            self.engine.add(i, r, params)
        t0 = time.perf_counter()
        for ev in self.engine.step():  # prefill: every row's first token
            out[ev.seq_id].append(ev.token_id)
        t1 = time.perf_counter()
        while self.engine.has_work():
            for ev in self.engine.step():
                out[ev.seq_id].append(ev.token_id)
        t2 = time.perf_counter()
        return torch.tensor([out[i] for i in range(len(rows))]), t1 - t0, t2 - t1


@torch.inference_mode()
def greedy_decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decode. ids/mask [B, T] -> (new ids [B, new_tokens], prefill s, decode s)."""
    if callable(getattr(model, "decode", None)) and not isinstance(model, torch.nn.Module):
        return model.decode(input_ids, attention_mask, new_tokens)  # a runtime's own loop (EngineDecoder, ...)
    mask = attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]: left padding shifts positions
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1)  # [B]
    t1 = time.perf_counter()
    cache, last = out.cache, pos[:, -1]
    generated = [nxt]
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                    cache=cache, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1)
        generated.append(nxt)
    t2 = time.perf_counter()
    return torch.stack(generated, dim=1), t1 - t0, t2 - t1


def decode_tok_s(model: Any, tok: Any, prompts: Sequence[str], new_tokens: int, repeats: int,
                 batch: int = 1) -> float:
    """Median decode speed at `batch` sequences, new tokens/s summed over the batch, prefill excluded."""
    enc = encode(tok, [prompts[i % len(prompts)] for i in range(batch)])
    rates = []
    for _ in range(repeats):
        _, _, dt = greedy_decode(model, enc["input_ids"], enc["attention_mask"], new_tokens)
        rates.append(batch * (new_tokens - 1) / dt)
    return statistics.median(rates)


def trace_latencies(model: Any, tok: Any, trace: Sequence[TraceRequest], progress: Any = None) -> list[float]:
    """Serve the trace one request at a time (batch 1, no cache): end-to-end latency per request, ms."""
    latencies = []
    for req in trace:
        enc = encode(tok, [req.prompt])
        _, pre, dec = greedy_decode(model, enc["input_ids"], enc["attention_mask"], req.max_new_tokens)
        latencies.append((pre + dec) * 1000.0)
        if progress is not None:
            progress.update(1)
    return latencies


def naive_trace(model: Any, tok: Any, prompts: Sequence[str], cfg: Any, progress: Any = None) -> dict[str, Any]:
    """The naive serving path on the fixed chat trace: one request at a time, batch 1, no cache."""
    trace = build_trace(prompts, cfg.trace_requests, cfg.trace_seed, cfg.decode_tokens)
    lat = trace_latencies(model, tok, trace, progress)
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    return {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
            "trace": {"name": TRACE_NAME, "requests": len(trace), "fingerprint": trace_fingerprint(trace),
                      "new_tokens": sum(r.max_new_tokens for r in trace)},
            "machine_seconds_per_request": round(float(np.mean(lat)) / 1000.0, 4)}  # sequential


def measure(model: Any, tok: Any, prompts: Sequence[str], cfg: Any, price_per_hour: float,
            name: str, engine: Any, progress: Any = None, naive: bool = False) -> dict[str, Any]:
    """All speed figures of one model as the speed record of docs/artifacts.md: decode speeds from
    `model` (the lean loop or an EngineDecoder), the served cost from `engine` (the continuous-batching
    engine deploy would serve it with; costopt.evaluation.served), and with `naive` the batch-1 trace."""
    from costopt.evaluation.served import replay, serving_requests

    torch.set_num_threads(cfg.threads)
    warm = encode(tok, [prompts[0]])
    greedy_decode(model, warm["input_ids"], warm["attention_mask"], 4)  # first-call costs (kernel build)
    bs1 = decode_tok_s(model, tok, prompts[:1], cfg.decode_tokens, cfg.decode_repeats)
    bsn = decode_tok_s(model, tok, prompts, cfg.decode_tokens, cfg.decode_repeats, batch=cfg.decode_batch)
    requests, meta = serving_requests(tok, cfg.served_requests, cfg.served_trace_seed)
    served = replay(engine, requests, cfg.served_concurrency, [tok.eos_token_id], progress)
    record = {
        "variant": name,
        "device": device_label(cfg.threads),
        "decode_tok_s_bs1": round(bs1, 3),
        "decode_tok_s_batch": round(bsn, 3),
        "decode_batch": cfg.decode_batch,
        "throughput_tok_s": served["throughput_tok_s"],  # sustained, as served (below)
        "p50_ms": served["p50_ms"], "p95_ms": served["p95_ms"], "p99_ms": served["p99_ms"],
        "served": {**served, "trace": meta},
        "machine_seconds_per_request": served["machine_seconds_per_request"],
        "cost_per_1m_requests_usd": round(cost_per_1m_requests(price_per_hour, served["machine_seconds_per_request"]), 4),
        "slo_p95_ms": cfg.slo_p95_ms,
        "slo_met": served["p95_ms"] <= cfg.slo_p95_ms,
    }
    if naive:
        record["naive"] = naive_trace(model, tok, prompts, cfg, progress)
    return record


def read_bandwidth_gb_s(size_mb: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """This machine's streaming read bandwidth, GB/s: the median time to sum a buffer far larger than
    any cache (torch's reduction runs on every intra-op thread, as a decode step's GEMVs do). Batch-1
    decode must stream every weight once per token, so bandwidth / weight bytes is its roofline."""
    if threads is not None:
        torch.set_num_threads(threads)
    buf = torch.ones(size_mb * (1 << 20) // 4, dtype=torch.float32)  # touched, so every page is resident
    buf.sum()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def roofline_share(tok_s: float, weight_bytes: int, bandwidth_gb_s: float) -> float:
    """Measured batch-1 tok/s as a share of the memory roofline (bandwidth / bytes streamed per token)."""
    return tok_s * weight_bytes / (bandwidth_gb_s * 1e9)
