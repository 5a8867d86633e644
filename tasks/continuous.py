"""The continuous_optimization DAG's phases: read production traffic, A/B-test the variants that served
it, test the prompts and the served variant's quality for drift, decide, and write every decision with
its evidence.

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
- `quality`: the variant in service (the rollout's current one, else the deployment record's, else the
  window's most-served) measured against fp32 on `continuous.quality_prompts` of the window's logged
  prompts, with the validate phase's own KL and top-1 code and CIs (`costopt.online.livequality`):
  drift when a gate fails for sure on live traffic or the KL is significantly worse than validated.
- `decide`: re-optimize when the prompts or the quality drifted (and `continuous.reoptimize`); the DAG
  then triggers `optimize_model`, the same code path, which calibrates on the request log
  (`calibrate.source: auto`), re-distills when `continuous.redistill`, gates every candidate and hands
  the winner to the deployment's canary.

    python -m tasks.continuous --workspace . [--run-id manual]   # every phase in order, no Airflow
"""
from __future__ import annotations

import argparse
import collections
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
    # alpha is split evenly over the three request metrics here and the quality guard (ab_test)
    return ABConfig("ms_per_token", (Metric("ms_per_token", "lower", 20.0),
                                     Metric("latency_ms", "lower", 500.0, 250.0),
                                     Metric("error", "lower", 0.02, 0.01)),
                    alpha=c.ab_alpha * 3 / 4, min_samples=c.ab_min_samples)


def _rollout(ws: Any, run_id: str) -> dict[str, Any]:
    """The deployment's rollout state as the traffic phase saw it ({} when none was running)."""
    traffic_file = _dir(ws, run_id) / "traffic.json"
    return ((read_json(traffic_file).get("deployment") or {}).get("rollout") or {}) if traffic_file.is_file() else {}


def ab_arms(ws: Any, run_id: str, records: list[dict[str, Any]]) -> tuple[str | None, str | None, dict[str, int]]:
    """(A, B, requests per variant): the two variants that served most of the window, A the deployment's
    current one when it is one of them; (None, None, counts) when fewer than two served."""
    # most requests first, ties in log order
    counts = dict(collections.Counter(str(r["variant"]) for r in records).most_common())
    served = list(counts)
    if len(served) < 2:
        return None, None, counts
    current = _rollout(ws, run_id).get("current")
    a = current if current in served[:2] else served[0]
    return a, next(v for v in served if v != a), counts


QUALITY_GUARD = "kl_mean (live prompts, paired)"


def ab_test(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    """The A/B test on the window's requests, with the quality phase's paired KL of both arms as a guard."""
    from costopt.online.abtest import ABTest, paired_guard, with_guard

    records = _records(params, ws).records
    a, b, counts = ab_arms(ws, run_id, records)
    if a is None:
        result = {"decision": "undecided", "reason": f"{len(counts)} variant(s) served the window; an A/B test "
                                                     f"needs two", "requests": counts}
    else:
        test = ABTest(ab_config(params), a, b)
        for r in records:
            arm = "A" if r["variant"] == a else "B" if r["variant"] == b else None
            if arm is not None:
                test.add(arm, {"ms_per_token": float(r["latency_ms"]) / max(int(r.get("completion_tokens") or 0), 1),
                               "latency_ms": float(r["latency_ms"]), "error": float(r["outcome"] != "ok")})
        result = {**test.decision(), "requests": counts}
        qfile = _dir(ws, run_id) / "quality.json"
        arms = (read_json(qfile).get("arms") or {}) if qfile.is_file() else {}
        if a in arms and b in arms:
            guard = paired_guard(arms[a]["per_prompt_kl"], arms[b]["per_prompt_kl"],
                                 margin=params.continuous.ab_kl_margin, better="lower",
                                 alpha=params.continuous.ab_alpha / 4)
        else:  # quality unknown: B cannot win on cost alone (with_guard keeps a B decision undecided)
            guard = {"verdict": "not measured", "reason": (read_json(qfile).get("arms_reason") if qfile.is_file()
                                                           else None) or "no quality phase output"}
        result = with_guard(result, QUALITY_GUARD, guard)
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


# -- quality drift -----------------------------------------------------------------------------------------------
def served_variant(ws: Any, run_id: str, records: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the variant in service, where that came from): the rollout's current variant as the traffic phase
    saw it, else the last deploy's record, else the variant that served most of the window."""
    rollout = _rollout(ws, run_id)
    if rollout.get("current"):
        return str(rollout["current"]), "the running deployment's rollout state"
    record = ws.root / "artifacts" / "serving" / "deployment.json"
    if record.is_file():
        current = read_json(record).get("current")
        if current:
            return str(current), str(record.relative_to(ws.root))
    most = collections.Counter(str(r["variant"]) for r in records).most_common(1)
    if most:
        return most[0][0], "the variant that served most of the window"
    return None, "no request in the window"


def _unmeasurable(ws: Any, name: str) -> str | None:
    """Why variant `name` (a name from the request log: never trusted) cannot be scored here, or None."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        return f"{name!r} is not a variant name"
    if name != "fp32" and not ws.variant_dir(name).is_dir():
        return f"variant {name!r} is not built in this workspace ({ws.variant_dir(name)})"
    return None


def quality(params: Any, ws: Any, run_id: str, variant: str | None = None) -> dict[str, Any]:
    """Quality drift of the variant in service (or `variant`) on live traffic, and the live KL of both A/B
    arms on the same prompts (the A/B test's quality guard); writes quality.json."""
    from costopt.evaluation.reference import load_reference
    from costopt.models.source import load_model_dir
    from costopt.online.livequality import distinct_conversations, judge, live_prompt_set, measure_live, sample
    from costopt.runtimes.base import RuntimeFailure
    from costopt.runtimes.registry import load_scorer
    from costopt.storage.layout import MissingArtifactError

    c = params.continuous
    records = _records(params, ws).records
    name, source = (variant, "asked for") if variant else served_variant(ws, run_id, records)
    a, b, _counts = ab_arms(ws, run_id, records)
    distinct = distinct_conversations(records)
    convs, logged = sample(distinct, c.quality_prompts), len(distinct)
    result: dict[str, Any] = {"variant": name, "variant_from": source, "prompts_logged": logged,
                              "test": "validate's KL mean / KL p99 / top-1 against fp32 on a seeded sample of the "
                                      "window's logged prompts answered by fp32, 95% bootstrap CIs"}
    why = None
    if name is None:
        why = "no request in the window"
    elif logged < c.min_prompts:
        why = (f"{logged} distinct logged prompts in the window, {c.min_prompts} needed (the server logs prompt "
               f"text only with serve.log_prompts: true)")
    wanted = [n for n in dict.fromkeys([name, a, b]) if n]
    skipped = {n: r for n in wanted if (r := _unmeasurable(ws, n))}
    measured: dict[str, dict[str, Any]] = {}
    if why is None and any(n not in skipped and n != "fp32" for n in wanted):
        try:
            ref = load_reference(params, ws)
            prompts = live_prompt_set(load_model_dir(ws.model_dir)[0], ref, convs, params.evaldata.reference_tokens)
        except MissingArtifactError as exc:
            why = f"cannot measure: {exc}"
        else:
            for n in wanted:
                if n == "fp32":  # fp32 against itself: KL 0 at every position, by definition
                    measured[n] = {"per_prompt_kl": [0.0] * len(prompts.texts)}
                elif n not in skipped:
                    try:
                        measured[n] = measure_live(load_scorer(ws, n)[0], ref, prompts, params.validate.bootstrap)
                    except RuntimeFailure as exc:
                        skipped[n] = f"cannot measure {n!r}: {exc}"
    served_why = why or skipped.get(name) or \
        ("fp32 itself is in service: nothing to compare it with" if name == "fp32" else None)
    if served_why:
        result.update(decision="undecided", reason=served_why)
    else:
        live = measured[name]
        qfile = ws.quality_file(name)
        validated = read_json(qfile).get("metrics") if qfile.is_file() else None
        decision, reasons = judge(live, validated, params.validate.gates)
        result.update(live=live,
                      validated={k: (validated or {}).get(k) for k in ("kl_mean", "kl_p99", "top1_agreement")},
                      decision=decision, reasons=reasons,
                      reason="; ".join(reasons) or "every prompt gate holds on live traffic and the KL is not "
                                                   "significantly worse than validated")
    if a is None:
        result["arms_reason"] = "fewer than two variants served the window"
    elif a in measured and b in measured:
        result["arms"] = {n: {"kl_mean": measured[n].get("kl_mean"), "per_prompt_kl": measured[n]["per_prompt_kl"]}
                          for n in (a, b)}
    else:
        result["arms_reason"] = why or "; ".join(skipped[n] for n in (a, b) if n in skipped)
    write_json(_dir(ws, run_id) / "quality.json", result)
    return {k: result.get(k) for k in ("variant", "decision", "reason")}


# -- watching for new traffic: the traffic_watch DAG's phases, which post the asset events ----------------------
WATCHED = ("request_log", "serving_metrics")


def _watch_state(ws: Any) -> Path:
    return ws.root / ".costopt" / "continuous" / "watch.json"  # not versioned: the watcher's own bookkeeping


def _count(params: Any, ws: Any, what: str) -> int | None:
    """Requests the request log holds, or the running deployment's predictor has counted (None: not running)."""
    if what == "request_log":
        return len(read_log(ws.root / params.calibrate.logs).records)
    deployment = _deployment(ws)
    if deployment is None or "metrics" not in deployment:
        return None
    return int(sum(v for k, v in deployment["metrics"].items() if k.startswith("costopt_requests_total")))


def watch(params: Any, ws: Any, what: str) -> dict[str, Any]:
    """Whether `what` ("request_log" | "serving_metrics") gained at least `continuous.announce_requests`
    requests since its last announcement: {"announce": bool, "count", "since", "reason"}. A count below
    the last one (the log rotated, the predictor restarted) starts over from zero."""
    if what not in WATCHED:
        raise ValueError(f"watch: expected one of {WATCHED}, got {what!r}")
    file = _watch_state(ws)
    try:
        last = int((read_json(file) if file.is_file() else {}).get(what, 0))
    except (ValueError, TypeError, OSError):  # a damaged state file: start over rather than stop watching
        last = 0
    count = _count(params, ws, what)
    if count is None:
        return {"announce": False, "count": None, "since": last, "reason": "the deployment is not running"}
    since = last if count >= last else 0
    new, need = count - since, params.continuous.announce_requests
    return {"announce": new >= need, "count": count, "since": since,
            "reason": f"{new} new request(s) since the last announcement, {need} needed"}


def announced(ws: Any, what: str, count: int) -> None:
    """Record that `what` was announced at `count` requests (after its asset event was posted)."""
    file = _watch_state(ws)
    try:
        state = read_json(file) if file.is_file() else {}
    except (ValueError, OSError):
        state = {}
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, {**state, what: int(count)})


# -- decision and report ---------------------------------------------------------------------------------------
def decide(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    folder = _dir(ws, run_id)
    found = {name: read_json(folder / f"{name}.json") if (folder / f"{name}.json").is_file() else {}
             for name in ("drift", "quality")}
    reasons = []
    if found["drift"].get("decision") == "drift":
        reasons.append(f"the prompts drifted ({found['drift'].get('reason')})")
    if found["quality"].get("decision") == "drift":
        reasons.append(f"the quality of {found['quality'].get('variant')} drifted on live traffic "
                       f"({found['quality'].get('reason')})")
    reoptimize = bool(reasons) and params.continuous.reoptimize
    result = {"reoptimize": reoptimize, "reasons": reasons or ["no drift detected"],
              "trigger": {"dag_id": "optimize_model", "conf": {"workspace": str(ws.root),
                                                               "profile": params.continuous.profile,
                                                               "distill": params.continuous.redistill}}
              if reoptimize else None}
    if reasons and not params.continuous.reoptimize:
        result["reasons"].append("continuous.reoptimize is false: not triggered")
    write_json(folder / "decision.json", result)
    return result


def report(params: Any, ws: Any, run_id: str) -> dict[str, Any]:
    folder = _dir(ws, run_id)
    parts = {name: read_json(folder / f"{name}.json") for name in ("traffic", "ab", "drift", "quality", "decision")
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
    for phase in (traffic, ab_test, drift, quality, decide, report):
        print(f"{phase.__name__}: {json.dumps(phase(params, ws, args.run_id))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
