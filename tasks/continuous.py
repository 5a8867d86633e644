"""The continuous_optimization DAG's phases: read production traffic, A/B-test the variants that served
it, test the prompts for drift, decide, and write every decision with its evidence.

Each phase is a plain function `(params, ws, run_id) -> small dict`, writing its evidence under
`artifacts/continuous/<run_id>/`; `report` gathers it into `reports/continuous/<run_id>/decisions.json`
(next to the optimize_model runs' reports, versioned with them by the version task's `dvc commit`).
- `traffic`: the newest `continuous.window` records of the request log (corrupt lines skipped and
  counted), each variant's requests, errors and latency, and, when the lasting deployment runs, its
  `/metrics` and rollout state.
- `ab_test`: the two variants that served most of the window, A the deployment's current one, on cost
  (ms of server time per generated token), latency and errors (`costopt.online.abtest`: an mSPRT per
  metric, undecided below `continuous.ab_min_samples`). Answer quality is not in the request log: the
  canary's shadow judgements cover it (`serving/gateway/rollout.py`).
- `drift`: the logged prompts of the window against the prompts the deployed variants were calibrated
  and validated on (`artifacts/data/calibration.jsonl` and `prompts.jsonl`), embedded with the semantic
  cache's embedder (in the serving environment) and compared by MMD with a permutation test.
- `decide`: re-optimize when the prompts drifted (and `continuous.reoptimize`); the DAG then triggers
  `optimize_model`, the same code path, which calibrates on the request log (`calibrate.source: auto`),
  gates every candidate and hands the winner to the deployment's canary.

    python -m tasks.continuous --workspace . [--run-id manual]   # every phase in order, no Airflow
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from costopt.online.traffic import prompt_texts, read_log, scrape_metrics, variant_stats
from costopt.storage.layout import read_json, write_json


def _dir(ws: Any, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:120]
    out = ws.root / "artifacts" / "continuous" / safe
    out.mkdir(parents=True, exist_ok=True)
    return out


def _records(params: Any, ws: Any):
    return read_log(ws.root / params.calibrate.logs, last=params.continuous.window)


# -- traffic -----------------------------------------------------------------------------------------------
def _deployment(ws: Any) -> dict[str, Any] | None:
    """The lasting deployment's metrics and rollout state, when it runs (None otherwise)."""
    import httpx

    from costopt.deploy import lasting
    from costopt.deploy.processes import read_admin_key

    state = lasting.status(ws.root)
    if state is None or not state["running"]:
        return None
    out: dict[str, Any] = {"deployment": state["deployment"], "gateway_url": state["gateway"]["url"]}
    with httpx.Client(timeout=10, trust_env=False) as http:
        try:
            metrics = scrape_metrics(http.get(f"{state['predictor']['url']}/metrics").text)
            out["metrics"] = {k: v for k, v in metrics.items()
                              if k.startswith(("costopt_requests_total", "costopt_generated_tokens_total",
                                               "costopt_rejections_total"))}
            r = http.get(f"{state['gateway']['url']}/v2/rollout",
                         headers={"Authorization": f"Bearer {read_admin_key(ws.root)}"})
            out["rollout"] = r.json() if r.status_code == 200 else None
        except httpx.HTTPError as exc:
            out["error"] = f"the deployment did not answer: {type(exc).__name__}"
    return out


def traffic(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    log = _records(params, ws)
    summary = {"log": str(ws.root / params.calibrate.logs), "lines": log.lines, "records": len(log.records),
               "skipped": log.skipped, "skipped_examples": log.skipped_examples,
               "prompts_logged": len(prompt_texts(log.records)), "variants": variant_stats(log.records),
               "deployment": _deployment(ws)}
    write_json(_dir(ws, run_id) / "traffic.json", summary)
    return {k: summary[k] for k in ("records", "skipped", "prompts_logged")}


# -- A/B -----------------------------------------------------------------------------------------------------
def ab_config(params: Any) -> Any:
    from costopt.online.abtest import ABConfig, Metric

    c = params.continuous
    return ABConfig("ms_per_token", (Metric("ms_per_token", "lower", 20.0),
                                     Metric("latency_ms", "lower", 500.0, 250.0),
                                     Metric("error", "lower", 0.02, 0.01)),
                    alpha=c.ab_alpha, min_samples=c.ab_min_samples)


def ab_test(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    from costopt.online.abtest import ABTest

    records = _records(params, ws).records
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r["variant"])] = counts.get(str(r["variant"]), 0) + 1
    served = sorted(counts, key=lambda v: -counts[v])
    traffic_file = _dir(ws, run_id) / "traffic.json"
    rollout = ((read_json(traffic_file).get("deployment") or {}).get("rollout") or {}) if traffic_file.is_file() else {}
    if len(served) < 2:
        result = {"decision": "undecided", "reason": f"{len(served)} variant(s) served the window; an A/B test needs "
                                                     f"two", "requests": counts}
    else:
        a = rollout.get("current") if rollout.get("current") in served[:2] else served[0]
        b = next(v for v in served if v != a)
        test = ABTest(ab_config(params), a, b)
        for r in records:
            arm = "A" if r["variant"] == a else "B" if r["variant"] == b else None
            if arm is not None:
                test.add(arm, {"ms_per_token": float(r["latency_ms"]) / max(int(r.get("completion_tokens") or 0), 1),
                               "latency_ms": float(r["latency_ms"]), "error": float(r["outcome"] != "ok")})
        result = {**test.decision(), "requests": counts, "quality": "judged by the canary's shadow comparisons; "
                                                                     "the request log carries none"}
    write_json(_dir(ws, run_id) / "ab.json", result)
    return {"decision": result["decision"], "reason": result["reason"]}


# -- drift ---------------------------------------------------------------------------------------------------
def reference_prompts(params: Any, ws: Any) -> list[str]:
    """The prompts the deployed variants were calibrated and validated on."""
    from costopt.evaluation.reference import read_jsonl

    rows = []
    for name in ("calibration.jsonl", "prompts.jsonl"):
        if (ws.data_dir / name).is_file():
            rows += read_jsonl(ws.data_dir / name)
    return prompt_texts(rows)[:params.continuous.reference_prompts]


def embed(texts: list[str]) -> np.ndarray:
    """Sentence embeddings [n, 384] from the semantic cache's embedder, run in the serving environment."""
    from costopt.deploy.processes import PROJECT, serving_python

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "texts.json", Path(tmp) / "emb.npy"
        src.write_text(json.dumps(texts))
        proc = subprocess.run([str(serving_python()), "-m", "costopt.cache.embed", "--texts", str(src), "--out",
                               str(out)], cwd=PROJECT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"embedding {len(texts)} prompts failed: {proc.stderr[-2000:]}")
        return np.load(out)


def drift(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    from costopt.online.drift import mmd_test

    c = params.continuous
    recent = prompt_texts(_records(params, ws).records)
    reference = reference_prompts(params, ws)
    result: dict[str, Any] = {"recent_prompts": len(recent), "reference_prompts": len(reference),
                              "test": "MMD (Gaussian kernel, median bandwidth), permutation p-value"}
    if len(recent) < c.min_prompts:
        result.update(drifted=None, decision="undecided",
                      reason=f"{len(recent)} logged prompts in the window, {c.min_prompts} needed (the server logs "
                             f"prompt text only with serve.log_prompts: true)")
    elif len(reference) < 5:
        result.update(drifted=None, decision="undecided", reason="no reference prompts (run optimize_model first)")
    else:
        emb = embed(reference + recent)
        test = mmd_test(emb[:len(reference)], emb[len(reference):], alpha=c.drift_alpha, permutations=c.permutations)
        result.update(test.to_dict(), decision="drift" if test.drifted else "no drift",
                      reason=f"p = {test.p_value:.4f} {'<' if test.drifted else '>='} alpha {c.drift_alpha}")
    write_json(_dir(ws, run_id) / "drift.json", result)
    return {k: result.get(k) for k in ("decision", "reason", "p_value")}


# -- decision and report ---------------------------------------------------------------------------------------
def decide(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    folder = _dir(ws, run_id)
    drift_result = read_json(folder / "drift.json") if (folder / "drift.json").is_file() else {}
    reasons = []
    if drift_result.get("decision") == "drift":
        reasons.append(f"the prompts drifted ({drift_result.get('reason')})")
    reoptimize = bool(reasons) and params.continuous.reoptimize
    result = {"reoptimize": reoptimize, "reasons": reasons or ["no drift detected"],
              "trigger": {"dag_id": "optimize_model", "conf": {"workspace": str(ws.root),
                                                               "profile": params.continuous.profile}}
              if reoptimize else None}
    if reasons and not params.continuous.reoptimize:
        result["reasons"].append("continuous.reoptimize is false: not triggered")
    write_json(folder / "decision.json", result)
    return result


def report(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    folder = _dir(ws, run_id)
    parts = {name: read_json(folder / f"{name}.json") for name in ("traffic", "ab", "drift", "decision")
             if (folder / f"{name}.json").is_file()}
    out = ws.root / "reports" / "continuous" / folder.name / "decisions.json"
    write_json(out, {"run_id": run_id, **parts})
    return {"report": str(out.relative_to(ws.root))}


def main(argv: list[str] | None = None) -> int:
    from costopt.params import load_params
    from costopt.storage.layout import Workspace

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", default=".")
    p.add_argument("--run-id", default="manual")
    p.add_argument("--profile", choices=("quick", "full"), default=None)
    args = p.parse_args(argv)
    ws = Workspace.from_env(args.workspace)
    params = load_params(ws.root / "params.yaml", profile=args.profile)
    for phase in (traffic, ab_test, drift, decide, report):
        print(f"{phase.__name__}: {json.dumps(phase(params, ws, args.run_id))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
