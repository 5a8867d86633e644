"""`make bench`, serving part: the load test of the model server on the fixed request trace, one run.

    python -m tasks.servebench [--workspace DIR] [--scale 1.0] [--json artifacts/serve-bench.json]

Starts real servers from the serving environment on loopback and replays the `serving-v1` trace with
the load generator (`tasks.loadtest`), measuring side by side in one run:
1. continuous batching vs batch-1 serving, both fp32 at concurrency 16 on the same requests, sent
   without deadlines to servers with deadline admission off (neither refuses any: throughput and p99
   over all of them);
2. throughput and p50/p95/p99 at concurrency 1, 4, 16 and 64 for fp32 and the search's pick on its
   own runtime (INT8 weight-only when there is no pick; `--variant` names another), with the trace's
   deadlines;
3. cost per 1M requests of the serving setup vs the naive path (fp32, batch 1, plain HF `generate`,
   one request after another, timed in this process on the same trace items);
4. overload, per variant: the sustainable rate is its best throughput in the sweep (2.); an open loop at
   twice that rate checks that admitted requests meet their deadlines, the rest get a fast 429, high
   priority keeps its p99 within its deadline (its SLO), and nothing admitted is lost; three runs,
   reported as the median and the worst (`--overload-only` runs just this part, for A/B of server flags).
Prints Markdown tables and writes the JSON (`serving` section shape, DESIGN.md) for BENCHMARKS.md.
`--scale` multiplies every request count (0.25 for a quick look).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from costopt.storage.layout import Workspace, write_json
from costopt.params import load_params
from costopt.workload.trace import build_trace, trace_meta
from costopt.deploy.processes import start_server
from tasks.loadtest import markdown_table, run_load, serving_section, summarize

TRACE_SEED = 11
INT8 = "int8_weight_only"
# concurrency -> requests. A closed-loop run ends with a drain (the last requests finish in an ever
# smaller batch), so the requests are several waves of the concurrency: at 16, 48 requests (three waves)
# read 180.8 tok/s where 160 read 198.6 on the same server minutes later (gguf_q8_0_fa, 2026-12-05).
SWEEP = {1: 12, 4: 24, 16: 160, 64: 256}
COMPARE_REQUESTS = {"batching": 96, "batch1": 48}  # continuous batching vs batch-1 at concurrency 16
NAIVE_REQUESTS = 12
OVERLOAD_SECONDS = 60  # open-loop duration at 2x the sustainable rate
SERVER_FLAGS = ["--default_deadline_s", "600"]  # the deadline of a request sent without the header
CB_LABEL, B1_LABEL = "fp32 continuous batching c=16, every request served", "fp32 batch-1 serving c=16, every request served"


def _config(variants: Sequence[str], batching: bool) -> dict[str, Any]:
    return {"batching": batching, "cache": False, "routing": False, "variants": list(variants)}


def naive_seconds_per_request(ws: Workspace, items: Sequence[Any], threads: int) -> tuple[float, list[float]]:
    """fp32, batch 1, plain `generate` (greedy), one request after another: machine-seconds per request."""
    import torch

    from costopt.models.source import load_model_dir

    torch.set_num_threads(threads)
    model, tok = load_model_dir(ws.model_dir)
    times = []
    with torch.inference_mode():
        for item in items:
            ids = tok.apply_chat_template(list(item.messages), add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=item.max_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
            times.append(time.perf_counter() - t0)
    return statistics.fmean(times), times


def overload_checks(result: Any, sustainable: float, rate: float) -> dict[str, Any]:
    """The issue's overload targets, from one open-loop run's records: admitted (answered) requests meet
    their deadline, refusals are fast 429s, high priority keeps its p99 within its SLO (its deadline),
    nothing admitted is lost."""
    ok = [r for r in result.records if r.outcome == "ok"]
    refused = [r for r in result.records if r.outcome == "rejected"]
    high = sorted(r.latency_ms for r in ok if r.priority == "high")
    high_slo = min((r.deadline_ms for r in result.records if r.priority == "high"), default=None)
    pct = lambda v, q: round(statistics.quantiles(v, n=100, method="inclusive")[q - 1], 1) if len(v) > 1 else \
        (round(v[0], 1) if v else None)  # noqa: E731
    return {
        "sustainable_req_s": sustainable, "offered_req_s": round(rate, 4), "sent": len(result.records),
        "admitted": len(ok), "refused_429": len(refused),
        "errors": sum(r.outcome == "error" for r in result.records),
        "lost": sum(r.outcome == "lost" for r in result.records),
        "admitted_deadline_met": round(sum(r.deadline_met for r in ok) / len(ok), 4) if ok else None,
        "refused_p50_ms": pct([r.latency_ms for r in refused], 50),
        "refused_p99_ms": pct([r.latency_ms for r in refused], 99),
        "high_sent": sum(r.priority == "high" for r in result.records), "high_admitted": len(high),
        "high_p99_ms": pct(high, 99), "high_slo_ms": high_slo,
    }


OVERLOAD_RUNS = 3  # the overload verdict is the median and the worst of this many runs
_WORSE_IF_LOWER = ("admitted_deadline_met",)
_WORSE_IF_HIGHER = ("high_p99_ms", "refused_p99_ms", "errors", "lost")


def overload_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst of the verdict's figures over repeated overload runs (worst: the lowest share of
    admitted requests on time, the highest high-priority p99, slowest refusals, most errors or losses)."""
    out: dict[str, Any] = {"runs": list(runs), "median": {}, "worst": {}}
    for key in (*_WORSE_IF_LOWER, *_WORSE_IF_HIGHER, "admitted", "refused_429"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            continue
        out["median"][key] = statistics.median(values)
        if key in _WORSE_IF_LOWER or key in _WORSE_IF_HIGHER:
            out["worst"][key] = min(values) if key in _WORSE_IF_LOWER else max(values)
    return out


class _Runs(list):
    """The runs so far, also written to `logs/partial.json` after each one, so a late failure keeps them."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def append(self, run: dict[str, Any]) -> None:
        super().append(run)
        write_json(self.path, {"runs": list(self)})


def served_pick(ws: Workspace) -> str:
    """The search's pick when it was built here, else INT8 weight-only (the serving comparison's second)."""
    from costopt.storage.layout import read_json

    path = ws.search_dir / "search.json"
    picked = read_json(path).get("picked") if path.is_file() else None
    return picked if picked and (ws.variant_dir(picked) / "spec.json").is_file() else INT8


def overload_only(ws: Workspace, price: float, scale: float, logs: Path, variant: str | None = None,
                  server_flags: Sequence[str] = ()) -> dict[str, Any]:
    """Part 4 alone, for comparing admission settings (`server_flags`): the sustainable rate from
    concurrency 16, then `OVERLOAD_RUNS` open-loop runs at twice it, per variant."""
    n = lambda k: max(4, int(round(k * scale)))  # noqa: E731
    pick = variant or served_pick(ws)
    items = build_trace(max(n(max(SWEEP.values())), 200), TRACE_SEED)
    out: dict[str, Any] = {"server_flags": list(server_flags), "overload": {}}
    with start_server(ws.root, ["fp32", pick], logs / "server-overload.log",
                      flags=[*SERVER_FLAGS, *server_flags]) as srv:
        for name in ("fp32", pick):
            res = run_load(srv.url, name, items, concurrency=16, requests=max(n(SWEEP[16]), 32), progress=True)
            sustainable = summarize(res, price, _config([name], True))["throughput_req_s"]
            rate, runs = 2 * sustainable, []
            for _ in range(OVERLOAD_RUNS):
                res = run_load(srv.url, name, items, rate=rate, progress=True,
                               requests=max(8, int(rate * OVERLOAD_SECONDS * scale)))
                runs.append(overload_checks(res, sustainable, rate))
            out["overload"][name] = overload_summary(runs)
    return out


def run(ws: Workspace, price: float, threads: int, scale: float, logs: Path, variant: str | None = None) -> dict[str, Any]:
    n = lambda k: max(4, int(round(k * scale)))  # noqa: E731
    pick = variant or served_pick(ws)
    items = build_trace(max(n(max(SWEEP.values())), 200), TRACE_SEED)
    runs: list[dict[str, Any]] = _Runs(logs / "partial.json")
    overloads: dict[str, dict[str, Any]] = {}
    # 1. batching alone: both servers serve every request (no deadline header, deadline admission off)
    plain = [*SERVER_FLAGS, "--no_deadline_admission"]
    with start_server(ws.root, ["fp32"], logs / "server-compare.log", flags=plain) as srv:
        res = run_load(srv.url, "fp32", items, concurrency=16, requests=n(COMPARE_REQUESTS["batching"]),
                       progress=True, deadlines=False)
        runs.append({**summarize(res, price, _config(["fp32"], True)), "label": CB_LABEL})
    with start_server(ws.root, ["fp32"], logs / "server-batch1.log",
                      flags=["--max_batch", "1", "--reserved_high", "0", "--fixed_batching", *plain]) as srv:
        res = run_load(srv.url, "fp32", items, concurrency=16, requests=n(COMPARE_REQUESTS["batch1"]),
                       progress=True, deadlines=False)
        runs.append({**summarize(res, price, _config(["fp32"], False)), "label": B1_LABEL})
    # 2 and 4. the serving setup, deadlines on: the sweep, then twice the best rate it sustained
    with start_server(ws.root, ["fp32", pick], logs / "server-batching.log", flags=SERVER_FLAGS) as srv:
        for variant in ("fp32", pick):
            sweep = []
            for c, k in SWEEP.items():
                res = run_load(srv.url, variant, items, concurrency=c, requests=max(n(k), c + 16), progress=True)
                sweep.append({**summarize(res, price, _config([variant], True)), "label": f"{variant} c={c}"})
                runs.append(sweep[-1])
            sustainable = max(r["throughput_req_s"] for r in sweep)
            rate, checks = 2 * sustainable, []
            for k in range(OVERLOAD_RUNS):
                res = run_load(srv.url, variant, items, rate=rate, progress=True,
                               requests=max(8, int(rate * OVERLOAD_SECONDS * scale)))
                checks.append(overload_checks(res, sustainable, rate))
                if k == 0:  # the first run goes in the table; the verdict takes all of them
                    runs.append({**summarize(res, price, _config([variant], True)),
                                 "label": f"{variant} open loop {rate:.2f} req/s (2x)", "sustainable_req_s": sustainable})
            overloads[variant] = overload_summary(checks)
    naive_s, _ = naive_seconds_per_request(ws, items[:n(NAIVE_REQUESTS)], threads)
    from costopt.evaluation.cost import cost_per_1m_requests

    naive_cost = cost_per_1m_requests(price, naive_s)
    best = min((r for r in runs if r.get("label", "").endswith("c=16") and r["config"]["batching"]),
               key=lambda r: r["cost_per_1m_requests_usd"] or float("inf"))
    cb = next(r for r in runs if r["label"] == CB_LABEL)
    b1 = next(r for r in runs if r["label"] == B1_LABEL)
    section = serving_section(trace_meta(items), list(runs), naive_cost_per_1m_requests_usd=round(naive_cost, 4),
                              optimized_cost_per_1m_requests_usd=best["cost_per_1m_requests_usd"])
    section["comparison"] = {
        "continuous_vs_batch1_throughput_ratio": round(cb["throughput_req_s"] / b1["throughput_req_s"], 2),
        "continuous_vs_batch1_token_throughput_ratio": round(cb["throughput_tok_s"] / b1["throughput_tok_s"], 2),
        "continuous_p99_ms": cb["p99_ms"], "batch1_p99_ms": b1["p99_ms"],
        "naive_seconds_per_request": round(naive_s, 3), "optimized_setup": best["label"],
        "naive_vs_optimized_cost_ratio": round(naive_cost / best["cost_per_1m_requests_usd"], 2),
        "optimized_over_naive_cost": round(best["cost_per_1m_requests_usd"] / naive_cost, 4),
        "served_pick": pick,
        "overload": overloads,
    }
    return section


def bench_parser(description: str, json_default: str, scale_help: str, variant_help: str) -> argparse.ArgumentParser:
    """The flags every serving bench takes (`prepare` checks them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workspace", default=None, help="folder holding artifacts/ (default: .)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", type=float, default=1.0, help=scale_help)
    p.add_argument("--json", type=Path, default=Path(json_default))
    p.add_argument("--variant", help=variant_help)
    return p


def prepare(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Any, Workspace, Path]:
    """(params, workspace, where to write the JSON) once the flags check out and the artifacts exist."""
    if not 0 < args.scale <= 10:
        p.error(f"--scale: expected a number in (0, 10], got {args.scale}")
    params = load_params(args.params)
    ws = Workspace.from_env(args.workspace)
    from tasks.bench import ensure_artifacts

    ensure_artifacts(params, ws)
    if args.variant and not (ws.variant_dir(args.variant) / "spec.json").is_file():
        p.error(f"--variant: {args.variant!r} is not a variant of {ws.root} (no spec.json); quantize it first")
    return params, ws, ws.root / args.json if not args.json.is_absolute() else args.json


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__.split("\n\n")[0], "artifacts/serve-bench.json", "multiplies every request count",
                     "serve this variant next to fp32 (default: the search's pick, else INT8)")
    p.add_argument("--overload-only", action="store_true",
                   help=f"only part 4: the sustainable rate at concurrency 16, then {OVERLOAD_RUNS} overload runs")
    p.add_argument("--server-flag", action="append", default=[],
                   help="extra `python -m serving` flag for --overload-only (repeatable), e.g. --server-flag=--fixed_margin")
    args = p.parse_args(argv)
    params, ws, out_json = prepare(p, args)
    logs = ws.root / "artifacts" / "serve-bench-logs"
    if args.overload_only:
        out = overload_only(ws, params.cost.price_per_hour_usd, args.scale, logs, args.variant, args.server_flag)
        write_json(out_json, out)
        print(json.dumps({k: {"median": v["median"], "worst": v["worst"]} for k, v in out["overload"].items()},
                         indent=2))
        return 0
    section = run(ws, params.cost.price_per_hour_usd, params.benchmark.threads, args.scale, logs, args.variant)
    write_json(out_json, section)
    print(markdown_table(section["runs"]))
    print(json.dumps(section["comparison"], indent=2))
    print(f"naive {section['naive_cost_per_1m_requests_usd']} vs optimized "
          f"{section['optimized_cost_per_1m_requests_usd']} USD per 1M requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
