"""`python -m tasks.canarybench`: the quality-judged canary on loopback, the A/B test's error rates, drift.

Part of `make bench`; figures in BENCHMARKS.md (section 14). Four parts:
1. **Canary** (real predictor and gateway, the `serving-v1` trace in closed loop through the deployment
   name): the current variant `int8_weight_only`; a worse candidate (the seed paper's one-liner,
   `dynamic_qint8_naive`) and an equal one (`gguf_q8_0_fa`: llama.cpp's Q8_0, the same KL to fp32). For
   each: requests until the verdict, the verdict, its reason, client requests that failed (must be 0).
2. **A/B** (`costopt.online.abtest.simulate`): the false-positive rate on A/A data read after every 10
   pairs, against a fixed-horizon z-test read as often, and the power on a planted difference.
3. **Drift** (`costopt.online.drift`, the real embedder): the held-out prompts' distribution against
   more prompts of it (no drift) and against a log where half the prompts are code, SQL and German.
4. **Quality drift** (`costopt.online.livequality`, the continuous DAG's quality check, needs the
   workspace's fp32 reference): the pick-equal `gguf_q8_0_fa`, the gate-failing `gguf_q4_k_m` and the
   seed's one-liner, each on 32 unseen prompts of the same distribution and on 32 of the planted shift.
The workspace is a finished `make demo`'s (or any holding the three variants; missing ones are
quantized with the quick profile).

    .venv/bin/python -m tasks.canarybench [--workspace DIR] [--share 0.5] [--json artifacts/canary-bench.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

CURRENT, WORSE, EQUAL = "int8_weight_only", "dynamic_qint8_naive", "gguf_q8_0_fa"
PROJECT = Path(__file__).resolve().parents[1]


def _ensure(ws: Path, names: list[str]) -> None:
    py = PROJECT / ".venv" / "bin" / "python"
    if not (ws / "artifacts" / "model" / "model.safetensors").is_file():
        subprocess.run([str(py), "-m", "tasks.ingest", "--workspace", str(ws), "--profile", "quick"], check=True,
                       cwd=PROJECT)
    for n in names:
        if not (ws / "artifacts" / "variants" / n / "spec.json").is_file():
            subprocess.run([str(py), "-m", "tasks.quantize", "--workspace", str(ws), "--profile", "quick",
                            "--variant", n], check=True, cwd=PROJECT)


def canary(ws: Path, candidate: str, share: float, chunk: int, max_requests: int, settings: dict) -> dict[str, Any]:
    """One canary from start to verdict through a fresh gateway; the trace replayed in chunks until it ends."""
    from costopt.deploy.processes import start_gateway, start_server
    from costopt.workload.trace import build_trace
    from tasks.loadtest import run_load

    items = build_trace(400, seed=13)
    log_dir = ws / "artifacts" / "canary-bench"
    with start_server(ws, [CURRENT, candidate], log_dir / f"predictor-{candidate}.log") as pred, \
            start_gateway(ws, pred.url, [CURRENT, candidate], log_dir / f"gateway-{candidate}.log",
                          ["--no_cache", "--deployment", "bench", "--current", CURRENT, "--rollout_state",
                           str(log_dir / f"rollout-{candidate}.json")]) as gw, \
            httpx.Client(base_url=gw.url, headers=gw.admin_headers, timeout=60, trust_env=False) as http:
        r = http.post("/v2/rollout/canary", json={"candidate": candidate, "share": share, **settings})
        r.raise_for_status()
        sent = failed = 0
        t0 = time.perf_counter()
        state = http.get("/v2/rollout").json()
        while state["canary"] is not None and sent < max_requests:
            res = run_load(gw.url, "bench", items, concurrency=4, requests=chunk, deadlines=False)
            sent += len(res.records)
            failed += sum(rec.outcome != "ok" for rec in res.records)
            state = http.get("/v2/rollout").json()
            live = (state["canary"] or {}).get("evidence") or {}
            print(f"  {candidate}: {sent} requests, canary {live.get('requests', '-')} judged "
                  f"{live.get('judged', '-')}", file=sys.stderr, flush=True)
        last = state["history"][-1] if state["canary"] is None else None
        return {"candidate": candidate, "current": CURRENT, "share": share, "settings": settings,
                "verdict": last["verdict"] if last else "undecided at the bench's limit",
                "reason": last["reason"] if last else None, "client_requests": sent, "client_failures": failed,
                "canary_requests": (last or {}).get("evidence", {}).get("requests"),
                "judged": (last or {}).get("evidence", {}).get("judged"),
                "gates": (last or {}).get("evidence", {}).get("gates"), "seconds": round(time.perf_counter() - t0, 1)}


SHIFTED_TEMPLATES = ["Why does this Python raise KeyError: d = {{}}; d['{w}'] += 1 ?",
                     "Write a SQL query that counts {w} per month.",
                     "Übersetze bitte ins Englische: Der {w} ist heute geschlossen.",
                     "What does `git rebase -i HEAD~3` do to the {w} branch?"]
SHIFT_WORDS = ["orders", "cache", "users", "bahnhof", "invoice", "laden", "events", "museum"]


def half_shifted(texts: list[str], seed: int) -> list[str]:
    """Every other text replaced by a code, SQL or German prompt (the planted shift)."""
    import random

    rng = random.Random(seed)
    return [t if i % 2 == 0 else rng.choice(SHIFTED_TEMPLATES).format(w=rng.choice(SHIFT_WORDS))
            for i, t in enumerate(texts)]


def drift_part(seed: int = 7) -> dict[str, Any]:
    from costopt.evaluation.evaldata import chat_pool, split_prompts
    from costopt.online.drift import mmd_test
    from costopt.online.traffic import prompt_texts
    from tasks.continuous import embed

    held, cal = split_prompts(seed, 150, 150)
    reference = prompt_texts(held + cal)
    unseen = prompt_texts([{"messages": c} for _f, c in chat_pool(seed)[300:450]])
    shifted = half_shifted(unseen, seed)
    emb = embed(reference + unseen + shifted)
    ref, a, b = emb[:len(reference)], emb[len(reference):len(reference) + len(unseen)], emb[len(reference) + len(unseen):]
    return {"reference_prompts": len(reference), "recent_prompts": len(unseen),
            "no_drift": mmd_test(ref, a, alpha=0.01, permutations=500).to_dict(),
            "planted_half_shift": mmd_test(ref, b, alpha=0.01, permutations=500).to_dict()}


def quality_part(ws: Path, variants: list[str], n: int = 32) -> dict[str, Any]:
    """The continuous DAG's quality check on unseen same-distribution prompts and on the planted shift."""
    from costopt.evaluation.evaldata import chat_pool
    from costopt.evaluation.reference import load_reference
    from costopt.models.source import load_model_dir
    from costopt.online.livequality import judge, live_prompt_set, measure_live
    from costopt.params import load_params
    from costopt.runtimes.registry import load_scorer
    from costopt.storage.layout import Workspace, read_json

    workspace = Workspace.from_env(ws)
    params = load_params(ws / "params.yaml")
    ref = load_reference(params, workspace)
    fp32, _ = load_model_dir(workspace.model_dir)
    pool = [c for _f, c in chat_pool(params.evaldata.seed)[-n:]]  # the pool's tail: past every set a run makes
    shifted = [[{"role": "user", "content": t}] for t in half_shifted([c[-1]["content"] for c in pool], 7)]
    sets = {"same distribution": pool, "half code, SQL, German": shifted}
    out: dict[str, Any] = {"prompts": n, "answer_tokens": params.evaldata.reference_tokens, "results": []}
    for label, convs in sets.items():
        t0 = time.perf_counter()
        prompts = live_prompt_set(fp32, ref, convs, params.evaldata.reference_tokens)
        fp32_seconds = time.perf_counter() - t0
        for name in variants:
            t0 = time.perf_counter()
            live = measure_live(load_scorer(workspace, name)[0], ref, prompts, params.validate.bootstrap)
            qfile = workspace.quality_file(name)
            decision, reasons = judge(live, read_json(qfile)["metrics"] if qfile.is_file() else None,
                                      params.validate.gates)
            out["results"].append({"prompts": label, "variant": name, "decision": decision, "reasons": reasons,
                                   "kl_mean": live["kl_mean"], "top1_agreement": live["top1_agreement"],
                                   "fp32_seconds": round(fp32_seconds, 1),
                                   "variant_seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(out["results"][-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from costopt.online.abtest import simulate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", type=Path, default=Path("."))
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=40, help="requests between looks at the rollout state")
    p.add_argument("--max_requests", type=int, default=2400)
    p.add_argument("--parts", nargs="+", default=["canary", "ab", "drift", "quality"],
                   choices=["canary", "ab", "drift", "quality"])
    p.add_argument("--quality_variants", nargs="+", default=[EQUAL, "gguf_q4_k_m", WORSE])
    p.add_argument("--candidates", nargs="+", default=[WORSE, EQUAL], help="canaries to run, one after another")
    p.add_argument("--settings", type=json.loads, default={},
                   help='canary settings over the defaults, as JSON (e.g. \'{"error_rate_max": 0.05}\')')
    p.add_argument("--json", type=Path, default=Path("artifacts/canary-bench.json"))
    args = p.parse_args(argv)
    ws = args.workspace.resolve()
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "ab" in args.parts:
        out["ab_simulation"] = simulate(runs=1000, n=1000, effect=0.2, tau=0.2, alpha=0.05, look_every=10)
        print(json.dumps(out["ab_simulation"]), flush=True)
    if "drift" in args.parts:
        out["drift"] = drift_part()
        print(json.dumps(out["drift"]), flush=True)
    if "quality" in args.parts:
        _ensure(ws, args.quality_variants)
        out["quality"] = quality_part(ws, args.quality_variants)
    if "canary" in args.parts:
        _ensure(ws, [CURRENT, *args.candidates])
        out["canary"] = [canary(ws, c, args.share, args.chunk, args.max_requests, args.settings)
                         for c in args.candidates]
        for c in out["canary"]:
            print(json.dumps({k: c[k] for k in ("candidate", "verdict", "reason", "client_requests", "client_failures",
                                                "canary_requests", "judged", "seconds")}), flush=True)
    path = args.json if args.json.is_absolute() else ws / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
