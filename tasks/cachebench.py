"""`make bench`'s cache bench: the semantic cache's figures for BENCHMARKS.md, all from one run.

Run it in the serving environment (it needs the embedder):
    .venv-serving/bin/python -m tasks.cachebench [--workspace DIR] [--scale 1] [--variant NAME]

1. **Pairs**: the hit rule calibrated on the project's labeled pairs (fit split) and measured on the held
   split: hit rate and false-hit rate with exact (Clopper-Pearson) intervals, overall and per kind,
   and the curve as the threshold moves.
2. **The rule on a long trace**: 3000 `serving-v1` requests through the cache alone (room for all):
   hit rate, and false hits with their exact bound (the gateway run has too few hits to bound it at 1%).
   **Eviction**: the `serving-v1` trace's prompts through the cache alone at a capacity of a quarter of
   its distinct prompts, popularity x decay against plain LRU (same embedder, same rule).
3. **Lookup overhead** on a miss: embedding + index search + verification, per lookup, against an L1
   already holding the trace's entries; and one text's embedding alone per backend (ONNX Runtime INT8,
   fp32, sentence-transformers), interleaved on the same prompts, with the cosine to sentence-transformers.
4. **Through the gateway**: a real predictor and a real gateway on loopback; the trace replayed (closed
   loop, temperature 0) with the cache on and with it off, side by side. A hit is false when it answers
   a fresh request (no earlier request means the same) or serves a repeat or paraphrase an answer other
   than its source's. Cost per 1M requests = price / 3600 / throughput x 1e6, next to the naive path
   (fp32, one request at a time, no cache).
The result goes to artifacts/cache-bench.json; a summary is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from costopt.storage.layout import Workspace, write_json

CONCURRENCY = 4
PARTS = ("pairs", "decision", "eviction", "overhead", "embed", "gateway")
TRACE_SEED = 1234


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def pairs_part(embedder: Any) -> dict[str, Any]:
    from costopt.cache.calibrate import calibrate_on_pairs

    t0 = time.perf_counter()
    out = calibrate_on_pairs(embedder.encode, embedder.phrase_sim)
    out["seconds"] = time.perf_counter() - t0
    return out


def _replay(embedder: Any, setting: dict, items: list, vectors: np.ndarray, capacity: int,
            policy: Any) -> dict[str, Any]:
    """The trace's prompts through the cache alone (trace time as the clock, every miss stored), each hit
    judged as `tasks.loadtest.cache_outcome` judges the gateway's: false when it answers a fresh request or
    serves a repeat or paraphrase the entry of another source."""
    from costopt.cache.calibrate import Setting, clopper_pearson, upper_bound
    from costopt.cache.store import CacheConfig, CacheKey, SemanticCache

    clock = [0.0]
    cache = SemanticCache(embedder.encode, embedder.phrase_sim, embedder.dim,
                          CacheConfig(setting=Setting(**setting), l1_capacity=capacity),
                          policy=policy, clock=lambda: clock[0])
    hits = false = 0
    per_kind: Counter = Counter()
    for it, v in zip(items, vectors):
        clock[0] = it.offset_s
        key = CacheKey("open", "bench", "v", (("max_tokens", it.max_tokens),),
                       json.dumps(list(it.messages[:-1]), sort_keys=True))
        hit = cache.lookup(key, it.prompt, v)
        group = it.source_id or it.id
        if hit is None:
            cache.store(key, it.prompt, {"group": group}, v)
            continue
        hits += 1
        per_kind[it.kind] += 1
        false += it.kind == "fresh" or hit.entry.answer["group"] != group
    n = len(items)
    return {"requests": n, "hits": hits, "hit_rate": hits / n, "hits_by_kind": dict(per_kind), "false_hits": false,
            "false_hit_rate": false / hits if hits else 0.0, "false_hit_upper95": upper_bound(false, hits),
            "false_hit_ci95": list(clopper_pearson(false, hits)),
            "false_hits_per_request_upper95": upper_bound(false, n)}


def decision_part(embedder: Any, setting: dict, n: int) -> dict[str, Any]:
    """The hit rule on a long `serving-v1` trace, cache alone with room for every entry: enough hits for
    the false-hit rate's exact bound to mean something (0 of 299 hits is the least that proves <= 1%)."""
    from costopt.cache.store import DecayPolicy
    from costopt.workload.trace import build_trace

    items = build_trace(n, seed=TRACE_SEED + 7)
    out = _replay(embedder, setting, items, embedder.encode([it.prompt for it in items]), n + 1, DecayPolicy())
    out["kinds"] = dict(Counter(it.kind for it in items))
    return out


def eviction_part(embedder: Any, setting: dict, n: int) -> dict[str, Any]:
    """Hit rate of the decay policy and of LRU at one capacity on the trace, cache alone (no server)."""
    from costopt.cache.store import DecayPolicy, LruPolicy
    from costopt.workload.trace import build_trace

    items = build_trace(n, seed=TRACE_SEED)
    vectors = embedder.encode([it.prompt for it in items])
    capacity = max(10, len({it.source_id or it.id for it in items}) // 4)
    out: dict[str, Any] = {"requests": n, "capacity": capacity}
    for name, policy in (("decay", DecayPolicy(half_life_s=60.0)), ("lru", LruPolicy())):
        r = _replay(embedder, setting, items, vectors, capacity, policy)
        out[name] = {"hit_rate": r["hit_rate"], "hits": r["hits"], "false_hits": r["false_hits"]}
    out["cache_alone"] = "one tenant (the gateway in open mode); keys hold max_tokens and the system message"
    return out


def overhead_part(embedder: Any, setting: dict, n_entries: int, n_lookups: int) -> dict[str, Any]:
    """Per-lookup time on a miss (embed + search + verify), L1 holding `n_entries` entries of one tenant."""
    from costopt.cache.calibrate import Setting
    from costopt.cache.store import CacheConfig, CacheKey, SemanticCache
    from costopt.evaluation.evaldata import chat_pool
    from costopt.workload.trace import build_trace

    cache = SemanticCache(embedder.encode, embedder.phrase_sim, embedder.dim,
                          CacheConfig(setting=Setting(**setting), l1_capacity=n_entries + n_lookups))
    key = CacheKey("bench", "bench", "v", ())
    stored = [it.prompt for it in build_trace(n_entries, seed=TRACE_SEED + 1)]
    for p, v in zip(stored, embedder.encode(stored)):
        cache.store(key, p, {"text": "x"}, v)
    probes = [" ".join(m["content"] for m in msgs if m["role"] == "user")
              for _, msgs in chat_pool(TRACE_SEED)][-n_lookups:]
    times, misses = [], 0
    for p in probes:
        t0 = time.perf_counter()
        hit = cache.lookup(key, p)
        times.append((time.perf_counter() - t0) * 1e3)
        misses += hit is None
    return {"embedder": embedder.identity, "entries": len(cache.entries()), "lookups": len(probes),
            "misses": misses, "p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99), "max_ms": max(times)}


def embed_part(n: int) -> dict[str, Any]:
    """One text embedded at a time (as a lookup does), each backend on the same prompts, interleaved."""
    from costopt.cache.embed import BACKENDS, Embedder
    from costopt.evaluation.evaldata import chat_pool

    probes = [" ".join(m["content"] for m in msgs if m["role"] == "user") for _, msgs in chat_pool(TRACE_SEED)]
    probes = probes[:: max(1, len(probes) // n)][:n]
    models = {b: Embedder(backend=b) for b in BACKENDS}
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for m in models.values():
        m.encode(probes[:3])  # warm
    for p in probes:
        for b, m in models.items():
            t0 = time.perf_counter()
            m.encode([p])
            times[b].append((time.perf_counter() - t0) * 1e3)
    ref = models["torch"].encode(probes)
    out: dict[str, Any] = {"texts": len(probes), "words_max": max(len(p.split()) for p in probes)}
    for b, m in models.items():
        cos = (m.encode(probes) * ref).sum(1)
        out[b] = {"p50_ms": _pct(times[b], 50), "p99_ms": _pct(times[b], 99),
                  "cosine_to_torch_mean": float(cos.mean()), "cosine_to_torch_min": float(cos.min())}
    return out


def gateway_part(ws: Workspace, variant: str, n: int, price: float, logs: Path, calibration: Path,
                 concurrency: int = CONCURRENCY) -> dict[str, Any]:
    from costopt.deploy.processes import start_gateway, start_server
    from tasks.loadtest import cache_outcome, run_load
    from costopt.workload.trace import build_trace

    items = build_trace(n, seed=TRACE_SEED)
    kinds = Counter(it.kind for it in items)
    out: dict[str, Any] = {"trace": {"name": "serving-v1", "requests": n, "seed": TRACE_SEED, "kinds": dict(kinds)},
                           "variant": variant, "concurrency": concurrency}
    import shutil

    shutil.rmtree(logs / "l2", ignore_errors=True)  # a cold cache: an earlier run's entries would answer this one
    pred = start_server(ws.root, ("fp32", variant) if variant != "fp32" else ("fp32",), logs / "predictor.log")
    try:
        for mode, flags in (("cache_on", ["--calibration", str(calibration), "--cache_dir", str(logs / "l2")]),
                            ("cache_off", ["--no_cache"])):
            gw = start_gateway(ws.root, pred.url, (variant,), logs / f"gateway-{mode}.log", flags)
            try:
                res = run_load(gw.url, variant, items, concurrency=concurrency, deadlines=False, progress=True)
            finally:
                gw.stop()
            ok = [r for r in res.records if r.outcome == "ok"]
            tput = len(ok) / res.duration_s
            row = {"duration_s": res.duration_s, "ok": len(ok), "errors": sum(r.outcome == "error" for r in res.records),
                   "throughput_req_s": tput, "p50_ms": _pct([r.latency_ms for r in ok], 50),
                   "p95_ms": _pct([r.latency_ms for r in ok], 95),
                   "cost_per_1m_requests_usd": price / 3600 / tput * 1e6 if tput else None,
                   "cache": dict(Counter(r.cache for r in res.records))}
            if mode == "cache_on":
                row["hit_rate"] = sum((r.cache or "").startswith("hit") for r in ok) / max(1, len(ok))
                row.update(cache_outcome(items, res.records, keyed_tenants=False))  # an open gateway
            out[mode] = row
        naive_items = items[: max(8, n // 8)]
        res = run_load(pred.url, "fp32", naive_items, concurrency=1, deadlines=False, progress=True)
        ok = [r for r in res.records if r.outcome == "ok"]
        tput = len(ok) / res.duration_s
        out["naive"] = {"requests": len(naive_items), "throughput_req_s": tput, "variant": "fp32", "concurrency": 1,
                        "cost_per_1m_requests_usd": price / 3600 / tput * 1e6 if tput else None}
    finally:
        pred.stop()
    on, off, naive = out["cache_on"], out["cache_off"], out["naive"]
    out["cost_ratio_on_vs_off"] = on["cost_per_1m_requests_usd"] / off["cost_per_1m_requests_usd"]
    out["cost_ratio_on_vs_naive"] = on["cost_per_1m_requests_usd"] / naive["cost_per_1m_requests_usd"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", default=None, help="folder holding artifacts/ (default: .)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the trace length (200 requests at 1)")
    p.add_argument("--variant", default="int8_weight_only", help="the variant the gateway fronts")
    p.add_argument("--price", type=float, default=None, help="USD per machine-hour (default: params.yaml's)")
    p.add_argument("--json", type=Path, default=Path("artifacts/cache-bench.json"))
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    p.add_argument("--skip-gateway", action="store_true", help="every part but the gateway (no servers)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY,
                   help=f"requests in flight in the gateway part (default {CONCURRENCY})")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 10:
        p.error(f"--scale: expected a number in (0, 10], got {args.scale}")
    if not 1 <= args.concurrency <= 64:
        p.error(f"--concurrency: expected an integer in [1, 64], got {args.concurrency}")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        p.error(f"--parts: expected some of {','.join(PARTS)}, got {args.parts!r}")
    if args.skip_gateway:
        parts = [x for x in parts if x != "gateway"]
    ws = Workspace.from_env(args.workspace)
    if "gateway" in parts and not (ws.variant_dir(args.variant) / "spec.json").is_file() and args.variant != "fp32":
        p.error(f"--variant: {args.variant!r} is not a variant of {ws.root} (no spec.json); run make demo or "
                f"python -m tasks.quantize --variant {args.variant} first")
    from costopt.params import load_params

    price = args.price or load_params(ws.root / "params.yaml").cost.price_per_hour_usd
    from costopt.cache.embed import Embedder

    embedder = Embedder()
    out_json = args.json if args.json.is_absolute() else ws.root / args.json
    logs = ws.root / "artifacts" / "cache-bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = int(200 * args.scale)
    result: dict[str, Any] = {"machine": _machine(), "price_per_hour_usd": price}
    calibration = logs / "calibration.json"  # the gateway calibrates itself at its first start, into this file
    calibration.unlink(missing_ok=True)
    if parts != ["gateway"]:  # every part but the gateway's needs the fitted setting
        result["pairs"] = pairs_part(embedder)
        setting = result["pairs"]["setting"]
    if "decision" in parts:
        result["decision"] = decision_part(embedder, setting, int(3000 * args.scale))
    if "eviction" in parts:
        result["eviction"] = eviction_part(embedder, setting, int(1500 * args.scale))
    if "overhead" in parts:
        result["overhead"] = overhead_part(embedder, setting, n_entries=1000, n_lookups=200)
    if "embed" in parts:
        result["embed"] = embed_part(200)
    if "gateway" in parts:
        result["gateway"] = gateway_part(ws, args.variant, n, price, logs, calibration, args.concurrency)
    write_json(out_json, result)
    print(summary(result))
    print(f"\nwritten: {out_json}")
    return 0


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def summary(r: dict[str, Any]) -> str:
    """The parts that ran, one or a few lines each."""
    lines: list[str] = []
    if "pairs" in r:
        held = r["pairs"]["held"]
        lines.append("pairs (held split):  kind  hit rate  false-hit rate  [95% upper]")
        for kind, v in [("overall", held["overall"]), *held["kinds"].items()]:
            if v["same"]:
                lines.append(f"  {kind:<11} hits {v['hits']}/{v['same']} = {v['hit_rate']:.3f}")
            if v["near_misses"]:
                lines.append(f"  {kind:<11} false hits {v['false_hits']}/{v['near_misses']} = "
                             f"{v['false_hit_rate']:.4f} [{v['false_hit_upper95']:.4f}]")
    if "decision" in r:
        d = r["decision"]
        lines.append(f"the rule on a {d['requests']}-request trace (cache alone): hit rate {d['hit_rate']:.3f} "
                     f"({d['hits_by_kind']}), false hits {d['false_hits']}/{d['hits']} = {d['false_hit_rate']:.4f} "
                     f"[95% upper {d['false_hit_upper95']:.4f}]")
    if "eviction" in r:
        e = r["eviction"]
        lines.append(f"eviction at capacity {e['capacity']} over {e['requests']} requests: decay hit rate "
                     f"{e['decay']['hit_rate']:.3f}, LRU {e['lru']['hit_rate']:.3f}")
    if "overhead" in r:
        o = r["overhead"]
        lines.append(f"lookup on a miss ({o['entries']} entries, {o['embedder']}): p50 {o['p50_ms']:.1f} ms, "
                     f"p99 {o['p99_ms']:.1f} ms")
    for b, v in r.get("embed", {}).items():
        if isinstance(v, dict):
            lines.append(f"  embed one text, {b:<9}: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, cosine to "
                         f"torch mean {v['cosine_to_torch_mean']:.4f} min {v['cosine_to_torch_min']:.4f}")
    if "gateway" in r:
        g = r["gateway"]
        on, off, naive = g["cache_on"], g["cache_off"], g["naive"]
        lines.append(f"gateway ({g['variant']}, c={g['concurrency']}, {g['trace']['requests']} requests): hit rate "
                     f"{on['hit_rate']:.3f}, false hits {on['false_hits']}/{on['hits']} (unsourced "
                     f"{on['unsourced_hits']}, unchecked {on['unchecked_hits']}; 95% upper "
                     f"{on['false_hit_upper95']:.4f}); cost/1M: on {on['cost_per_1m_requests_usd']:.2f}, off "
                     f"{off['cost_per_1m_requests_usd']:.2f}, naive {naive['cost_per_1m_requests_usd']:.2f} USD")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
