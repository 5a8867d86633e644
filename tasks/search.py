"""Phase 6, search: the cheapest variant that passes the gates, mixed precision included.

Run it as `python -m tasks.search` after every named variant was quantized, benchmarked and validated.
1. Reads each variant's quality verdict and measured cost.
2. Unless search.enabled is false, plans mixed-precision candidates from the sensitivity scan and the
   kernel cost table (`costopt.search.frontier.greedy_path`), then quantizes, validates and benchmarks the few
   that `bisect_path` probes (search.max_evaluations at most). They land in artifacts/search/.
3. Gates every candidate together in one Great Expectations run (the Data Docs the report links),
   picks the cheapest passing one and the Pareto front of cost versus KL.
Writes artifacts/search/{search.json, quality.json, gates.json, data_docs/}.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from costopt.storage.layout import MissingArtifactError, Workspace, read_json, replace_dir, staging_dir, write_json
from costopt.params import Params
from costopt.quantization.schemes import MixedConfig
from costopt.search.frontier import Point, bisect_path, cheapest_passing, greedy_path, merge_path, pareto_front, rule_points


def _need(path, phase: str) -> Any:
    if not path.is_file():
        raise MissingArtifactError(f"{path}: missing; run the {phase} phase first")
    return read_json(path)


def mixed_name(assign: dict[str, str], cfg: Any) -> str:
    blob = json.dumps({"assign": sorted(assign.items()), "g": cfg.group_size, "m": cfg.method}).encode()
    return f"mixed_{hashlib.sha256(blob).hexdigest()[:10]}"


def evaluate_mixed(params: Params, ws: Workspace, point: Point) -> tuple[bool, float | None, dict[str, Any]]:
    """Quantize, validate and benchmark one mixed assignment (reused when already built)."""
    from tasks.benchmark import benchmark_variant
    from tasks.quantize import build_variant
    from tasks.validate import validate_variant

    cfg = MixedConfig(assign=dict(sorted(point.assign.items())), default="int8",
                      group_size=params.search.group_size, method=params.search.method)
    name = mixed_name(point.assign, params.search)
    final = ws.variant_dir(name)
    if not (final / "spec.json").is_file():
        stage = staging_dir(final)
        build_variant(name, cfg, params, ws, stage)
        replace_dir(stage, final)
    validate_variant(params, ws, name)
    benchmark_variant(params, ws, name)
    q = read_json(ws.quality_file(name))
    return bool(q["gate"]["passed"]), q["metrics"]["kl_mean"]["value"], {"name": name, "label": point.label}


def plan_path(params: Params, ws: Workspace) -> tuple[list[Point], dict[str, Any]]:
    record = _need(ws.sensitivity_dir / "sensitivity.json", "sensitivity")
    if not record.get("enabled"):
        raise MissingArtifactError(f"{ws.sensitivity_dir / 'sensitivity.json'}: written with search.enabled "
                                   "false; rerun the sensitivity phase")
    sens, cost = record["scan"]["parts"], record["costs"]["parts"]
    path = merge_path(greedy_path(sens, cost, tuple(params.search.precisions)), rule_points(sens, cost))
    return path, record


def _mixed_cannot_win(params: Params, ws: Workspace, names: list[str]) -> str | None:
    """Why no mixed INT8/INT4 candidate can be the pick, or None: the cheapest passing named candidate
    already costs less than a lower bound on every mixed candidate's cost (`mixed_cost_floor`, from
    the measured all-INT8 variant), so quantizing and validating them would change nothing.

    Mixed candidates run on the torch engine; when a faster runtime's variant passes (llama.cpp's Q8_0
    decodes about twice as fast as torch INT8 here), this saves the search's whole cost: in the
    full-profile demo two GPTQ fits, two full validations and two benchmarks, about 7 minutes."""
    from costopt.search.frontier import mixed_cost_floor

    int8 = "int8_weight_only"
    if int8 not in names:
        return None
    rows = [{"name": n, "cost": read_json(ws.bench_file(n))["cost_per_1m_requests_usd"],
             "passed": read_json(ws.quality_file(n))["gate"]["passed"]} for n in names]
    best = cheapest_passing(rows)
    if best is None:
        return None
    path, record = plan_path(params, ws)
    cost = {r["name"]: r["cost"] for r in rows}
    floor = mixed_cost_floor(path, cost[int8], record["costs"]["parts"])
    if cost[best] >= floor:
        return None
    return (f"the cheapest passing candidate, {best}, costs ${cost[best]:.4g} per 1M requests; no mixed "
            f"INT8/INT4 candidate can cost less than ${floor:.4g} (measured {int8} ${cost[int8]:.4g} x the "
            f"cheapest mix's predicted share of its GEMM time), so none was quantized")


def search(params: Params, ws: Workspace) -> dict[str, Any]:
    from tasks.gates import evaluate_gates
    from costopt.evaluation.reference import load_reference

    from costopt.models.variants import read_failure

    failed = [f for f in (read_failure(ws, n) for n in params.quantize.variants) if f]
    names = [n for n in params.quantize.variants if n not in {f["name"] for f in failed}]
    for name in names:  # every named variant that was not ruled out must have been measured
        _need(ws.quality_file(name), "validate")
        _need(ws.bench_file(name), "benchmark_variants")
    mixed: dict[str, Any] = {"enabled": params.search.enabled}
    skip = _mixed_cannot_win(params, ws, names) if params.search.enabled and params.search.skip_dominated else None
    if skip:
        mixed["skipped"] = skip
    if params.search.enabled and not skip:
        path, _ = plan_path(params, ws)
        gate = params.validate.gates.kl_mean_max
        best, trials = bisect_path(path, lambda p: evaluate_mixed(params, ws, p), gate,
                                   params.search.target_margin, params.search.max_evaluations)
        names += [t.result["name"] for t in trials if t.result["name"] not in names]
        mixed.update({
            "path": [{"cost_us": round(p.cost, 1), "predicted_kl": p.kl, "label": p.label,
                      "int4_parts": sum(v == "int4" for v in p.assign.values()),
                      "fp32_parts": sum(v == "fp32" for v in p.assign.values())} for p in path],
            "trials": [{"index": t.index, "name": t.result["name"], "label": t.point.label,
                        "predicted_kl": t.point.kl, "measured_kl": t.measured_kl, "passed": t.passed}
                       for t in trials],
            "best": trials[[t.index for t in trials].index(best)].result["name"] if best is not None else None,
        })
    records = {n: read_json(ws.quality_file(n)) for n in names}
    benches = {n: read_json(ws.bench_file(n)) for n in names}
    ref = load_reference(params, ws)
    quality = {"baseline": ref.info, "variants": {n: r["metrics"] for n, r in records.items()},
               "crosscheck": {n: r.get("crosscheck") for n, r in records.items()},
               "statistic": params.validate.gates.statistic}
    stage = staging_dir(ws.search_dir / "summary")
    verdicts = evaluate_gates(quality["variants"], params.validate.gates, stage / "data_docs")
    for n, r in records.items():
        if verdicts["variants"][n]["passed"] != r["gate"]["passed"]:
            raise RuntimeError(f"variant {n!r}: gate verdict differs between its own run and the combined one")
    verdicts["data_docs"] = str((ws.search_dir / "data_docs" / "index.html").relative_to(ws.root))
    rows = [{"name": n, "cost": benches[n]["cost_per_1m_requests_usd"], "passed": records[n]["gate"]["passed"],
             "kl": records[n]["metrics"]["kl_mean"]["value"]} for n in names]
    base_cost = _need(ws.bench_dir / "baseline.json", "benchmark")["cost_per_1m_requests_usd"]
    result = {
        "candidates": names,
        "picked": cheapest_passing(rows, params.search.cost_tolerance),
        "cost_tolerance": params.search.cost_tolerance,  # the report re-derives the pick with it
        "front": pareto_front([("fp32", base_cost, 0.0)] +
                              [(n, benches[n]["cost_per_1m_requests_usd"], records[n]["metrics"]["kl_mean"]["value"])
                               for n in names]),
        "evaluations": len(names),
        "evaluations_detail": {"named": len(params.quantize.variants),
                               "mixed": len(mixed.get("trials", []))},
        "mixed": mixed,
        "failed": failed,  # candidates ruled out before they could be gated, each with its reason
    }
    write_json(stage / "search.json", result)
    write_json(stage / "quality.json", quality)
    write_json(stage / "gates.json", verdicts)
    _install(stage, ws)
    return {k: result[k] for k in ("picked", "front", "evaluations")}


def _install(stage, ws: Workspace) -> None:
    """Swap the summary files and Data Docs into artifacts/search/ (the mixed variants stay)."""
    import os
    import shutil

    out = ws.search_dir
    out.mkdir(parents=True, exist_ok=True)
    for f in ("search.json", "quality.json", "gates.json"):
        os.replace(stage / f, out / f)
    replace_dir(stage / "data_docs", out / "data_docs")
    shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], search, argv)


if __name__ == "__main__":
    raise SystemExit(main())
