"""The report phase on a synthetic workspace: well-formed input files of every earlier phase, no model.

The constructed case has five variants whose costs and KL are chosen so the answers are known:
`naive` is the cheapest but fails its gates, `int8` is the cheapest that passes, and `slow_int8`
passes but is beaten by `int8` on both cost and KL, so it is off the Pareto front.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest

from costopt.storage.layout import Workspace
from costopt.params import CostParams, Params
from costopt.runid import run_id
from costopt.storage.layout import MissingArtifactError, ReportInputError
from tasks.report import (SummarySchemaError, check_summary,
                          report, summary_table)

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "summary.schema.json"
FINGERPRINT = "ab" * 32
PRICE = 0.10  # USD per machine-hour, the default in Params
# name -> (machine-seconds per request, kl_mean, gate passed); cost = seconds × PRICE / 3600 × 1e6
CASE = {
    "bf16": (1.44, 0.001, True),  # 40 USD per 1M requests
    "int8": (1.08, 0.005, True),  # 30: cheapest passing
    "naive": (0.72, 2.0, False),  # 20: cheapest overall, fails
    "slow_int8": (1.62, 0.006, True),  # 45: dominated by int8
    "int4_rtn": (1.00, 0.8, False),  # 27.8: on the front, fails
}
BASE_SECONDS = 2.16  # fp32: 60 USD per 1M requests


def cost_of(seconds: float, price: float = PRICE) -> float:
    return price / 3600 * seconds * 1e6


def metric(value: float, half: float = 0.01) -> dict:
    return {"value": value, "ci95": [value - half, value + half]}


def speed_record(name: str, seconds: float) -> dict:
    return {"variant": name, "device": "cpu (test, 2 threads)", "decode_tok_s_bs1": 30.0 / seconds,
            "throughput_tok_s": 200.0 / seconds, "p50_ms": 900.0 * seconds,
            "p95_ms": 1000.0 * seconds, "p99_ms": 1100.0 * seconds,
            "trace": {"name": "chat-v1", "requests": 4, "fingerprint": "cd" * 32},
            "machine_seconds_per_request": seconds, "cost_per_1m_requests_usd": cost_of(seconds),
            "slo_p95_ms": 10000, "slo_met": True}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def build_workspace(root: Path, case: dict = CASE) -> Workspace:
    """Every input file the report reads, shaped as docs/artifacts.md says."""
    art = root / "artifacts"
    write(art / "model" / "fingerprint.json", {"model": Params().ingest.model, "fingerprint": FINGERPRINT,
                                               "parameters": 134_515_008, "dtype": "float32"})
    (art / "model" / "model.safetensors").write_bytes(b"\0" * 4000)
    write(art / "bench" / "baseline.json", speed_record("fp32", BASE_SECONDS))
    quality, verdicts, crosscheck = {}, {}, {}
    for i, (name, (seconds, kl, passed)) in enumerate(case.items()):
        write(art / "variants" / name / "spec.json", {
            "name": name, "base_model": Params().ingest.model, "base_fingerprint": FINGERPRINT,
            "precision": "int8" if "int8" in name else name, "artifact": f"artifacts/variants/{name}",
            "transforms": [{"scheme": name, "config": {"version": 1}}], "size_bytes": 1000 + 500 * i,
            "fingerprint": f"{i:02d}" * 32})
        write(art / "bench" / "variants" / f"{name}.json", speed_record(name, seconds))
        quality[name] = {"kl_mean": metric(kl, kl / 10), "kl_p99": metric(10 * kl), "top1_agreement":
                         metric(0.97 if passed else 0.5), "ppl_ratio": metric(1.01), "task_accuracy":
                         metric(0.58), "task_retention": metric(0.97, 0.05)}
        crosscheck[name] = {"kl_mean": metric(1.5 * kl, kl / 5), "kl_p99": metric(15 * kl),
                            "top1_agreement": metric(0.95 if passed else 0.45), "prompts": 60, "tokens": 2100}
        verdicts[name] = {"passed": passed, "reasons": [] if passed else
                          [f"kl_mean = {kl:.4f} nats/token > kl_mean_max = 0.02"], "checks": []}
    write(art / "search" / "quality.json", {"baseline": {"task_accuracy": metric(0.6, 0.06), "ppl": 12.3,
                                                         "chance_accuracy": 0.29, "tokens": 900, "items": 60},
                                            "variants": quality, "crosscheck": crosscheck})
    write(art / "search" / "gates.json", {"thresholds": dataclasses.asdict(Params().validate.gates),
                                          "variants": verdicts,
                                          "data_docs": "artifacts/search/data_docs/index.html"})
    write(art / "search" / "data_docs" / "index.html", "<html>data docs</html>")
    passing = {n: s for n, (s, _, ok) in case.items() if ok}
    write(art / "search" / "search.json", {
        "candidates": list(case), "picked": min(passing, key=passing.get) if passing else None,
        "front": [], "evaluations": len(case), "mixed": {"enabled": False}})
    parts = {f"layers.{i}.{k}": {"int4": 0.01 * (i + 1) * (2 if k == "mlp" else 1), "int8": 1e-4 * (i + 1)}
             for i in range(3) for k in ("self_attn", "mlp")}
    write(art / "sensitivity" / "sensitivity.json", {
        "enabled": True, "scan": {"parts": parts, "tokens": 321, "precisions": ["int4", "int8"], "group_size": 64,
                                  "int4_method": "rtn", "seconds": 1.0},
        "costs": {"parts": {p: {"fp32": 100.0, "int8": 40.0, "int4": 30.0} for p in parts}}})
    write(art / "calibration" / "curve.json", {
        "enabled": True, "variant": "int4_gptq_g64", "prompts": 8, "rtn_kl_mean": 0.3, "skipped_sizes": [],
        "points": [{"samples": n, "source": "prompts", "kl_mean": metric(0.2 / n ** 0.5, 0.01)} for n in (4, 16, 64)]})
    return Workspace(root)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under `folder`, hidden entries included."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-run")
    return root, report(Params(), build_workspace(root))


@pytest.fixture
def ran(first_run, tmp_path):
    """A private copy of a workspace the report already ran on (rendering once keeps the file fast)."""
    root, result = first_run
    shutil.copytree(root, tmp_path / "ws", symlinks=True)  # keeps reports/latest a relative link
    ws = Workspace(tmp_path / "ws")
    result = {k: v.replace(str(root), str(ws.root)) if isinstance(v, str) else v for k, v in result.items()}
    return ws, result, json.loads(Path(result["summary"]).read_text())


def test_summary_follows_the_contract(ran):
    ws, result, summary = ran
    jsonschema.validate(summary, json.loads(SCHEMA.read_text()))
    assert summary["run_id"] == run_id(Params(), FINGERPRINT), "run id must come from params and fingerprint"
    assert [v["name"] for v in summary["variants"]] == list(CASE), f"variants: {summary['variants']}"
    base = summary["baseline"]
    assert (base["name"], base["precision"], base["transforms"]) == ("fp32", "fp32", []), f"baseline: {base}"
    assert base["quality"] == {"kl_mean": 0, "kl_p99": 0, "top1_agreement": 1, "ppl_ratio": 1,
                               "task_accuracy": 0.6, "task_retention": 1}, f"baseline quality: {base['quality']}"
    assert base["gate"] == {"passed": True, "reasons": ["reference"]}, f"baseline gate: {base['gate']}"
    assert base["size_bytes"] == 4000, f"baseline size must be the safetensors size: {base['size_bytes']}"
    int8 = next(v for v in summary["variants"] if v["name"] == "int8")
    assert int8["quality"]["kl_mean"] == 0.005, f"quality must hold point values: {int8['quality']}"
    assert int8["quality_ci95"]["kl_mean"] == pytest.approx([0.0045, 0.0055]), f"CI: {int8['quality_ci95']}"
    assert int8["transforms"] == [{"scheme": "int8", "config": {"version": 1}}], "transforms come from the spec"
    assert int8["cost_per_1m_requests_usd"] == pytest.approx(30.0), f"cost: {int8['cost_per_1m_requests_usd']}"
    assert int8["speedup_bs1"] == pytest.approx(2.0), f"speedup vs fp32: {int8['speedup_bs1']}"
    assert summary["search"]["evaluations"] == len(CASE), f"evaluations: {summary['search']}"
    assert summary["search"]["gates"]["kl_mean_max"] == 0.02, f"gates: {summary['search']['gates']}"
    assert summary["deployed"] == [], "nothing is deployed by the report phase"
    assert summary["data_docs"] == "data_docs/index.html", f"data_docs: {summary['data_docs']}"


def test_picked_is_the_cheapest_variant_that_passed(ran):
    _, result, summary = ran
    costs = {v["name"]: v["cost_per_1m_requests_usd"] for v in summary["variants"]}
    assert min(costs, key=costs.get) == "naive", f"the case needs a cheaper failing variant: {costs}"
    assert summary["search"]["picked"] == "int8", f"picked {summary['search']['picked']}, costs {costs}"
    assert result["picked"] == "int8", f"phase result: {result}"


def test_picked_is_null_when_nothing_passed(tmp_path):
    ws = build_workspace(tmp_path, {n: (s, kl, False) for n, (s, kl, _) in CASE.items()})
    summary = json.loads(Path(report(Params(), ws)["summary"]).read_text())
    assert summary["search"]["picked"] is None, f"no variant passed, yet picked {summary['search']['picked']}"


def test_pareto_front_over_cost_and_kl(ran):
    _, _, summary = ran
    # fp32 (60, 0), bf16 (40, .001), int8 (30, .005), int4_rtn (27.8, .8), naive (20, 2); slow_int8 is beaten
    assert summary["search"]["front"] == ["naive", "int4_rtn", "int8", "bf16", "fp32"], \
        f"front: {summary['search']['front']}"


def test_run_id_is_stable_and_follows_the_inputs():
    params = Params()
    rid = run_id(params, FINGERPRINT)
    assert rid == run_id(Params(), FINGERPRINT), "same inputs must give the same run id"
    assert rid.startswith("smollm2-135m-instruct-full-"), f"slug and profile expected in {rid}"
    cheaper = dataclasses.replace(params, cost=CostParams(price_per_hour_usd=0.2))
    assert run_id(cheaper, FINGERPRINT) != rid, "a changed setting must change the run id"
    assert run_id(params, "cd" * 32) != rid, "a changed model must change the run id"
    odd = dataclasses.replace(params, ingest=dataclasses.replace(params.ingest, model="/tmp/My Model v2/"))
    assert run_id(odd, FINGERPRINT).startswith("my-model-v2-full-"), f"unsafe slug: {run_id(odd, FINGERPRINT)}"


def test_rerun_gives_identical_files(ran):
    ws, result, _ = ran
    first = snapshot(Path(result["report_dir"]))
    again = report(Params(), ws)
    assert again["run_id"] == result["run_id"], "a re-run must reuse the run id"
    assert snapshot(Path(again["report_dir"])) == first, "a re-run must write byte-identical files"


def test_latest_is_a_relative_link_to_the_newest_run(ran):
    ws, result, _ = ran
    latest = ws.reports_dir / "latest"
    assert latest.is_symlink() and os.readlink(latest) == result["run_id"], f"latest -> {os.readlink(latest)}"
    assert latest.resolve() == Path(result["report_dir"]).resolve(), "latest must resolve to the run folder"
    newer = report(dataclasses.replace(Params(), cost=CostParams(price_per_hour_usd=0.2)), ws)
    assert os.readlink(latest) == newer["run_id"] != result["run_id"], "latest must follow the newest run"
    assert Path(result["summary"]).is_file(), "an earlier run's report must be kept"
    int8 = next(v for v in json.loads(Path(newer["summary"]).read_text())["variants"] if v["name"] == "int8")
    assert int8["cost_per_1m_requests_usd"] == pytest.approx(60.0), "cost must follow the configured price"


def test_html_embeds_the_plot_and_links_data_docs(ran):
    _, result, _ = ran
    page = Path(result["html"]).read_text()
    marker = 'src="data:image/png;base64,'
    assert marker in page, "report.html must embed the plot as a base64 PNG"
    png = base64.b64decode(page.split(marker, 1)[1].split('"', 1)[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, f"not a real PNG ({len(png)} bytes)"
    assert 'href="data_docs/index.html"' in page, "report.html must link the Data Docs"
    assert (Path(result["report_dir"]) / "data_docs" / "index.html").is_file(), "Data Docs must be copied"
    assert "kl_mean = 2.0000 nats/token &gt; kl_mean_max = 0.02" in page, "failed gates must show their reasons"


def test_crosscheck_quality_sits_next_to_the_first_set(ran):
    _, result, summary = ran
    for v in summary["variants"]:
        x = v["crosscheck"]
        assert x["kl_mean"] == pytest.approx(1.5 * v["quality"]["kl_mean"]) and x["prompts"] == 60, \
            f"{v['name']}: crosscheck figures come from quality.json's crosscheck: {x}"
        assert x["ci95"]["kl_mean"] is not None, f"{v['name']}: the crosscheck KL carries its CI"
    page = Path(result["html"]).read_text()
    assert "Quality on a second held-out set" in page and "60 short factual questions" in page, \
        "the report has the side-by-side crosscheck table"
    assert "KL xchk" in summary_table(summary), "the terminal table shows the crosscheck KL"


def test_summary_table_lists_every_variant(ran):
    _, _, summary = ran
    table = summary_table(summary)
    for name in ["fp32", *CASE]:
        assert name in table, f"{name} missing from the table:\n{table}"
    assert "picked: int8" in table, f"the table must name the pick:\n{table}"


@pytest.mark.parametrize("path, stage", [
    ("artifacts/search/quality.json", "search"),
    ("artifacts/search/gates.json", "search"),
    ("artifacts/search/search.json", "search"),
    ("artifacts/bench/baseline.json", "benchmark"),
    ("artifacts/bench/variants/int8.json", "benchmark_variants"),
    ("artifacts/model/fingerprint.json", "ingest"),
])
def test_missing_input_fails_clearly_and_keeps_the_earlier_report(ran, path, stage):
    ws, result, _ = ran
    before = snapshot(ws.reports_dir)
    (ws.root / path).unlink()
    other = dataclasses.replace(Params(), cost=CostParams(price_per_hour_usd=0.3))  # would be a new run id
    for params in (Params(), other):
        with pytest.raises(MissingArtifactError) as err:
            report(params, ws)
        assert isinstance(err.value, FileNotFoundError), "a missing input must be a FileNotFoundError"
        assert path in str(err.value) and stage in str(err.value), f"unclear error: {err.value}"
    assert snapshot(ws.reports_dir) == before, "a failed report must leave reports/ untouched"


def test_stale_model_is_refused(tmp_path):
    ws = build_workspace(tmp_path)
    stale = dataclasses.replace(Params(), ingest=dataclasses.replace(Params().ingest, model="other/model"))
    with pytest.raises(ReportInputError, match="re-run the ingest phase"):
        report(stale, ws)
    assert not ws.reports_dir.exists() or not any(ws.reports_dir.iterdir()), "nothing may be written"


def test_a_summary_breaking_the_schema_is_refused():
    with pytest.raises(SummarySchemaError, match="run_id"):
        check_summary({"model": "m", "profile": "full", "baseline": {}, "variants": []})


def test_serving_section_from_the_deploy_phase_follows_the_contract(tmp_path):
    ws = build_workspace(tmp_path)
    run = {"config": {"batching": True, "cache": False, "routing": False, "variants": ["int8"]}, "concurrency": 4,
           "throughput_req_s": 1.5, "throughput_tok_s": 60.0, "p50_ms": 900.0, "p95_ms": 1500.0, "p99_ms": 1800.0,
           "errors": 0, "rejected": 0, "cost_per_1m_requests_usd": 18.5}
    write(ws.root / "artifacts" / "serving" / "serving.json", {
        "deployed": [{"name": "fp32", "fingerprint": FINGERPRINT, "where": "loopback", "dvc_revision": None},
                     {"name": "int8", "fingerprint": "00" * 32, "where": "loopback", "dvc_revision": None}],
        "left_out": {"naive": "failed its gates"},
        "serving": {"trace": {"name": "serving-v1", "requests": 16, "fingerprint": "ef" * 32}, "runs": [run],
                    "naive_cost_per_1m_requests_usd": 60.0, "optimized_cost_per_1m_requests_usd": 18.5}})
    result = report(Params(), ws)
    summary = json.loads(Path(result["summary"]).read_text())
    check_summary(summary)
    assert [d["name"] for d in summary["deployed"]] == ["fp32", "int8"], "deployed comes from the deploy phase"
    assert summary["serving"]["runs"][0]["throughput_req_s"] == 1.5, "the load test's runs are in the summary"
    page = (Path(result["summary"]).parent / "report.html").read_text()
    assert "Serving" in page and "serving-v1" in page and "failed its gates" in page, "the report shows serving"


def test_the_gateway_cache_run_and_its_curve_are_reported(tmp_path):
    ws = build_workspace(tmp_path)
    base = {"concurrency": 4, "throughput_req_s": 1.5, "throughput_tok_s": 60.0, "p50_ms": 900.0, "p95_ms": 1500.0,
            "p99_ms": 1800.0, "errors": 0, "rejected": 0, "cost_per_1m_requests_usd": 18.5}
    runs = [{**base, "config": {"batching": True, "cache": False, "routing": False, "variants": ["int8"]}},
            {**base, "throughput_req_s": 2.5, "cost_per_1m_requests_usd": 11.1,
             "config": {"batching": True, "cache": True, "routing": False, "variants": ["int8"], "gateway": True}}]
    curve = [{"threshold": t, "hit_rate": 0.9 - t / 2, "false_hit_rate": max(0.0, 0.6 - t) / 10,
              "false_hit_upper95": max(0.0055, (0.6 - t) / 8)} for t in (0.5, 0.6, 0.7, 0.8)]
    held = {"hit_rate": 0.69, "false_hit_rate": 0.0, "false_hit_upper95": 0.0055, "hits": 374, "same": 540,
            "false_hits": 0, "near_misses": 540}
    cache = {"hit_rate": 0.31, "hits": 5, "false_hits": 0, "unsourced_hits": 0, "false_hit_rate": 0.0,
             "false_hit_upper95": 0.45, "enabled": True, "threshold": 0.51, "min_phrase_sim": 0.85,
             "calibration": {"setting": {"threshold": 0.51, "min_phrase_sim": 0.85}, "max_false_hit": 0.01,
                             "curve": curve, "held": {"overall": held, "kinds": {}}}}
    write(ws.root / "artifacts" / "serving" / "serving.json", {
        "deployed": [{"name": "fp32", "fingerprint": FINGERPRINT, "where": "loopback", "dvc_revision": None}],
        "left_out": {}, "serving": {"trace": {"name": "serving-v1", "requests": 16, "fingerprint": "ef" * 32},
                                    "runs": runs, "cache": cache, "naive_cost_per_1m_requests_usd": 60.0,
                                    "optimized_cost_per_1m_requests_usd": 11.1}})
    result = report(Params(), ws)
    summary = json.loads(Path(result["summary"]).read_text())
    check_summary(summary)
    assert summary["serving"]["cache"]["hit_rate"] == 0.31, "the cache block is in the summary"
    page = (Path(result["summary"]).parent / "report.html").read_text()
    assert "via gateway, cache on" in page and "hit rate 0.310" in page, "the cache run and its figures show"
    assert "Semantic cache: hit rate versus false-hit rate" in page, "the calibration curve is plotted"


def test_the_routing_paragraph_names_dropped_tiers_and_the_task_retention():
    from tasks.report import _routing_html

    routing = {"tiers": ["gguf_q8_0_fa"], "thresholds": [None], "dropped": ["student_gguf_q8_0_fa"], "requests": 31,
               "cheap_share": 0.0, "escalation_rate": 0.0, "cost_per_1m_requests_usd": 7.4,
               "cost_per_1m_requests_usd_reference_alone": 6.98, "quality_retention": 1.0, "retention_lower95": 1.0,
               "judged_on": 100, "task_retention": 0.58, "task_retention_lower95": 0.497, "task_items": 180}
    text = _routing_html(routing)
    assert "dropped by the fit: student_gguf_q8_0_fa" in text and "gguf_q8_0_fa (reference)" in text, text
    assert "task accuracy retention on 180 labeled items" in text and "0.4970" in text, text
    routing.update(dropped=[], task_items=None)
    assert "dropped" not in _routing_html(routing) and "labeled" not in _routing_html(routing)


def test_the_report_says_where_the_lasting_deployment_serves():
    from tasks.report import _deployment_html

    line = _deployment_html({"action": "canary started", "deployment": "assistant", "current": "gguf_q8_0_fa",
                             "canary": "gguf_q6_k", "gateway_url": "http://127.0.0.1:8090"})
    assert "assistant" in line and "gguf_q8_0_fa" in line and "canary of <b>gguf_q6_k</b>" in line, line
    assert "http://127.0.0.1:8090/openai/v1" in line and "make serve-stop" in line, line
    assert "not changed: serve.keep is false" in _deployment_html({"action": "off", "reason": "serve.keep is false"})


def _gpu_record(root: Path, req_s: float = 20.0, hidden: int = 576) -> None:
    (root / "docs" / "measurements").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "measurements" / "gpu-serve.json").write_text(json.dumps({
        "card": "NVIDIA H200", "date": "2026-12-05", "note": "engine only", "config": {"hidden_size": hidden},
        "runs": {"16": {"req_s": req_s / 2, "p99_ms": 900.0}, "64": {"req_s": req_s, "p99_ms": 1500.0}}}))


def test_cpu_or_gpu_prices_both_on_the_same_trace(tmp_path):
    from tasks.report import _cpu_or_gpu_html, cpu_or_gpu

    params = Params()  # cost 0.10 USD/h, gpu 3.50 USD/h
    serving = {"runs": [{"errors": 0, "throughput_req_s": 5.0, "cost_per_1m_requests_usd": 5.5, "concurrency": 16},
                        {"errors": 2, "throughput_req_s": 9.0, "cost_per_1m_requests_usd": 3.0, "concurrency": 64}]}
    assert cpu_or_gpu(params, tmp_path, serving)["status"] == "not measured"
    _gpu_record(tmp_path)
    out = cpu_or_gpu(params, tmp_path, serving)
    assert out["concurrency"] == 64 and out["cpu_run"]["concurrency"] == 16, "GPU's top concurrency; CPU's error-free run"
    cpu = 0.10 / 3600 / 5.0 * 1e6  # 5.56 USD per 1M requests
    gpu = 3.50 / 3600 / 20.0 * 1e6  # 48.6
    assert out["comparison"]["cheaper"] == "cpu" and out["comparison"]["ratio"] == pytest.approx(gpu / cpu)
    assert "cpu is cheaper" in _cpu_or_gpu_html(out)
    _gpu_record(tmp_path, req_s=2000.0)
    assert cpu_or_gpu(params, tmp_path, serving)["comparison"]["cheaper"] == "NVIDIA H200", "named after the measured card"
    assert cpu_or_gpu(params, tmp_path, None)["status"] == "no CPU figure"
    (tmp_path / "artifacts" / "model").mkdir(parents=True)
    (tmp_path / "artifacts" / "model" / "config.json").write_text(json.dumps({"hidden_size": 960}))
    assert cpu_or_gpu(params, tmp_path, serving)["status"] == "other model shape"
    (tmp_path / "docs" / "measurements" / "gpu-serve.json").write_text('{"runs": "x"}')
    with pytest.raises(ReportInputError, match="gpu-serve.json: not a `tasks.gpubench --serve` record"):
        cpu_or_gpu(params, tmp_path, serving)


def test_gpu_measurement_must_stay_inside_the_workspace():
    from costopt.params import GpuParams, ParamsError

    for bad in ("/etc/passwd", "../elsewhere.json", 3):
        with pytest.raises(ParamsError, match="gpu.measurement: expected a path inside the workspace"):
            GpuParams(measurement=bad).check("gpu")
