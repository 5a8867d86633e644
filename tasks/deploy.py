"""The deploy phase: serve the winners on loopback, load-test them, and promote them to the deployment.

The servers are processes of the serving environment (`costopt.deploy.processes`). The phase serves
fp32 and the passing `serve.variants` on one predictor, replays the serving trace against it (and
through the gateway: the semantic cache, the router), stops those test servers, and writes
artifacts/serving/serving.json. On Kubernetes the same variants are InferenceServices (infra/).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import httpx

from costopt.deploy.processes import DeployError, first_traceback, start_gateway, start_server
from costopt.storage.s3 import TransientStorageError


class DeployStorageFault(DeployError, TransientStorageError):
    """Fetching missing weights from the remote hit a fault that may pass (timeout, 5xx, lost connection);
    the DAG's deploy task retries it with back-off."""


def check_load_test(runs: Sequence[dict[str, Any]], log: str) -> None:
    """A load test with server errors or lost requests fails the run (DeployError), naming the runs and quoting
    the server log's first traceback. 429s are not errors: deadline admission refuses what it forecasts late."""
    bad = [r for r in runs if r["errors"] or r["lost"]]
    if not bad:
        return
    what = "; ".join(f"{r['variant']} at concurrency {r['concurrency']}: {r['errors']} errors, {r['lost']} lost "
                     f"of {r['requests']}" + (f" (e.g. {r['error_examples'][0]})" if r.get("error_examples") else "")
                     for r in bad)
    trace = first_traceback(log)
    raise DeployError(f"the load test on the deployed server failed: {what}; "
                      + (f"the server log's first traceback:\n{trace}" if trace else "the server log has no traceback"))


# ------------------------------------------------------------------------------------- the phase

def _git_revision(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def choose_variants(params: Any, ws: Any) -> tuple[list[str], dict[str, str]]:
    """(variants to serve, fp32 first; {name: why it is left out}) from the search's pick and the gates."""
    from costopt.storage.layout import read_json

    search, gates = read_json(ws.search_dir / "search.json"), read_json(ws.search_dir / "gates.json")
    chosen, left_out = ["fp32"], {}
    for want in params.serve.variants:
        name = search.get("picked") if want == "picked" else want
        if not name:
            left_out[want] = "the search picked nothing (no variant passed its gates)"
        elif name not in gates["variants"]:
            left_out[name] = "not built in this run (quantize.variants)"
        elif not gates["variants"][name]["passed"]:
            left_out[name] = "failed its gates: " + "; ".join(gates["variants"][name]["reasons"])
        elif name not in chosen:
            chosen.append(name)
    return chosen, left_out


def router_tiers(params: Any, ws: Any) -> tuple[Path | None, list[str]]:
    """(the route phase's router file, its tiers) when routing is on and the file exists, else (None, [])."""
    from costopt.routing.router import RouterConfig, RouterConfigError
    from costopt.storage.layout import read_json

    path = ws.root / "artifacts" / "route" / "router.json"
    if not params.route.enabled or not path.is_file():
        return None, []
    try:
        return path, [t.name for t in RouterConfig.from_dict(read_json(path)).tiers]
    except (ValueError, RouterConfigError) as exc:
        raise DeployError(f"{path}: not a usable router ({exc}); re-run the route phase") from exc


def _routing_section(items: Any, res: Any, route_record: dict[str, Any], reference: str, run: dict[str, Any],
                     off: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's `serving.routing`: the routed load run (which tiers answered, by the responses'
    headers) next to the reference alone, and the route phase's judged retention."""
    ok = [r for r in res.records if r.outcome == "ok"]
    last = [(r.variant or "").split(",")[-1] for r in ok]
    judge = route_record.get("judge") or {}
    retention = judge.get("retention") or {}
    return {"tiers": [t["name"] for t in route_record["router"]["tiers"]],
            "thresholds": [t["threshold"] for t in route_record["router"]["tiers"]],
            "dropped": list(route_record.get("dropped") or []),  # cheap tiers the fit left too little to do
            "requests": len(ok), "cheap_share": sum(v != reference for v in last) / len(ok) if ok else 0.0,
            "finished_on": {v: last.count(v) for v in sorted(set(last))},
            "escalation_rate": sum(bool(r.escalations) for r in ok) / len(ok) if ok else 0.0,
            "quality_retention": retention.get("value"), "retention_lower95": (retention.get("ci95") or [None])[0],
            "judged_on": judge.get("requests"),
            "task_retention": ((judge.get("tasks") or {}).get("retention") or {}).get("value"),  # None: undefined
            "task_retention_lower95": (((judge.get("tasks") or {}).get("retention") or {}).get("ci95") or [None])[0],
            "task_items": (judge.get("tasks") or {}).get("items"),
            "cost_per_1m_requests_usd": run.get("cost_per_1m_requests_usd"),
            "cost_per_1m_requests_usd_reference_alone": (off or {}).get("cost_per_1m_requests_usd")}


def _fingerprint(ws: Any, name: str) -> str:
    from costopt.storage.layout import read_json

    if name == "fp32":
        return read_json(ws.model_dir / "fingerprint.json")["fingerprint"]
    return read_json(ws.variant_dir(name) / "spec.json")["fingerprint"]


def _device(ws: Any, name: str) -> str:
    """Where the runtime serving `name` runs (`Runtime.device`: a "cuda" one's InferenceService requests a GPU)."""
    from costopt.models.variants import read_spec
    from costopt.runtimes.registry import spec_runtime

    return "cpu" if name == "fp32" else spec_runtime(read_spec(ws, name))[0].device


def _weights(ws: Any, name: str) -> Path:
    """The file `name` runs from: fp32's safetensors, or the variant's runtime's own file (spec.json first)."""
    from costopt.models.variants import read_spec
    from costopt.runtimes.registry import spec_runtime

    if name == "fp32":
        return ws.model_dir / "model.safetensors"
    folder = ws.variant_dir(name)
    if not (folder / "spec.json").is_file():
        return folder / "model.safetensors"  # no spec to name its runtime: the torch runtime's file
    return folder / spec_runtime(read_spec(ws, name))[0].weights_file


def _in_place(ws: Any, name: str) -> bool:
    """The file `name` runs from is here, and so is its base model's config (a student* variant's base is
    the distilled student, versioned by the distill stage)."""
    from costopt.models.variants import base_dir, read_spec

    if not _weights(ws, name).is_file():
        return False
    if name == "fp32" or not (ws.variant_dir(name) / "spec.json").is_file():
        return True
    return (base_dir(ws, read_spec(ws, name).base) / "config.json").is_file()


def ensure_local(params: Any, ws: Any, names: Sequence[str]) -> list[str]:
    """Make sure the weights of every variant in `names` are in the workspace: when any is missing, fetch
    the run's versioned outputs (dvc.lock) from the DVC remote on S3 (`tasks.version.pull`). Returns the
    names that had to be fetched; raises DeployError naming what is still missing."""
    missing = [n for n in names if not _in_place(ws, n)]
    if not missing:
        return []
    from costopt.storage.s3 import StorageError
    from costopt.storage.dvc import DvcError
    from tasks.version import pull

    try:
        pull(ws, params)
    except TransientStorageError as exc:  # the DAG's deploy task retries it with back-off
        raise DeployStorageFault(f"variants {', '.join(missing)}: no weights in {ws.root}, and fetching them from "
                                 f"the DVC remote {params.version.remote} failed on a fault that may pass "
                                 f"(the DAG retries): {exc}") from exc
    except (DvcError, StorageError, OSError, ValueError) as exc:
        raise DeployError(f"variants {', '.join(missing)}: no weights in {ws.root}, and fetching them from the "
                          f"DVC remote {params.version.remote} failed: {exc}") from exc
    still = [f"{_weights(ws, n)} (or its base model)" for n in missing if not _in_place(ws, n)]
    if still:
        raise DeployError(f"after `dvc pull` from {params.version.remote}, still missing: {', '.join(still)}; "
                          f"expected a workspace whose dvc.lock records these variants")
    return missing


def _cache_state(url: str) -> dict[str, Any]:
    """The gateway's cache setting (or why it is off), from its readiness details."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        state = http.get(f"{url}/v2/health/ready").json()["details"]["cache"]
    if not state.get("enabled"):
        return {"enabled": False, "reason": state.get("reason")}
    return {"enabled": True, "threshold": state["threshold"], "min_phrase_sim": state["min_phrase_sim"]}


def _write_records(path: Path, records: Any) -> None:
    """One JSON line per request of a load run (send time, latency, cache header, answer digest), so a
    judged cache hit can be traced back to the request it came from."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records))
    tmp.replace(path)


def deploy(params: Any, ws: Any) -> dict[str, Any]:
    """Serve the winners (fp32 + the passing `serve.variants`) on loopback, run the short load test on
    the serving trace, stop those servers, hand the pick to the lasting deployment (`serve.keep`), and
    write artifacts/serving/serving.json (`deployed`, `deployment`, `serving`) and deployment.json."""
    from costopt.evaluation.cost import cost_per_1m_requests
    from costopt.storage.layout import read_json, write_json
    from costopt.workload.trace import build_trace, trace_meta
    from tasks.loadtest import cache_outcome, run_load, serving_section, summarize

    cfg, out_dir = params.serve, ws.root / "artifacts" / "serving"
    if not cfg.enabled:
        result = {"deployed": [], "serving": None, "skipped": "serve.enabled is false"}
        write_json(out_dir / "serving.json", result)
        return result
    variants, left_out = choose_variants(params, ws)
    router_file, tiers = router_tiers(params, ws)
    served = [*variants, *[t for t in tiers if t not in variants]]  # the router's tiers load beside the winners
    fetched = ensure_local(params, ws, served)
    items = build_trace(max(cfg.loadtest_requests, 16), cfg.trace_seed)
    flags = predictor_flags(params, ws)
    price, runs = params.cost.price_per_hour_usd, []
    picked = read_json(ws.search_dir / "search.json").get("picked")
    tested = picked if picked in variants else variants[-1]  # the search's pick when it serves, else the last
    cache: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    route_flags = (["--router", str(router_file), "--router_model", params.route.model,
                    "--router_fallback", picked] if router_file is not None and picked else [])
    with start_server(ws.root, served, out_dir / "server.log", flags) as srv:
        for c in cfg.loadtest_concurrency:
            for name in dict.fromkeys([tested, "fp32"]):  # the pick (or the last winner), then fp32
                res = run_load(srv.url, name, items, concurrency=c, requests=cfg.loadtest_requests)
                config = {"batching": True, "cache": False, "routing": False, "variants": [name]}
                runs.append({**summarize(res, price, config), "variant": name})
        check_load_test(runs, srv.logs(10**7))
        if cfg.gateway:  # the same trace through the gateway, its semantic cache on (a fresh L2)
            shutil.rmtree(out_dir / "cache-l2", ignore_errors=True)
            gw_flags = ["--cache_dir", str(out_dir / "cache-l2"), *gw_flags_for(params, ws)]
            with start_gateway(ws.root, srv.url, served, out_dir / "gateway.log", [*gw_flags, *route_flags]) as gw:
                c = max(cfg.loadtest_concurrency)
                res = run_load(gw.url, tested, items, concurrency=c, requests=cfg.loadtest_requests)
                config = {"batching": True, "cache": True, "routing": False, "variants": [tested], "gateway": True}
                gw_run = {**summarize(res, price, config), "variant": tested}
                check_load_test([gw_run], gw.logs(10**7) + srv.logs(10**7))
                runs.append(gw_run)
                cache = {**cache_outcome(items, res.records, keyed_tenants=False),  # an open gateway: one tenant
                         **_cache_state(gw.url)}
                _write_records(out_dir / "gateway-requests.jsonl", res.records)  # what the cache judge read
        if route_flags:  # the same trace for the routed model, cache off: what routing alone saves
            with start_gateway(ws.root, srv.url, served, out_dir / "gateway-routed.log",
                               ["--no_cache", *route_flags]) as gw:
                c = max(cfg.loadtest_concurrency)
                res = run_load(gw.url, params.route.model, items, concurrency=c, requests=cfg.loadtest_requests)
                config = {"batching": True, "cache": False, "routing": True, "variants": tiers, "gateway": True}
                routed_run = {**summarize(res, price, config), "variant": params.route.model}
                check_load_test([routed_run], gw.logs(10**7) + srv.logs(10**7))
                runs.append(routed_run)
                off = next((r for r in runs if r["variant"] == tested and r.get("concurrency") == c
                            and not r["config"].get("gateway")), None)
                routing = _routing_section(items, res, read_json(ws.root / "artifacts" / "route" / "route.json"),
                                           tiers[-1], routed_run, off)
        if cfg.gateway and cache is not None:
            cal_file = ws.root / ".costopt" / "cache" / "calibration.json"
            if cache.get("enabled") and cal_file.is_file():  # the held pairs' figures and curve, for the report
                cal = read_json(cal_file)
                cache["calibration"] = {k: cal[k] for k in ("setting", "max_false_hit", "curve")}
                cache["calibration"]["held"] = {"overall": cal["held"]["overall"], "kinds": cal["held"]["kinds"]}
    lasting = _promote(params, ws, served, picked if picked in variants else None, flags,
                       [*gw_flags_for(params, ws), *route_flags])
    base = read_json(ws.bench_dir / "baseline.json")
    naive_s = base.get("naive", base)["machine_seconds_per_request"]  # records before the served cost: top level
    naive = round(cost_per_1m_requests(price, float(naive_s)), 4)
    costs = [r["cost_per_1m_requests_usd"] for r in runs if r["errors"] == 0 and r["cost_per_1m_requests_usd"]]
    revision = _git_revision(ws.root)
    result = {
        "deployed": [{"name": n, "fingerprint": _fingerprint(ws, n), "where": _where(n, lasting),
                      "dvc_revision": revision} for n in variants],
        "deployment": lasting,
        "left_out": left_out,
        "fetched_from_remote": fetched,  # variants whose weights came from the DVC remote for this deploy
        "serving": serving_section(trace_meta(items), runs, naive_cost_per_1m_requests_usd=naive,
                                   optimized_cost_per_1m_requests_usd=min(costs) if costs else None,
                                   **({"cache": cache} if cache else {}), **({"routing": routing} if routing else {})),
    }
    manifests = _write_manifests(params, ws, served, lasting.get("current") or picked or variants[-1],
                                 lasting.get("canary"), revision)
    result["manifests"] = manifests
    write_json(out_dir / "serving.json", result)
    if lasting.get("action") not in (None, "off"):  # the versioned record of what serves where
        write_json(out_dir / "deployment.json", {**lasting, "git_revision": revision, "variants": [
            {"name": n, "fingerprint": _fingerprint(ws, n)} for n in served]})
    return {"deployed": variants, "left_out": left_out, "runs": len(runs), "fetched_from_remote": fetched,
            "deployment": {k: lasting.get(k) for k in ("action", "current", "canary", "gateway_url")}}


def _write_manifests(params: Any, ws: Any, served: list[str], current: str, canary: str | None,
                     revision: str | None) -> list[str]:
    """The same deployment as Kubernetes manifests under the workspace's infra/k8s/ (costopt.deploy.manifests)."""
    from costopt.deploy.manifests import plan_from, write_manifests

    plan = plan_from(params.serve.deployment, current, canary,
                     [(n, _weights(ws, n).stat().st_size, _fingerprint(ws, n), _device(ws, n)) for n in served],
                     revision or "")
    return [str(p.relative_to(ws.root)) for p in write_manifests(ws.root / "infra" / "k8s", plan)]


def predictor_flags(params: Any, ws: Any) -> list[str]:
    """The predictor's admission and request-log flags from `serve` (the lasting one's too)."""
    cfg = params.serve
    return ["--max_batch", str(cfg.max_batch), "--max_wait_ms", str(cfg.max_wait_ms),
            "--max_queue", str(cfg.max_queue), "--reserved_high", str(cfg.reserved_high),
            "--request_log", str(ws.root / params.calibrate.logs), *(["--log_prompts"] if cfg.log_prompts else [])]


def gw_flags_for(params: Any, ws: Any) -> list[str]:
    """The gateway's cache flags, with the calibration the load test's gateway made."""
    return ["--calibration", str(ws.root / ".costopt" / "cache" / "calibration.json"), *params.cache.gateway_flags()]


def _promote(params: Any, ws: Any, served: list[str], picked: str | None, predictor_flags: list[str],
             gateway_flags: list[str]) -> dict[str, Any]:
    """Hand the pick to the lasting deployment (costopt.deploy.lasting), after the load test passed."""
    from costopt.deploy import lasting

    cfg = params.serve
    if not cfg.keep:
        return {"action": "off", "reason": "serve.keep is false"}
    if picked is None:  # nothing passed: a running deployment stays as it is; none running serves the model as is
        state = lasting.status(ws.root)
        if state is not None and state["running"]:
            return {"action": None, "reason": "the search picked no passing variant: the deployment is left as it is"}
        picked = "fp32"
    return lasting.promote(ws.root, served, picked, cfg.deployment, cfg.predictor_port, cfg.gateway_port,
                           dict(cfg.canary), predictor_flags, gateway_flags,
                           fingerprints={n: _fingerprint(ws, n) for n in served})


def _where(name: str, lasting: dict[str, Any]) -> str:
    if lasting.get("gateway_url") and name in (lasting.get("current"), lasting.get("canary")):
        role = "current" if name == lasting.get("current") else "canary"
        return (f"lasting loopback deployment {lasting['deployment']!r} ({role}): gateway {lasting['gateway_url']}, "
                f"predictor {lasting['predictor_url']}")
    if lasting.get("predictor_url"):
        return f"loaded on the lasting deployment's predictor {lasting['predictor_url']}"
    return "loopback KServe server (python -m serving), stopped after the load test"


if __name__ == "__main__":
    from tasks.cli import run_phase

    raise SystemExit(run_phase("Deploy the winners on loopback and load-test them", deploy))
