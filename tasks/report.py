"""Phase 7, report: gather every measurement of a run into `reports/<run_id>/summary.json` and a page.

Run it as `python -m tasks.report`. It reads only files other phases wrote (the fp32 model's
fingerprint, speed records, variant specs, quality and gate verdicts; see docs/artifacts.md), builds
the run summary of DESIGN.md, checks it against `schemas/summary.schema.json`, and writes it with a
self-contained `report.html` (cost/quality table, cost-versus-KL Pareto plot, gate thresholds) and a
copy of the Great Expectations Data Docs. Everything is written to a staging folder and swapped in,
then `reports/latest` is re-pointed; a missing or inconsistent input raises before anything under
`reports/` changes. The run id comes from the inputs only, so a re-run rewrites the same folder with
byte-identical `summary.json`.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from costopt.evaluation.cost import Deployment, cheaper_deployment, cost_per_1m_requests, gpu_deployment, served_cost
from costopt.storage.layout import (MissingArtifactError, ReportInputError, Workspace, read_json, replace_dir,
                                    staging_dir, write_json)
from costopt.params import Params
from costopt.runid import run_id as make_run_id
from costopt.search.frontier import cheapest_passing
from tasks.plots import cache_curve_png, curve_png, pareto_png, sensitivity_png

BASELINE = "fp32"
QUALITY_KEYS = ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "task_accuracy", "task_retention")
SPEED_KEYS = ("decode_tok_s_bs1", "throughput_tok_s", "p50_ms", "p95_ms", "p99_ms")
SPEED_EXTRAS = ("decode_tok_s_batch", "decode_batch", "machine_seconds_per_request",
                "slo_p95_ms", "slo_met")
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "summary.schema.json"
WRITERS = {  # dvc.yaml stage -> the command that writes its outputs
    "ingest": "python -m tasks.ingest",
    "benchmark": "python -m tasks.benchmark",
    "quantize": "python -m tasks.quantize",
    "benchmark_variants": "python -m tasks.benchmark --variants",
    "validate": "python -m tasks.validate",
    "reference": "python -m tasks.reference",
    "sensitivity": "python -m tasks.sensitivity",
    "search": "python -m tasks.search",
    "calibration_curve": "python -m tasks.calibcurve",
}


class SummarySchemaError(ValueError):
    """The summary this phase built breaks the schema: a bug in this module, never a user error."""


@dataclass(frozen=True)
class Inputs:
    """Everything the report reads, loaded and cross-checked before anything is written."""
    fingerprint: dict[str, Any]  # artifacts/model/fingerprint.json
    model_size: int  # bytes of the fp32 safetensors
    baseline_speed: dict[str, Any]
    specs: dict[str, dict[str, Any]]  # variant name -> spec.json, sorted by name
    speeds: dict[str, dict[str, Any]]  # variant name -> speed record
    quality: dict[str, Any]
    gates: dict[str, Any]
    data_docs: Path | None  # artifacts/search/data_docs, if the search wrote it
    search: dict[str, Any]  # artifacts/search/search.json
    sensitivity: dict[str, Any] | None  # artifacts/sensitivity/sensitivity.json, when the search ran it
    curve: dict[str, Any] | None  # artifacts/calibration/curve.json, when configured
    serving: dict[str, Any] | None = None  # artifacts/serving/serving.json, when the deploy phase ran
    distill: dict[str, Any] | None = None  # artifacts/distill/distill.json, when the distill phase ran
    root: Path = Path(".")  # the workspace root (logs/timings lives under it)


# ---------------------------------------------------------------------------------------------- inputs

def _missing(ws: Workspace, path: Path, stage: str) -> MissingArtifactError:
    rel = path.relative_to(ws.root) if path.is_relative_to(ws.root) else path
    return MissingArtifactError(f"{rel} is missing: the {stage} phase writes it; run `{WRITERS[stage]}` "
                                f"(or `dvc repro {stage}`) first")


def _load(ws: Workspace, path: Path, stage: str) -> Any:
    if not path.is_file():
        raise _missing(ws, path, stage)
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc}); re-run the {stage} phase") from exc


def _entry(record: dict[str, Any], key: str, where: str, stage: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ReportInputError(f"{where}: missing {key!r}; re-run the {stage} phase")
    return record[key]


def _model_size(ws: Workspace) -> int:
    files = sorted(ws.model_dir.glob("*.safetensors"))  # sharded checkpoints count every shard
    if not files:
        raise _missing(ws, ws.model_dir / "model.safetensors", "ingest")
    return sum(f.stat().st_size for f in files)


def _variant_specs(ws: Workspace, base_fingerprint: str, names: list[str]) -> dict[str, dict[str, Any]]:
    specs = {}
    for name in names:
        path = ws.variant_dir(name) / "spec.json"
        spec = _load(ws, path, "search" if name.startswith("mixed_") else "quantize")
        if _entry(spec, "name", str(path), "quantize") != name:
            raise ReportInputError(f"{path}: name {spec['name']!r} differs from its folder "
                                   f"{name!r}; re-run the quantize phase")
        expected, where = base_fingerprint, "artifacts/model"
        if spec.get("base", "teacher") == "student":  # made from the distilled student: its fingerprint
            student = _load(ws, ws.distill_dir / "student" / "fingerprint.json", "distill")
            if student.get("distilled_from") != base_fingerprint:
                raise ReportInputError(f"{ws.distill_dir / 'student'}: distilled from another model than "
                                       f"artifacts/model ({base_fingerprint[:12]}…); re-run the distill phase")
            expected, where = student["fingerprint"], "artifacts/distill/student"
        if spec.get("base_fingerprint") not in (None, expected):
            raise ReportInputError(f"{path}: built from model {spec['base_fingerprint'][:12]}…, but "
                                   f"{where} is {expected[:12]}…; re-run the quantize phase")
        specs[name] = spec
    if not specs:
        raise ReportInputError(f"{ws.search_dir / 'search.json'}: lists no candidates; re-run the search phase")
    return specs


def _optional(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("enabled", True) else None


def load_inputs(params: Params, ws: Workspace) -> Inputs:
    """Read every input, raising MissingArtifactError / ReportInputError naming the file at fault."""
    fingerprint = _load(ws, ws.model_dir / "fingerprint.json", "ingest")
    fp = _entry(fingerprint, "fingerprint", "artifacts/model/fingerprint.json", "ingest")
    if _entry(fingerprint, "model", "artifacts/model/fingerprint.json", "ingest") != params.ingest.model:
        raise ReportInputError(f"artifacts/model was ingested from {fingerprint['model']!r} but "
                               f"ingest.model is {params.ingest.model!r}; re-run the ingest phase")
    search = _load(ws, ws.search_dir / "search.json", "search")
    names = _entry(search, "candidates", "artifacts/search/search.json", "search")
    specs = _variant_specs(ws, fp, list(names))
    inputs = Inputs(
        fingerprint=fingerprint,
        model_size=_model_size(ws),
        baseline_speed=_load(ws, ws.bench_dir / "baseline.json", "benchmark"),
        specs=specs,
        speeds={n: _load(ws, ws.bench_file(n), "benchmark_variants") for n in specs},
        quality=_load(ws, ws.search_dir / "quality.json", "search"),
        gates=_load(ws, ws.search_dir / "gates.json", "search"),
        data_docs=ws.search_dir / "data_docs" if (ws.search_dir / "data_docs").is_dir() else None,
        search=search,
        sensitivity=_optional(ws.sensitivity_dir / "sensitivity.json"),
        curve=_optional(ws.calibration_dir / "curve.json"),
        serving=_optional(ws.root / "artifacts" / "serving" / "serving.json"),
        distill=_optional(ws.distill_dir / "distill.json"),
        root=ws.root,
    )
    for name in specs:
        for file, record in (("quality.json", inputs.quality), ("gates.json", inputs.gates)):
            known = _entry(record, "variants", f"artifacts/search/{file}", "search")
            if name not in known:
                raise ReportInputError(f"artifacts/search/{file} has no entry for variant {name!r} "
                                       f"(it has {sorted(known)}); re-run the search phase")
    return inputs


# --------------------------------------------------------------------------------------------- summary

def _point(metric: Any, where: str) -> float | None:
    """A quality metric is {"value", "ci95"}; a bare number or null is accepted as the value."""
    value = metric.get("value") if isinstance(metric, dict) else metric
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ReportInputError(f"{where}: expected a number or null, got {value!r}")
    return None if value is None or not math.isfinite(value) else float(value)


def _ci(metric: Any) -> list[float] | None:
    ci = metric.get("ci95") if isinstance(metric, dict) else None
    return [float(ci[0]), float(ci[1])] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return float(f"{num / den:.6g}")


def _cost(record: dict[str, Any], price_per_hour: float) -> float | None:
    """USD per 1M requests, recomputed from the measured machine-seconds at the current price (rounded
    as the benchmark rounds), so a price edit needs only this phase re-run."""
    seconds = record.get("machine_seconds_per_request")
    if seconds is None:
        return _point(record.get("cost_per_1m_requests_usd"), "speed record: cost_per_1m_requests_usd")
    return round(cost_per_1m_requests(price_per_hour, float(seconds)), 4)


def _speed(record: dict[str, Any], where: str, stage: str) -> dict[str, Any]:
    speed = {k: _point(_entry(record, k, where, stage), f"{where}: {k}") for k in SPEED_KEYS}
    speed["device"] = str(record.get("device") or "unknown")
    speed.update({k: record[k] for k in SPEED_EXTRAS if k in record})
    return speed


def _baseline_row(inp: Inputs, price: float) -> dict[str, Any]:
    base_q = _entry(inp.quality, "baseline", "artifacts/quality/quality.json", "validate")
    accuracy = _entry(base_q, "task_accuracy", "artifacts/quality/quality.json: baseline", "validate")
    return {
        "name": BASELINE, "precision": "fp32", "runtime": "torch", "transforms": [], "size_bytes": inp.model_size,
        "size_ratio": 1.0,
        "quality": {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0,
                    "task_accuracy": _point(accuracy, "quality.json: baseline.task_accuracy"),
                    "task_retention": 1.0},
        "quality_ci95": {k: (_ci(accuracy) if k == "task_accuracy" else None) for k in QUALITY_KEYS},
        "crosscheck": {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "ci95": {},
                       "prompts": base_q.get("crosscheck_prompts")},
        "speed": _speed(inp.baseline_speed, "artifacts/bench/baseline.json", "benchmark"),
        "speedup_bs1": 1.0,
        "cost_per_1m_requests_usd": _cost(inp.baseline_speed, price),
        "cost_ratio": 1.0,
        "gate": {"passed": True, "reasons": ["reference"]},
        "fingerprint": inp.fingerprint["fingerprint"],
    }


PHASES = ("preflight", "ingest", "evaldata", "benchmark_baseline", "reference", "distill", "sensitivity",
          "calibration_curve")
VARIANT_PHASES = ("quantize_variant", "benchmark_variant", "validate_variant")


def _wall_times(params: Params, root: Path) -> dict[str, float]:
    """The wall time of every phase of this run that recorded one (tasks.cli.phase_timer), in run order."""
    labels = [*PHASES, *(f"{p}-{v}" for v in params.quantize.variants for p in VARIANT_PHASES), "search", "deploy"]
    out = {}
    for label in labels:
        path = root / "logs" / "timings" / f"{label}.json"
        if path.is_file():
            out[label] = float(read_json(path).get("wall_s", 0.0))
    return out


def _stop_reason(q: dict[str, Any]) -> list[str]:
    """Why validation stopped early (costopt.evaluation.sequential), when it did."""
    seq = q.get("sequential") or {}
    return [str(seq["reason"])] if seq.get("stopped") and seq.get("reason") else []


def _variant_row(inp: Inputs, name: str, base: dict[str, Any], price: float) -> dict[str, Any]:
    spec, speed_rec = inp.specs[name], inp.speeds[name]
    where = f"artifacts/variants/{name}/spec.json"
    size = _entry(spec, "size_bytes", where, "quantize")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ReportInputError(f"{where}: size_bytes must be a positive integer, got {size!r}")
    q = inp.quality["variants"][name]
    quality = {k: _point(_entry(q, k, f"quality.json: variants.{name}", "validate"),
                         f"quality.json: variants.{name}.{k}") for k in QUALITY_KEYS}
    verdict = inp.gates["variants"][name]
    speed = _speed(speed_rec, f"artifacts/bench/variants/{name}.json", "benchmark_variants")
    cost = _cost(speed_rec, price)
    return {
        "name": name, "base": str(spec.get("base", "teacher")),  # teacher: the model; student: the distilled one
        "precision": str(_entry(spec, "precision", where, "quantize")),
        "runtime": str(speed_rec.get("runtime") or (spec.get("runtime") or {}).get("name") or "torch"),
        "transforms": list(_entry(spec, "transforms", where, "quantize")),
        "size_bytes": size, "size_ratio": _ratio(size, base["size_bytes"]),
        "quality": quality, "quality_ci95": {k: _ci(q[k]) for k in QUALITY_KEYS},
        "speed": speed,
        "speedup_bs1": _ratio(speed["decode_tok_s_bs1"], base["speed"]["decode_tok_s_bs1"]),
        "cost_per_1m_requests_usd": cost,
        "cost_ratio": _ratio(cost, base["cost_per_1m_requests_usd"]),
        "gate": {"passed": _entry(verdict, "passed", f"gates.json: variants.{name}", "validate"),
                 "reasons": [str(r) for r in verdict.get("reasons", [])] + _stop_reason(q),
                 "checks": verdict.get("checks", [])},
        "crosscheck": _crosscheck(inp.quality.get("crosscheck", {}).get(name)),
        "fingerprint": spec.get("fingerprint"),
        "fast_kernel": bool(spec.get("fast_kernel", True)),  # False: "quality-only" on this CPU
        "calibration": spec.get("calibration"),
    }


CROSSCHECK_KEYS = ("kl_mean", "kl_p99", "top1_agreement")


def _crosscheck(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A variant's quality on the second held-out set (costopt.evaluation.quality.measure_crosscheck), or None."""
    if not record:
        return None
    where = "quality.json: crosscheck"
    return {**{k: _point(record.get(k), f"{where}.{k}") for k in CROSSCHECK_KEYS},
            "ci95": {k: _ci(record.get(k)) for k in CROSSCHECK_KEYS}, "prompts": record.get("prompts")}


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names no other row beats on both cost and kl_mean (lower is better), cheapest first.
    Rows lacking either number are left out; equal points are all on the front."""
    pts = [(r["cost_per_1m_requests_usd"], r["quality"]["kl_mean"], r["name"]) for r in rows
           if r["cost_per_1m_requests_usd"] is not None and r["quality"]["kl_mean"] is not None]
    front = [p for p in pts if not any(o[0] <= p[0] and o[1] <= p[1] and (o[0], o[1]) != (p[0], p[1])
                                       for o in pts)]
    return [name for _, _, name in sorted(front)]


def pick_cheapest(variants: list[dict[str, Any]], tolerance: float = 0.0) -> str | None:
    """The cheapest variant whose gate passed (costs within `tolerance` tie, won by the lower KL mean:
    costopt.search.frontier.cheapest_passing), or None when none passed."""
    return cheapest_passing([{"name": v["name"], "cost": v["cost_per_1m_requests_usd"], "kl": v["quality"]["kl_mean"],
                              "passed": v["gate"]["passed"] is True} for v in variants], tolerance)


def build_summary(params: Params, inp: Inputs) -> dict[str, Any]:
    """The run summary of DESIGN.md ("Contracts between the parts"), plus a few added fields."""
    price = params.cost.price_per_hour_usd
    base = _baseline_row(inp, price)
    variants = [_variant_row(inp, name, base, price) for name in inp.specs]
    base_q = inp.quality["baseline"]
    docs = inp.data_docs is not None and (inp.data_docs / "index.html").is_file()
    summary = {
        "run_id": make_run_id(params, inp.fingerprint["fingerprint"]),
        "model": inp.fingerprint["model"],
        "profile": params.profile,
        "params": params.to_dict(),  # the effective settings (profile and form applied): what made this run
        "model_fingerprint": inp.fingerprint["fingerprint"],
        "model_parameters": inp.fingerprint.get("parameters"),
        "price_per_hour_usd": price,  # USD per machine-hour behind every cost below
        # the costs' trace: the served replay's (records before it: the batch-1 chat trace)
        "trace": {**inp.baseline_speed["served"]["trace"], "concurrency": inp.baseline_speed["served"]["concurrency"]}
        if "served" in inp.baseline_speed else inp.baseline_speed.get("trace"),
        "chance_accuracy": base_q.get("chance_accuracy"),
        "baseline_ppl": _point(base_q.get("ppl"), "quality.json: baseline.ppl"),
        "data_docs": "data_docs/index.html" if docs else None,  # relative to the summary's folder
        "baseline": base,
        "variants": variants,
        "search": _search_section(inp, variants, base),
        "sensitivity": _sensitivity_section(inp.sensitivity),
        "calibration_curve": inp.curve,
        "distill": distill_section(inp.distill),
        "deployed": (inp.serving or {}).get("deployed", []),  # what the deploy phase served, fingerprints
        "deployment": (inp.serving or {}).get("deployment"),  # the lasting deployment: what the deploy did to it
        "wall_times_s": _wall_times(params, inp.root),  # each phase's last run, seconds (logs/timings)
        # candidates ruled out before they could be gated (runtime missing, export or logits failed)
        "failed_variants": [{k: f.get(k) for k in ("name", "phase", "error", "reason")}
                            for f in inp.search.get("failed", [])],
    }
    if inp.serving and inp.serving.get("serving"):
        summary["serving"] = inp.serving["serving"]
        summary["serving_left_out"] = inp.serving.get("left_out", {})
    summary["cpu_or_gpu"] = cpu_or_gpu(params, inp.root, summary.get("serving"))
    return summary


GPU_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def cpu_or_gpu(params: Params, root: Path, serving: dict[str, Any] | None) -> dict[str, Any]:
    """This CPU's served cost per 1M requests next to a GPU's on the same trace (params.yaml `gpu`): the GPU
    figure is `gpu.measurement`, a `tasks.gpubench --serve` replay measured on a GPU machine (the pipeline
    cannot measure one on a machine without a GPU), priced at `gpu.price_per_hour_usd`. Says why not when
    there is no measurement, it is of another model shape, or nothing was served here."""
    rel = params.gpu.measurement
    if not rel:
        return {"status": "off", "reason": "gpu.measurement is empty"}
    path = root / rel
    if not path.is_file():
        return {"status": "not measured", "reason": f"{rel} is missing: run `python -m tasks.gpubench --serve TRACE "
                                                    f"--out DIR` on a GPU machine and copy DIR/serve.json there"}
    try:
        record = read_json(path)
        runs = {int(c): r for c, r in record["runs"].items()}
        concurrency = max(runs)
        req_s = float(runs[concurrency]["req_s"])
        # named after the card the replay ran on (params' card only when the record names none), so an
        # H100 measurement is never shown as the H200 the price may have been set for
        gpu = gpu_deployment(record.get("card") or params.gpu.card, params.gpu.price_per_hour_usd, req_s)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReportInputError(f"{rel}: not a `tasks.gpubench --serve` record ({type(exc).__name__}: {exc})") from exc
    out: dict[str, Any] = {"status": "measured", "file": rel, "card": record.get("card"), "date": record.get("date"),
                           "concurrency": concurrency, "note": record.get("note"), "gpu": served_cost(gpu),
                           "gpu_run": runs[concurrency]}
    model_cfg = root / "artifacts" / "model" / "config.json"
    if model_cfg.is_file():
        ours, theirs = read_json(model_cfg), record.get("config") or {}
        differ = [k for k in GPU_CONFIG_KEYS if k in theirs and ours.get(k) != theirs[k]]
        if differ:
            return {**out, "status": "other model shape",
                    "reason": f"{rel} measured a model whose {', '.join(differ)} differ from this run's model"}
    cpu_runs = [r for r in (serving or {}).get("runs", []) if r.get("errors") == 0 and r.get("throughput_req_s")]
    if not cpu_runs:
        return {**out, "status": "no CPU figure", "reason": "nothing was served in this run (serve.enabled)"}
    best = min(cpu_runs, key=lambda r: r["cost_per_1m_requests_usd"] or math.inf)
    cpu = Deployment("cpu", params.cost.price_per_hour_usd, float(best["throughput_req_s"]))
    return {**out, "cpu_run": {k: best.get(k) for k in ("concurrency", "throughput_req_s", "cost_per_1m_requests_usd")},
            "comparison": cheaper_deployment(cpu, gpu)}


DISTILL_KEYS = ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "task_retention")


def distill_section(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The student against the teacher, before (pruned, untrained) and after distillation: every gate
    metric with its 95% CI, sizes and times (artifacts/distill/distill.json), or None when off."""
    if not record:
        return None
    s, where = record["summary"], "artifacts/distill/distill.json"

    def metrics(m: dict[str, Any]) -> dict[str, Any]:
        return {k: {"value": _point(m.get(k), f"{where}: {k}"), "ci95": _ci(m.get(k))} for k in DISTILL_KEYS}

    return {"student_params": s["student_params"], "teacher_params": s["teacher_params"],
            "param_ratio": s["param_ratio"], "kept_layers": s["kept_layers"],
            "before": metrics(record["before"]), "after": metrics(record["after"]),
            "kl_reduction": s.get("kl_reduction"), "sources": record.get("sources"),
            "steps": (record.get("train") or {}).get("config", {}).get("steps"),
            "seconds": (record.get("seconds") or {}).get("total")}


def _search_section(inp: Inputs, variants: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """Picked and front recomputed from the rows at this price; they must agree with the search phase."""
    picked = pick_cheapest(variants, float(inp.search.get("cost_tolerance", 0.0)))
    front = pareto_front([base, *variants])
    if picked != inp.search.get("picked"):
        raise ReportInputError(f"artifacts/search/search.json picked {inp.search.get('picked')!r} but the "
                               f"measured rows give {picked!r}; re-run the search phase")
    return {"gates": _entry(inp.gates, "thresholds", "artifacts/search/gates.json", "search"),
            "statistic": inp.gates["thresholds"].get("statistic", "point"),
            "picked": picked, "front": front, "evaluations": len(variants),
            "evaluations_detail": inp.search.get("evaluations_detail"),
            "mixed": inp.search.get("mixed")}


def _sensitivity_section(sens: dict[str, Any] | None) -> dict[str, Any] | None:
    if sens is None:
        return None
    scan = sens["scan"]
    first = scan["precisions"][0]
    order = sorted(scan["parts"], key=lambda p: scan["parts"][p][first], reverse=True)
    return {"precisions": scan["precisions"], "group_size": scan["group_size"], "tokens": scan["tokens"],
            "int4_method": scan.get("int4_method"), "seconds": scan.get("seconds"),
            "most_sensitive": order[:10], "parts": scan["parts"], "part_cost_us": sens["costs"]["parts"]}


def check_summary(summary: dict[str, Any], schema_path: Path = SCHEMA) -> None:
    """Validate against the contract's JSON Schema; a failure is a bug here, so raise."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(read_json(schema_path))
    errors = sorted(validator.iter_errors(summary), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise SummarySchemaError(f"summary breaks {schema_path.name}:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------- presentation

def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [summary["baseline"], *summary["variants"]]


def _verdict(gate: dict[str, Any]) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[gate["passed"]]


def summary_table(summary: dict[str, Any]) -> str:
    """A fixed-width table for the terminal: one line per variant, fp32 first."""
    head = (f"{'variant':<22} {'precision':<9} {'runtime':<8} {'size MB':>8} {'tok/s bs1':>9} {'cost/1M $':>10} "
            f"{'KL mean':>8} {'KL xchk':>8} {'top-1':>6} {'task ret':>8}  gate")
    lines = [head, "-" * len(head)]
    for r in _rows(summary):
        q, mark = r["quality"], "*" if r["name"] == summary["search"]["picked"] else " "
        lines.append(f"{(r['name'] + mark)[:22]:<22} {r['precision'][:9]:<9} "
                     f"{r.get('runtime', 'torch')[:8]:<8} {r['size_bytes'] / 1e6:>8.1f} "
                     f"{_fmt(r['speed']['decode_tok_s_bs1'], '.1f'):>9} "
                     f"{_fmt(r['cost_per_1m_requests_usd'], '.2f'):>10} {_fmt(q['kl_mean'], '.4f'):>8} "
                     f"{_fmt((r.get('crosscheck') or {}).get('kl_mean'), '.4f'):>8} "
                     f"{_fmt(q['top1_agreement'], '.3f'):>6} {_fmt(q['task_retention'], '.3f'):>8}  "
                     f"{_verdict(r['gate'])}")
    for f in summary.get("failed_variants") or []:
        lines.append(f"{f['name'][:22]:<22} ruled out in {f['phase']}: {f['reason'][:120]}")
    lines.append(f"* picked: {summary['search']['picked'] or 'none (no variant passed its gates)'}")
    return "\n".join(lines)


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;
vertical-align:top}th{background:#f3f3f3}td.l,th.l{text-align:left}.ci{color:#777;font-size:12px}
.pass{color:#1a7f1a;font-weight:600}.fail{color:#c62828;font-weight:600}.fail-r{color:#c62828;font-size:12px}
tr.picked{background:#fff6d9}code{background:#f3f3f3;padding:1px 4px}.meta td{text-align:left}"""


def _with_ci(r: dict[str, Any], key: str, spec: str) -> str:
    ci = r.get("quality_ci95", {}).get(key)
    band = f'<br><span class="ci">[{ci[0]:{spec}}, {ci[1]:{spec}}]</span>' if ci else ""
    return _fmt(r["quality"][key], spec) + band


def _gate_cell(gate: dict[str, Any]) -> str:
    if gate["passed"] is False:
        reasons = "".join(f"<br>{html.escape(x)}" for x in gate["reasons"])
        return f'<span class="fail">FAIL</span><span class="fail-r">{reasons}</span>'
    cls = "pass" if gate["passed"] else "ci"
    return f'<span class="{cls}">{_verdict(gate)}</span> <span class="ci">{html.escape(", ".join(gate["reasons"]))}</span>'


def _table_row(r: dict[str, Any], summary: dict[str, Any]) -> str:
    s, tags = r["speed"], []
    if r["name"] == summary["search"]["picked"]:
        tags.append("picked")
    if r["name"] in summary["search"]["front"]:
        tags.append("front")
    if r.get("fast_kernel") is False:
        tags.append("quality-only: no fast kernel on this CPU")
    cells = [
        f'<td class="l"><b>{html.escape(r["name"])}</b><br><span class="ci">{", ".join(tags)}</span></td>',
        f'<td class="l">{html.escape(r["precision"])}<br><span class="ci">{html.escape(r.get("runtime", "torch"))}</span></td>',
        f'<td>{r["size_bytes"] / 1e6:.1f}<br><span class="ci">×{_fmt(r.get("size_ratio"), ".3f")}</span></td>',
        f'<td>{_fmt(s["decode_tok_s_bs1"], ".1f")}<br><span class="ci">×{_fmt(r.get("speedup_bs1"), ".2f")}</span></td>',
        f'<td>{_fmt(s.get("decode_tok_s_batch"), ".1f")}</td>',
        f'<td>{_fmt(s["throughput_tok_s"], ".1f")}</td>', f'<td>{_fmt(s["p95_ms"], ".0f")}</td>',
        f'<td>{_fmt(r["cost_per_1m_requests_usd"], ".2f")}<br><span class="ci">×{_fmt(r.get("cost_ratio"), ".3f")}</span></td>',
        f'<td>{_with_ci(r, "kl_mean", ".4f")}</td>', f'<td>{_with_ci(r, "top1_agreement", ".3f")}</td>',
        f'<td>{_with_ci(r, "ppl_ratio", ".4f")}</td>', f'<td>{_with_ci(r, "task_accuracy", ".3f")}</td>',
        f'<td>{_with_ci(r, "task_retention", ".3f")}</td>', f'<td class="l">{_gate_cell(r["gate"])}</td>',
    ]
    cls = ' class="picked"' if "picked" in tags else ""
    return f"<tr{cls}>{''.join(cells)}</tr>"


def _mixed_html(search: dict[str, Any]) -> str:
    mixed = search.get("mixed") or {}
    if not mixed.get("enabled"):
        return "<p>The mixed-precision search was off in this run (search.enabled: false).</p>"
    if mixed.get("skipped"):
        return f"<p>No mixed-precision candidate was built: {html.escape(mixed['skipped'])}.</p>"
    rows = "".join(
        f"<tr><td class='l'>{html.escape(t['name'])}</td><td class='l'>{html.escape(t['label'])}</td>"
        f"<td>{t['index']}</td><td>{_fmt(t['predicted_kl'], '.4f')}</td><td>{_fmt(t['measured_kl'], '.4f')}</td>"
        f"<td>{'pass' if t['passed'] else 'FAIL'}</td></tr>" for t in mixed.get("trials", []))
    return (f"<p>{len(mixed.get('path', []))} mixed assignments planned from the sensitivity scan and the "
            f"kernel cost table; {len(mixed.get('trials', []))} quantized and validated (binary search on the "
            f"path, cheapest passing: <b>{html.escape(str(mixed.get('best')))}</b>).</p>"
            f"<table><tr><th class='l'>candidate</th><th class='l'>plan</th><th>path index</th>"
            f"<th>predicted KL</th><th>measured KL</th><th>gates</th></tr>{rows}</table>")


def _crosscheck_html(summary: dict[str, Any]) -> str:
    """Each variant's quality on both held-out sets, side by side."""
    rows = [r for r in summary["variants"] if r.get("crosscheck")]
    if not rows:
        return ""

    def cell(value: Any, ci: list[float] | None, spec: str) -> str:
        band = f'<br><span class="ci">[{ci[0]:{spec}}, {ci[1]:{spec}}]</span>' if ci else ""
        return f"<td>{_fmt(value, spec)}{band}</td>"

    body = []
    for r in rows:
        x, q, qci = r["crosscheck"], r["quality"], r.get("quality_ci95", {})
        body.append(f'<tr><td class="l">{html.escape(r["name"])}</td>'
                    + cell(q["kl_mean"], qci.get("kl_mean"), ".4f") + cell(x["kl_mean"], x["ci95"]["kl_mean"], ".4f")
                    + f'<td>{_fmt(_ratio(x["kl_mean"], q["kl_mean"]), ".2f")}</td>'
                    + cell(q["top1_agreement"], qci.get("top1_agreement"), ".3f")
                    + cell(x["top1_agreement"], x["ci95"]["top1_agreement"], ".3f") + "</tr>")
    n = rows[0]["crosscheck"].get("prompts")
    return f"""<h2>Quality on a second held-out set</h2>
<p class="ci">The crosscheck set: {n} short factual questions composed from fact tables, written unlike the chat
prompts that the calibration set and the first held-out set come from. Reported, not gated: a variant whose
KL grows much more here than others' is fitted to the calibration pool's style.</p>
<table><tr><th class="l">variant</th><th>KL mean, held-out<br>[95% CI]</th><th>KL mean, crosscheck<br>[95% CI]</th>
<th>crosscheck / held-out</th><th>top-1, held-out</th><th>top-1, crosscheck</th></tr>
{"".join(body)}</table>"""


def _figures_html(summary: dict[str, Any], figures: dict[str, bytes]) -> str:
    out = []
    titles = {"sensitivity": "Per-part sensitivity", "curve": "KL versus calibration size",
              "cache": "Semantic cache: hit rate versus false-hit rate"}
    for key, title in titles.items():
        if key in figures:
            data = base64.b64encode(figures[key]).decode("ascii")
            out.append(f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{data}">')
    curve = summary.get("calibration_curve")
    if curve:
        cells = "".join(f"<tr><td>{p['samples']}</td><td>{_with_ci({'quality': {'k': p['kl_mean']['value']}, 'quality_ci95': {'k': p['kl_mean']['ci95']}}, 'k', '.4f')}</td></tr>"
                        for p in curve["points"])
        out.append(f"<table><tr><th>calibration samples</th><th>KL mean [95% CI]</th></tr>{cells}</table>")
    return "\n".join(out)


def _distill_html(d: dict[str, Any] | None) -> str:
    """The student before and after distillation, against the teacher (fp32)."""
    if not d:
        return ""

    def cell(m: dict[str, Any], k: str) -> str:
        v, ci = m[k]["value"], m[k]["ci95"]
        return f"{_fmt(v)}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")

    rows = "".join(f"<tr><td class='l'>{k}</td><td>{cell(d['before'], k)}</td><td>{cell(d['after'], k)}</td></tr>"
                   for k in DISTILL_KEYS)
    return (f"<h2>Distillation</h2><p>Student: {d['student_params']:,} parameters ({_fmt(d['param_ratio'], '.3f')}× "
            f"the teacher), teacher blocks kept {html.escape(str(d['kept_layers']))}; {d['steps']} training "
            f"steps, {_fmt((d['seconds'] or 0) / 60, '.1f')} min. Distillation divided its KL mean by "
            f"{_fmt(d['kl_reduction'], '.3g')}. Its variants are the rows named <code>student*</code> above.</p>"
            f"<table><tr><th class='l'>against the teacher [95% CI]</th><th>pruned, untrained</th>"
            f"<th>distilled</th></tr>{rows}</table>")


def _deployment_html(dep: dict[str, Any] | None) -> str:
    """One line on the lasting deployment: what this run's deploy did to it, and where it serves."""
    esc = html.escape
    if not dep or not dep.get("gateway_url"):
        reason = (dep or {}).get("reason")
        return f"<p>The lasting deployment was not changed{': ' + esc(reason) if reason else ''}.</p>"
    canary = f"; a canary of <b>{esc(dep['canary'])}</b> is judged on its answers" if dep.get("canary") else ""
    return (f"<p>The lasting deployment <b>{esc(dep['deployment'])}</b> ({esc(str(dep.get('action')))}) serves "
            f"<b>{esc(str(dep.get('current')))}</b> at <code>{esc(dep['gateway_url'])}/openai/v1</code>{canary}; "
            f"<code>make serve-stop</code> stops it.</p>")


def _serving_html(summary: dict[str, Any]) -> str:
    """Deployed variants and the deploy phase's load test, when it ran."""
    esc, serving = html.escape, summary.get("serving")
    if not serving:
        return "<h2>Serving</h2><p>Not deployed in this run (serve.enabled, or no deploy phase).</p>"
    deployed = ", ".join(f"{esc(d['name'])} (<code>{esc(str(d['fingerprint'])[:12])}</code>)"
                         for d in summary.get("deployed", []))
    left = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in (summary.get("serving_left_out") or {}).items())
    heads = ["variant", "concurrency", "req/s", "tok/s", "p50 ms", "p95 ms", "p99 ms", "errors", "rejected",
             "cost / 1M req USD"]
    rows = "".join(f"<tr><td>{esc(', '.join(r['config']['variants']))}"
                   f"{' <span class=ci>via gateway, cache on</span>' if r['config'].get('cache') else ''}"
                   f"{' <span class=ci>routed by the gateway, cheapest first</span>' if r['config'].get('routing') else ''}"
                   f"</td>" + "".join(
        f"<td>{esc(_fmt(v))}</td>" for v in (r["concurrency"], r["throughput_req_s"], r["throughput_tok_s"],
        r["p50_ms"], r["p95_ms"], r["p99_ms"], r["errors"], r["rejected"], r.get("cost_per_1m_requests_usd")))
        + "</tr>" for r in serving["runs"])
    trace = serving["trace"]
    return f"""<h2>Serving</h2>
<p>Deployed on a loopback KServe server (continuous batching): {deployed}.</p>{f"<ul>{left}</ul>" if left else ""}
{_deployment_html(summary.get("deployment"))}
<p class="ci">Load test: trace {esc(str(trace["name"]))} ({trace["requests"]} requests), closed loop. Naive path
(fp32, batch 1): {_fmt(serving.get("naive_cost_per_1m_requests_usd"))} USD per 1M requests; served:
{_fmt(serving.get("optimized_cost_per_1m_requests_usd"))}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>{rows}</table>{_cache_html(serving.get("cache"))}
{_routing_html(serving.get("routing"))}"""


def _cpu_or_gpu_html(c: dict[str, Any] | None) -> str:
    """The CPU-or-GPU line: this CPU's served cost next to the GPU measurement's, or why there is none."""
    esc = html.escape
    if not c:
        return ""
    if "comparison" not in c:
        return f"<h2>CPU or GPU</h2><p>No comparison: {esc(c.get('reason', c['status']))}.</p>"
    cmp_, run = c["comparison"], c["gpu_run"]
    costs = {d["name"]: d for d in cmp_["deployments"]}
    gpu = next(d for n, d in costs.items() if n != "cpu")
    return f"""<h2>CPU or GPU</h2>
<p>Per 1M requests of the trace: this CPU {_fmt(costs["cpu"]["usd_per_1m_requests"])} USD
({_fmt(costs["cpu"]["throughput_req_s"])} req/s at {_fmt(costs["cpu"]["price_per_hour_usd"])} USD/h, served here);
{esc(str(gpu["name"]))} {_fmt(gpu["usd_per_1m_requests"])} USD ({_fmt(gpu["throughput_req_s"])} req/s at concurrency
{c["concurrency"]}, p99 {_fmt(run.get("p99_ms"))} ms, at {_fmt(gpu["price_per_hour_usd"])} USD/h).
<b>{esc(str(cmp_["cheaper"]))} is cheaper, {_fmt(cmp_["ratio"], ".3g")}x.</b></p>
<p class="ci">GPU figure: {esc(c["file"])}, {esc(str(c.get("card")))}, {esc(str(c.get("date")))}: {esc(str(c.get("note")))}.</p>"""


def _routing_html(routing: dict[str, Any] | None) -> str:
    """The precision router: tiers, the share that finished cheaper, retention and cost on and off."""
    if not routing:
        return ""
    tiers = ", ".join(f"{html.escape(n)}" + (f" (threshold {_fmt(t, '.3f')})" if t is not None else " (reference)")
                      for n, t in zip(routing["tiers"], routing["thresholds"]))
    dropped = routing.get("dropped") or []
    if dropped:
        tiers += (f"; dropped by the fit: {html.escape(', '.join(dropped))} (at the threshold that keeps the "
                  f"retention target it would generate under 5% of the routed tokens)")
    return (f"<p>Precision routing (model <code>routed</code>): tiers {tiers}. Through the gateway "
            f"{_fmt(routing['cheap_share'], '.3f')} of {routing['requests']} requests finished on a cheaper tier "
            f"(escalation rate {_fmt(routing['escalation_rate'], '.3f')}); cost per 1M requests "
            f"{_fmt(routing.get('cost_per_1m_requests_usd'))} USD routed against "
            f"{_fmt(routing.get('cost_per_1m_requests_usd_reference_alone'))} for the reference alone. Retention of "
            f"routed answers (token agreement with the reference, judged on {routing.get('judged_on')} held-out "
            f"prompts): {_fmt(routing.get('quality_retention'), '.4f')}, 95% lower bound "
            f"{_fmt(routing.get('retention_lower95'), '.4f')}"
            + (f"; task accuracy retention on {routing['task_items']} labeled items (generated answers): "
               f"{_fmt(routing.get('task_retention'), '.4f')}, 95% lower bound "
               f"{_fmt(routing.get('task_retention_lower95'), '.4f')}" if routing.get("task_items") else "")
            + ".</p>")


def _cache_html(cache: dict[str, Any] | None) -> str:
    """The gateway's semantic cache on the load test: hit rate, false hits with their exact bound."""
    if not cache:
        return ""
    if not cache.get("enabled", True):
        return f"<p>Semantic cache: off ({html.escape(str(cache.get('reason')))}).</p>"
    return (f"<p>Semantic cache (gateway): hit rate {_fmt(cache.get('hit_rate'), '.3f')} of the requests; false hits "
            f"{cache.get('false_hits')} of {cache.get('hits')} hits (rate {_fmt(cache.get('false_hit_rate'), '.3f')}, "
            f"95% upper bound {_fmt(cache.get('false_hit_upper95'), '.3f')}); hit rule: cosine &ge; "
            f"{_fmt(cache.get('threshold'), '.2f')} and verification (phrase similarity &ge; "
            f"{_fmt(cache.get('min_phrase_sim'), '.2f')}).</p>")


def _timings_html(summary: dict[str, Any]) -> str:
    times = summary.get("wall_times_s") or {}
    if not times:
        return ""
    rows = "".join(f"<tr><td class='l'>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in times.items())
    return ("<h2>Wall time per task</h2><p class='ci'>Each phase's last run, seconds; the report and version "
            f"tasks come after this page is written. Total {sum(times.values()) / 60:.1f} min.</p>"
            f"<table><tr><th class='l'>task</th><th>s</th></tr>{rows}</table>")


def _failed_html(summary: dict[str, Any]) -> str:
    failed = summary.get("failed_variants") or []
    if not failed:
        return ""
    rows = "".join(f"<tr><td class='l'><b>{html.escape(str(f['name']))}</b></td><td class='l'>"
                   f"{html.escape(str(f['phase']))}</td><td class='l fail-r'>{html.escape(str(f['reason']))}</td></tr>"
                   for f in failed)
    return ("<h3>Candidates ruled out before their gates</h3><p class='ci'>The run went on without them.</p>"
            f"<table><tr><th class='l'>variant</th><th class='l'>phase</th><th class='l'>reason</th></tr>{rows}</table>")


def render_html(summary: dict[str, Any], png: bytes, figures: dict[str, bytes] | None = None) -> str:
    """The human report: one self-contained page (inline CSS, the plot as a base64 PNG)."""
    esc, search = html.escape, summary["search"]
    batch = summary["baseline"]["speed"].get("decode_batch", "n")
    heads = ["variant", "precision<br>runtime", "size MB<br>(× fp32)", "decode tok/s bs1<br>(speedup)",
             f"decode tok/s bs{batch}", "throughput tok/s",
             "p95 ms", "cost / 1M req USD<br>(× fp32)", "KL mean<br>[95% CI]", "top-1<br>[95% CI]",
             "ppl ratio<br>[95% CI]", "task acc<br>[95% CI]", "task retention<br>[95% CI]", "gate"]
    rows = "\n".join(_table_row(r, summary) for r in _rows(summary))
    gates = "".join(f"<tr><td class='l'>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>"
                    for k, v in search["gates"].items())
    trace = summary.get("trace") or {}
    docs = (f'<p><a href="{esc(summary["data_docs"])}">Data Docs</a> (Great Expectations validation of the '
            f'metrics table)</p>' if summary.get("data_docs") else "<p>No Data Docs in this run.</p>")
    device = esc(summary["baseline"]["speed"]["device"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>costopt report {esc(summary["run_id"])}</title>
<style>{CSS}</style></head><body>
<h1>costopt report</h1>
<table class="meta">
<tr><th class="l">run</th><td><code>{esc(summary["run_id"])}</code> (profile {esc(summary["profile"])})</td></tr>
<tr><th class="l">model</th><td>{esc(str(summary["model"]))}, fingerprint <code>{esc(summary["model_fingerprint"][:16])}…</code></td></tr>
<tr><th class="l">picked</th><td><b>{esc(search["picked"] or "none: no variant passed its gates")}</b>
 (cheapest variant that passed; {search["evaluations"]} evaluated)</td></tr>
<tr><th class="l">cost basis</th><td>{summary["price_per_hour_usd"]} USD per machine-hour on {device};
 trace {esc(str(trace.get("name", "–")))} ({esc(str(trace.get("requests", "–")))} requests{
 f", served with continuous batching, {trace['concurrency']} in flight" if trace.get("concurrency") else ""})</td></tr>
<tr><th class="l">chance accuracy</th><td>{_fmt(summary.get("chance_accuracy"), ".3f")} (task set)</td></tr>
</table>
<h2>Cost and quality per variant</h2>
<p class="ci">Quality against fp32 with teacher-forced logits; brackets give 95% bootstrap intervals. Cost = price
per hour / 3600 × machine-seconds per request × 10<sup>6</sup>. Ratios in parentheses are against fp32.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>
{rows}
</table>
{_failed_html(summary)}
{_crosscheck_html(summary)}
<h2>Cost versus quality</h2>
<img alt="cost versus KL mean, Pareto front highlighted" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<p>Pareto front: {esc(", ".join(search["front"]) or "–")}</p>
<h2>Mixed-precision search</h2>
{_mixed_html(search)}
{_figures_html(summary, figures or {})}
{_distill_html(summary.get("distill"))}
{_serving_html(summary)}
{_cpu_or_gpu_html(summary.get("cpu_or_gpu"))}
{_timings_html(summary)}
<h2>Gate thresholds</h2>
<table><tr><th class="l">threshold</th><th>value</th></tr>{gates}</table>
<h2>Data quality</h2>
{docs}
</body></html>
"""


# ------------------------------------------------------------------------------------------------ write

def _check_latest(reports: Path) -> None:
    link = reports / "latest"
    if link.exists() and not link.is_symlink():
        raise ReportInputError(f"{link} exists and is not a symlink; move it away so it can point at the newest run")


def point_latest(reports: Path, run_id: str) -> None:
    """`reports/latest -> <run_id>`, relative, swapped in atomically (a reader never sees it missing)."""
    tmp = reports / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_id, tmp)
    os.replace(tmp, reports / "latest")


def write_report(summary: dict[str, Any], final: Path, data_docs: Path | None) -> None:
    """Write summary.json, report.html and data_docs/ into a staging folder, then swap it in."""
    stage = staging_dir(final)
    try:
        write_json(stage / "summary.json", summary)
        if data_docs is not None:
            shutil.copytree(data_docs, stage / "data_docs")
        figures = {}
        if summary.get("sensitivity"):
            figures["sensitivity"] = sensitivity_png(summary["sensitivity"])
        if summary.get("calibration_curve"):
            figures["curve"] = curve_png(summary["calibration_curve"])
        cal = ((summary.get("serving") or {}).get("cache") or {}).get("calibration")
        if cal and cal.get("curve"):
            figures["cache"] = cache_curve_png(cal)
        (stage / "report.html").write_text(render_html(summary, pareto_png(summary), figures), encoding="utf-8")
        replace_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # leave no half-written folder; the old report stays
        raise


def report(params: Params, ws: Workspace) -> dict[str, Any]:
    """Build, validate and write `reports/<run_id>/`, point `reports/latest` at it; return its paths."""
    inputs = load_inputs(params, ws)
    summary = build_summary(params, inputs)
    check_summary(summary)
    _check_latest(ws.reports_dir)
    final = ws.reports_dir / summary["run_id"]
    write_report(summary, final, inputs.data_docs)
    point_latest(ws.reports_dir, summary["run_id"])
    return {"run_id": summary["run_id"], "report_dir": str(final), "summary": str(final / "summary.json"),
            "html": str(final / "report.html"), "picked": summary["search"]["picked"],
            "front": summary["search"]["front"], "evaluations": summary["search"]["evaluations"]}


def _report_and_print(params: Params, ws: Workspace) -> dict[str, Any]:
    import sys

    result = report(params, ws)
    print(summary_table(read_json(Path(result["summary"]))), file=sys.stderr)  # stdout stays JSON
    return result


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], _report_and_print, argv)


if __name__ == "__main__":
    raise SystemExit(main())
