"""Served cost: a variant's machine-seconds per request when it is served the way deploy serves it.

The search picks the cheapest variant that passes the gates, and deploy serves that variant with
continuous batching; so its cost must be measured under continuous batching too, not one request at a
time. `replay` drives the variant's continuous-batching engine (the server's, without HTTP: the torch
`Engine`, or the runtime's, llama.cpp with its prefix cache) through a closed loop over the versioned
`serving-v1` request trace (`costopt.workload.trace`): `concurrency` requests in flight, each replaced
by the next trace request as soon as it finishes, greedy, stopping at EOS or `max_tokens`.
Machine-seconds per request = wall time / requests (the machine does nothing else), which is the cost
model's definition (DESIGN.md, "Cost": sustained throughput on a fixed trace, with p95 latency against
the SLO). Latency is add-to-last-token, so it includes the batch's slowdown but no queueing.

Why: a variant's batch-1 speed does not rank its served cost. On the 2-core box (BENCHMARKS.md,
section 4; quick-profile eval data, full benchmark settings) INT8 weight-only on the torch engine served
97 tokens/s against 48 at batch 1 (2.0x), llama.cpp Q8_0 146 against 115 (1.3x, its prefix cache
included): batching helps the runtimes by different factors, so the cheaper one at batch 1 need not
be the cheaper one served.

    reqs, meta = serving_requests(tok, n=32, seed=11)
    record = replay(engine, reqs, concurrency=16, stop_ids=[tok.eos_token_id])

    python -m costopt.evaluation.served --variant gguf_q8_0 --prefix-cache 0 8 32 --rounds 2
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import numpy as np

from costopt.runtimes.slots import SamplingParams

SERVED_MAX_LEN = 1024  # KV positions per sequence in a replay's engine (trace prompt + answer < 400)


def chat_ids(tok: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat with the generation prompt, as the server encodes a chat request."""
    ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def serving_requests(tok: Any, n: int, seed: int) -> tuple[list[tuple[list[int], int]], dict[str, Any]]:
    """The first `n` requests of the serving trace as (prompt ids, max_tokens), and the trace's metadata."""
    from costopt.workload.trace import build_trace, trace_meta

    items = build_trace(n, seed)
    return [(chat_ids(tok, item.messages), item.max_tokens) for item in items], trace_meta(items)


def replay(engine: Any, requests: Sequence[tuple[list[int], int]], concurrency: int, stop_ids: Sequence[int],
           progress: Any = None) -> dict[str, Any]:
    """Closed-loop replay of `requests` on a continuous-batching engine (`SlotEngine` interface).

    Returns requests/s, generated tokens/s, latency percentiles (ms) and machine-seconds per request."""
    if not requests:
        raise ValueError("served replay: no requests")
    if not 1 <= concurrency <= engine.max_batch:
        raise ValueError(f"concurrency: {concurrency}; must be in [1, {engine.max_batch}] (the engine's max_batch)")
    stops = tuple(int(t) for t in stop_ids)
    queue = iter(range(len(requests)))
    started: dict[int, float] = {}
    latencies: list[float] = []  # ms
    generated = 0

    def add(i: int) -> None:
        ids, max_tokens = requests[i]
        engine.add(("served", i), ids, SamplingParams(max_new_tokens=max_tokens, stop_token_ids=stops))
        started[i] = time.perf_counter()

    t0 = time.perf_counter()
    for i in itertools.islice(queue, concurrency):
        add(i)
    while engine.has_work():
        for ev in engine.step():
            generated += ev.token_id is not None
            if ev.finish_reason is None:
                continue
            i = ev.seq_id[1]
            latencies.append((time.perf_counter() - started.pop(i)) * 1000.0)
            if progress is not None:
                progress.update(1)
            nxt = next(queue, None)
            if nxt is not None:
                add(nxt)
    wall = time.perf_counter() - t0
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    return {
        "concurrency": concurrency, "requests": len(requests), "seconds": round(wall, 3), "generated_tokens": generated,
        "throughput_req_s": round(len(requests) / wall, 4), "throughput_tok_s": round(generated / wall, 3),
        "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
        "machine_seconds_per_request": float(f"{wall / len(requests):.6g}"),
        "prefix_reused_tokens": getattr(engine, "reused_tokens", 0),
    }


# -- command line: the served replay of one variant at several prefix-cache sizes, interleaved --------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m costopt.evaluation.served --variant gguf_q8_0 --prefix-cache 0 8 --rounds 2`: replays the
    serving trace on the variant's serving engine once per (round, prefix-cache size), interleaved, and
    prints tokens/s, requests/s and the prompt tokens reused. The workspace must hold the variant."""
    import argparse
    import statistics
    from pathlib import Path

    from transformers import AutoTokenizer

    from costopt.models.variants import read_spec
    from costopt.runtimes.registry import spec_runtime
    from costopt.storage.layout import Workspace

    p = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    p.add_argument("--workspace", type=Path, default=Path("."))
    p.add_argument("--variant", required=True, help="a variant folder of the workspace on a prefix-cache runtime")
    p.add_argument("--prefix-cache", type=int, nargs="+", default=[0, 8], help="entries kept (0 = off)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=11, help="the serving trace's seed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    ws = Workspace(args.workspace.resolve())
    spec = read_spec(ws, args.variant)
    runtime, _ = spec_runtime(spec)
    if not runtime.prefix_cache:
        p.error(f"--variant: {args.variant} runs on {runtime.name}, which keeps no prefix cache")
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    requests, meta = serving_requests(tok, args.requests, args.seed)
    prompt_tokens = sum(len(ids) for ids, _ in requests)
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in args.prefix_cache}
    for r in range(args.rounds):
        for k in args.prefix_cache:
            engine = runtime.engine(ws, spec, eos_token_ids=[], max_batch=args.concurrency, max_len=SERVED_MAX_LEN,
                                    threads=args.threads, prefix_cache=k)
            runs[k].append(replay(engine, requests, args.concurrency, [tok.eos_token_id]))
            engine.close()
            print(f"round {r + 1} prefix_cache={k}: {runs[k][-1]['throughput_tok_s']:.1f} tok/s", flush=True)
    print(f"{args.variant}, {meta['name']} ({args.requests} requests, {prompt_tokens} prompt tokens), "
          f"concurrency {args.concurrency}, {args.threads} threads, median of {args.rounds} rounds:")
    for k, rs in runs.items():
        med = lambda key: statistics.median(x[key] for x in rs)  # noqa: E731
        print(f"  prefix_cache={k:3d}: {med('throughput_tok_s'):7.1f} tok/s {med('throughput_req_s'):6.2f} req/s "
              f"p95 {med('p95_ms'):8.0f} ms, prompt tokens reused {rs[0]['prefix_reused_tokens'] / prompt_tokens:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
