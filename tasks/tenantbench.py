"""`make bench`, tenants part: a noisy tenant beside a quiet one, with and without per-tenant quotas.

    python -m tasks.tenantbench [--workspace DIR] [--scale 1.0] [--json artifacts/tenant-bench.json]

Real servers from the serving environment on loopback, with tenant keys (`serving.tenants`), serving
the search's pick (INT8 weight-only when there is none). First the sustainable rate (closed loop,
concurrency 16); then, on the same quiet requests each time:
1. the quiet tenant alone: open loop at a quarter of the sustainable rate, normal priority, the
   trace's normal deadline (20 s) as its SLO;
2. the same beside a noisy tenant sending at twice the sustainable rate, every request claiming high
   priority, held to its grant: ceiling normal, at most `NOISY_CONCURRENT` in flight;
3. the same with the noisy tenant unlimited and its high priority believed (what a server that trusts
   headers does).
Reports, per scenario, the quiet tenant's p50/p99 latency, its share of requests answered within the
SLO, and what happened to the noisy tenant's requests (served, refused by its quota, refused by
admission). Prints a Markdown table and writes the JSON for BENCHMARKS.md.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import statistics
from pathlib import Path
from typing import Any, Sequence

from costopt.storage.layout import Workspace, write_json
from costopt.workload.trace import build_trace
from costopt.deploy.processes import start_server
from tasks.loadtest import LoadResult, run_load, run_load_async
from tasks.servebench import bench_parser, prepare, served_pick

TRACE_SEED = 11
QUIET_SECONDS = 60  # each scenario's length at --scale 1
QUIET_SHARE, NOISY_FACTOR = 0.25, 2.0  # quiet and noisy send rates, as multiples of the sustainable rate
NOISY_CONCURRENT = 4


def _keys_file(path: Path, keys: dict[str, str], noisy_limited: bool) -> Path:
    noisy = {"max_priority": "normal", "rate": None, "max_concurrent": NOISY_CONCURRENT} if noisy_limited else \
        {"max_priority": "high", "rate": None, "max_concurrent": None}
    doc = {"tenants": {"quiet": {"keys": [keys["quiet"]], "max_priority": "normal", "rate": None,
                                 "max_concurrent": None},
                       "noisy": {"keys": [keys["noisy"]], **noisy}}}
    path.write_text(json.dumps(doc, indent=1))
    path.chmod(0o600)
    return path


def _as(items: Sequence[Any], tenant: str, priority: str) -> list[Any]:
    return [dataclasses.replace(it, tenant=tenant, priority=priority) for it in items]


def quiet_figures(res: LoadResult) -> dict[str, Any]:
    recs = res.records
    ok = sorted(r.latency_ms for r in recs if r.outcome == "ok")
    pct = lambda q: round(statistics.quantiles(ok, n=100, method="inclusive")[q - 1]) if len(ok) > 1 else \
        (round(ok[0]) if ok else None)  # noqa: E731
    return {"sent": len(recs), "ok": len(ok), "p50_ms": pct(50), "p99_ms": pct(99),
            "slo_ms": recs[0].deadline_ms if recs else None,
            "within_slo": round(sum(r.deadline_met for r in recs) / max(1, len(recs)), 3),
            "refused": sum(r.outcome == "rejected" for r in recs),
            "errors": sum(r.outcome in ("error", "lost") for r in recs)}


def noisy_figures(res: LoadResult) -> dict[str, Any]:
    refused = [r for r in res.records if r.outcome == "rejected"]
    by_quota = sum("tenant 'noisy'" in (r.error or "") for r in refused)
    return {"sent": len(res.records), "ok": sum(r.outcome == "ok" for r in res.records),
            "refused_by_quota": by_quota, "refused_by_admission": len(refused) - by_quota,
            "errors": sum(r.outcome == "error" for r in res.records),
            "cut_off": sum(r.outcome == "lost" for r in res.records)}  # in flight when the scenario ended


async def _side_by_side(url: str, model: str, quiet: list[Any], noisy: list[Any], quiet_rate: float,
                        noisy_rate: float, keys: dict[str, str], seconds: float) -> tuple[LoadResult, LoadResult]:
    noisy_task = asyncio.create_task(run_load_async(url, model, noisy, rate=noisy_rate, requests=10 ** 6,
                                                    max_duration_s=seconds + 5, api_keys=keys))
    q = await run_load_async(url, model, quiet, rate=quiet_rate, requests=len(quiet), api_keys=keys)
    return q, await noisy_task


def run(ws: Workspace, scale: float, logs: Path, variant: str | None = None) -> dict[str, Any]:
    pick = variant or served_pick(ws)
    keys = {"quiet": secrets.token_urlsafe(24), "noisy": secrets.token_urlsafe(24)}
    trace = build_trace(400, TRACE_SEED)
    normal = [it for it in trace if it.priority == "normal"]
    seconds = QUIET_SECONDS * scale
    out: dict[str, Any] = {"variant": pick, "noisy_concurrent_limit": NOISY_CONCURRENT, "scenarios": {}}
    logs.mkdir(parents=True, exist_ok=True)
    limited = _keys_file(logs / "keys-limited.yaml", keys, noisy_limited=True)
    with start_server(ws.root, [pick], logs / "server-limited.log", flags=["--keys", str(limited)]) as srv:
        cap = run_load(srv.url, pick, _as(normal, "quiet", "normal"), concurrency=16,
                       requests=max(20, int(48 * scale)), api_keys=keys, progress=True)
        sustainable = sum(r.outcome == "ok" for r in cap.records) / cap.duration_s
        quiet_rate, noisy_rate = QUIET_SHARE * sustainable, NOISY_FACTOR * sustainable
        quiet = _as(normal, "quiet", "normal")[:max(6, int(quiet_rate * seconds))]
        noisy = _as(trace, "noisy", "high")
        out.update(sustainable_req_s=round(sustainable, 3), quiet_rate_req_s=round(quiet_rate, 3),
                   noisy_rate_req_s=round(noisy_rate, 3), quiet_requests=len(quiet))
        alone = run_load(srv.url, pick, quiet, rate=quiet_rate, api_keys=keys, progress=True)
        out["scenarios"]["quiet alone"] = {"quiet": quiet_figures(alone)}
        q, n = asyncio.run(_side_by_side(srv.url, pick, quiet, noisy, quiet_rate, noisy_rate, keys, seconds))
        out["scenarios"]["beside noisy, quotas on"] = {"quiet": quiet_figures(q), "noisy": noisy_figures(n)}
    open_keys = _keys_file(logs / "keys-unlimited.yaml", keys, noisy_limited=False)
    with start_server(ws.root, [pick], logs / "server-unlimited.log", flags=["--keys", str(open_keys)]) as srv:
        q, n = asyncio.run(_side_by_side(srv.url, pick, quiet, noisy, quiet_rate, noisy_rate, keys, seconds))
        out["scenarios"]["beside noisy, no quotas, priority believed"] = {"quiet": quiet_figures(q),
                                                                         "noisy": noisy_figures(n)}
    return out


def markdown(out: dict[str, Any]) -> str:
    rows = ["| scenario | quiet p50 ms | quiet p99 ms | quiet within SLO | quiet refused | noisy ok | "
            "noisy refused (quota / admission) |", "|---|---|---|---|---|---|---|"]
    for name, s in out["scenarios"].items():
        q, n = s["quiet"], s.get("noisy")
        noisy = "-" if n is None else (n["ok"], f"{n['refused_by_quota']} / {n['refused_by_admission']}")
        rows.append(f"| {name} | {q['p50_ms']} | {q['p99_ms']} | {q['within_slo']:.1%} of {q['sent']} | "
                    f"{q['refused']} | {'-' if n is None else noisy[0]} | {'-' if n is None else noisy[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__.split("\n\n")[0], "artifacts/tenant-bench.json", "multiplies each scenario's length",
                     "serve this variant (default: the search's pick, else INT8 weight-only)")
    args = p.parse_args(argv)
    _, ws, out_json = prepare(p, args)
    out = run(ws, args.scale, ws.root / "artifacts" / "tenant-bench-logs", args.variant)
    write_json(out_json, out)
    print(markdown(out))
    print(json.dumps({k: v for k, v in out.items() if k != "scenarios"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
