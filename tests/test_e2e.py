"""End to end on the real built-in model: a real Airflow run of `optimize_model` (quick profile), a real
moto_server S3 endpoint, real DVC. One run is shared by the checks below; it takes a few minutes.

The run happens in a copy of the project (tracked and untracked, not-ignored files) so the checkout
that runs the tests is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from costopt.storage.s3 import MotoServer

PROJECT = Path(__file__).resolve().parents[1]
SCHEMA = PROJECT / "schemas" / "summary.schema.json"
pytestmark = pytest.mark.e2e
# One of each kind the run must handle: weight-only INT8, W8A8, INT4 RTN and calibrated (AWQ), the naive one.
VARIANTS = ["int8_weight_only", "int8_dynamic", "int4_rtn_g64", "int4_awq_g64", "dynamic_qint8_naive",
            "gguf_q8_0", "gguf_q4_k_m",  # llama.cpp's own types, on the llama.cpp runtime
            "student", "student_gguf_q8_0"]  # the distilled student, on torch and on llama.cpp


def _files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [f for f in out if f and (root / f).is_file()]


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def make_workspace(dest: Path, endpoint: str, edit: Callable[[dict], None] | None = None) -> Path:
    """A git repo with the project's files, its params pointing at the test's S3 endpoint; `edit`, when
    given, changes the params further before they are written (tests/test_airflow_ui.py uses it)."""
    for rel in _files(PROJECT):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["version"]["endpoint_url"] = endpoint
    # gguf_q8_0 passes the quick gates and costs less than any mixed INT8/INT4 torch candidate can, so
    # the search would skip the mixed candidates (tests/test_search.py checks that); build one here
    params["search"]["skip_dominated"] = False
    if edit is not None:
        edit(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "workspace")
    return dest


def airflow_env(home: Path) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONUNBUFFERED": "1"}


def dags_test(env: dict[str, str], conf: dict, log: Path) -> subprocess.CompletedProcess:
    airflow = str(Path(sys.executable).with_name("airflow"))
    proc = subprocess.run([airflow, "dags", "test", "optimize_model", "--conf", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def digest_tree(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        for path in sorted((root / rel).rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    with MotoServer(port=0) as s3:
        ws = make_workspace(base / "ws", s3.endpoint_url)
        env = airflow_env(base / "airflow")
        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        proc = dags_test(env, {"profile": "quick", "workspace": str(ws), "variants": VARIANTS}, base / "run.log")
        try:
            yield {"ws": ws, "env": env, "proc": proc, "base": base, "s3": s3}
        finally:
            from costopt.deploy import lasting

            lasting.stop(ws)  # the deployment outlives the DAG run by design; not the test session


def test_dag_run_succeeds(run):
    assert run["proc"].returncode == 0, f"optimize_model failed; log tail:\n{run['proc'].stdout[-4000:]}"


def test_summary_meets_the_contract(run):
    import jsonschema

    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    jsonschema.validate(summary, json.loads(SCHEMA.read_text()))
    assert summary["profile"] == "quick", "the run used the quick profile"
    names = [v["name"] for v in summary["variants"]]
    assert names[:len(VARIANTS)] == VARIANTS, f"every mapped variant is reported, in order: {names}"
    mixed = [n for n in names if n.startswith("mixed_")]
    assert len(mixed) == 1, f"the quick profile evaluates one mixed-precision candidate: {names}"
    for v in summary["variants"]:
        speed = v["speed"]
        assert speed["decode_tok_s_bs1"] > 0 and speed["decode_tok_s_batch"] > 0, f"{v['name']}: {speed}"
    assert summary["search"]["evaluations"] == len(VARIANTS) + 1, f"search: {summary['search']}"
    runtimes = {v["name"]: v.get("runtime") for v in summary["variants"]}
    assert runtimes["gguf_q8_0"] == "llamacpp" and runtimes["int8_weight_only"] == "torch", \
        f"each variant is measured on its own runtime: {runtimes}"
    times = summary["wall_times_s"]
    assert {"evaldata", "search", "validate_variant-gguf_q8_0"} <= set(times) and all(t > 0 for t in times.values()), \
        f"the report lists each task's wall time: {times}"
    assert (run["ws"] / "reports" / "latest" / "report.html").is_file(), "the human report exists"
    assert (run["ws"] / "reports" / "latest" / "data_docs" / "index.html").is_file(), "GE Data Docs are in the report"


def test_deploy_serves_the_winners_and_load_tests_them(run):
    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    deployed = [d["name"] for d in summary["deployed"]]
    assert deployed[0] == "fp32" and "dynamic_qint8_naive" not in deployed, f"fp32 and winners only: {deployed}"
    runs = summary["serving"]["runs"]
    if summary["search"]["picked"]:
        assert summary["search"]["picked"] in deployed, f"the pick is deployed: {deployed}"
        assert summary["search"]["picked"] in {r["variant"] for r in runs}, "the load test serves the pick"
    else:
        assert {r["variant"] for r in runs} == {deployed[-1], "fp32"}, [r["variant"] for r in runs]
    # every request is answered or refused with a 429 (deadline admission may refuse what it forecasts
    # late); none errors or goes missing, and most are answered at this light load
    assert runs and all(r["errors"] == 0 and r["lost"] == 0 and r["ok"] + r["rejected"] == r["requests"]
                        and r["ok"] >= r["requests"] / 2 for r in runs), \
        f"the short load test on the real server answers (or refuses with 429) every request: {runs}"
    assert summary["serving"]["trace"]["name"] == "serving-v1", summary["serving"]["trace"]
    direct = [r for r in runs if not r["config"]["cache"]]
    log = run["ws"] / "logs" / "requests.jsonl"
    assert log.is_file() and len(log.read_text().splitlines()) >= sum(r["requests"] for r in direct), \
        "every load-test request sent straight to the server is in its request log"
    # the same trace through the gateway, its semantic cache on: served, and never a false hit
    cached = [r for r in runs if r["config"]["cache"]]
    cache = summary["serving"].get("cache") or {}
    assert len(cached) == 1 and cache.get("enabled") is True, f"the gateway run: {cached} {cache}"
    assert cache["false_hits"] == 0 and 0 <= cache["hit_rate"] <= 1 and cache["threshold"] > 0, cache
    assert cache["calibration"]["held"]["overall"]["false_hit_upper95"] <= 0.01, "the calibration proved its bound"


def test_the_deployment_outlives_the_dag_run(run):
    """The pick keeps serving after `airflow dags test` exited, under the deployment's name, and the
    versioned record says what serves where."""
    import httpx

    from costopt.deploy import lasting

    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    picked = summary["search"]["picked"] or "fp32"  # nothing passed: the deployment serves the model as it is
    state = lasting.status(run["ws"])
    assert state is not None and state["running"], f"the lasting deployment is not serving: {state}"
    record = json.loads((run["ws"] / "artifacts" / "serving" / "deployment.json").read_text())
    assert record["current"] == picked and record["action"] == "started", record
    assert picked in {v["name"] for v in record["variants"]} and record["git_revision"], record
    where = {d["name"]: d["where"] for d in summary["deployed"]}
    assert "lasting loopback deployment" in where[picked], where
    with httpx.Client(base_url=state["gateway"]["url"], timeout=120, trust_env=False) as http:
        r = http.post("/openai/v1/chat/completions", json={
            "model": "assistant", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
    assert r.status_code == 200 and r.headers["x-costopt-variant"] == picked, (r.status_code, r.text[:300])


def test_the_router_is_fitted_judged_and_served_through_the_gateway(run):
    """The route task chose tiers cheapest first ending at the pick, fitted a threshold per cheap tier on
    half the held-out prompts and judged the router on the other half; deploy loaded it into the gateway
    and replayed the trace for the routed model, every request answered."""
    ws = run["ws"]
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    record = json.loads((ws / "artifacts" / "route" / "route.json").read_text())
    picked = summary["search"]["picked"]
    if not picked:
        assert record["enabled"] is False and "gates" in record["reason"], record
        return
    tiers = record["router"]["tiers"]
    assert tiers[-1]["name"] == picked and tiers[-1]["threshold"] is None, tiers
    costs = [t["cost_per_1m_requests_usd"] for t in tiers]
    assert costs == sorted(costs), f"cheapest first: {tiers}"
    assert all(0 <= t["threshold"] <= 1 for t in tiers[:-1]), tiers
    judge = record["judge"]
    assert judge["requests"] == record["judge_prompts"] and sum(judge["finished_on"].values()) == judge["requests"]
    lo, hi = judge["retention"]["ci95"]
    assert 0 <= lo <= judge["retention"]["value"] <= hi <= 1, judge["retention"]
    tasks = judge["tasks"]  # the labeled items the fit did not see, routed and with the reference alone
    assert tasks["items"] == record["judge_items"] > 0 and record["fit_items"] > 0, tasks
    assert 0 <= tasks["accuracy_routed"]["value"] <= 1 and 0 <= tasks["accuracy_reference"]["value"] <= 1, tasks
    for f in record.get("fits", []):  # each cheap tier's threshold meets the task fit's too
        assert f["tasks"]["items"] == record["fit_items"], f["tasks"]
        assert "skipped" in f["tasks"] or f["threshold"] >= f["tasks"]["threshold"], f
    routing = summary["serving"]["routing"]
    routed = [r for r in summary["serving"]["runs"] if r["config"]["routing"]]
    assert len(routed) == 1 and routed[0]["errors"] == 0 and routed[0]["ok"] >= 1, routed
    assert 0 <= routing["cheap_share"] <= 1 and routing["tiers"] == [t["name"] for t in tiers], routing
    assert set(routing["finished_on"]) <= {t["name"] for t in tiers}, routing["finished_on"]


def test_quality_drift_on_live_traffic_and_the_ab_quality_guard(run, tmp_path):
    """The continuous DAG's quality and A/B phases on this run's workspace, on live prompts no set of the
    run holds, re-measured with the validate code against fp32. The per-channel INT8 variant holds its
    gates there; the seed's one-liner, were it serving, fails them for sure (quality drift). An A/B of the
    two, equal on latency and errors, goes to INT8 on the paired quality guard."""
    import dataclasses

    from costopt.evaluation.evaldata import chat_pool
    from costopt.params import load_params
    from costopt.storage.layout import Workspace
    from tasks import continuous

    ws = Workspace.from_env(run["ws"])
    params = load_params(ws.root / "params.yaml", profile="quick")
    try:
        unseen = [conv for _fam, conv in chat_pool(params.evaldata.seed)[300:340]]  # past every set the run made
        log = tmp_path / "requests.jsonl"  # the lasting deployment writes the workspace's own log: leave it be
        log.write_text("".join(json.dumps({"variant": v, "latency_ms": 500.0, "outcome": "ok", "completion_tokens": 16,
                                           "messages": conv}) + "\n"
                               for v in ("int8_weight_only", "dynamic_qint8_naive") for conv in unseen)
                       + '{"variant": "int8_w\n')  # a line cut off mid-write
        params = dataclasses.replace(params, calibrate=dataclasses.replace(params.calibrate, logs=str(log)))

        held = continuous.quality(params, ws, "live-ab", variant="int8_weight_only")
        record = json.loads((ws.root / "artifacts" / "continuous" / "live-ab" / "quality.json").read_text())
        assert held["decision"] == "no drift", record
        assert record["live"]["prompts"] == params.continuous.quality_prompts and record["prompts_logged"] == 40, record
        lo, hi = record["live"]["kl_mean"]["ci95"]
        assert 0 <= lo <= record["live"]["kl_mean"]["value"] <= hi < params.validate.gates.kl_mean_max, record["live"]
        assert record["validated"]["kl_mean"]["value"] is not None, "compared with the variant's validated KL"
        assert set(record["arms"]) == {"int8_weight_only", "dynamic_qint8_naive"}, record.get("arms_reason")

        ab = continuous.ab_test(params, ws, "live-ab")
        evidence = json.loads((ws.root / "artifacts" / "continuous" / "live-ab" / "ab.json").read_text())
        guard = evidence["metrics"][continuous.QUALITY_GUARD]
        assert guard["verdict"] == "B worse" and guard["n"] == params.continuous.quality_prompts, guard
        assert ab["decision"] == "A" and "dynamic_qint8_naive is worse on kl_mean" in ab["reason"], ab

        naive = continuous.quality(params, ws, "live-naive", variant="dynamic_qint8_naive")
        assert naive["decision"] == "drift" and "kl_mean fails its gate on live traffic" in naive["reason"], naive
        served = continuous.quality(params, ws, "live-served")  # no variant named: the deployment's current one
        summary = json.loads((ws.root / "reports" / "latest" / "summary.json").read_text())
        assert served["variant"] == (summary["search"]["picked"] or "fp32"), served
    finally:  # the evidence these phases wrote is not the run's: the DVC tests compare the run's artifacts
        shutil.rmtree(ws.root / "artifacts" / "continuous", ignore_errors=True)


def test_gate_keeps_the_naive_one_liner_out(run):
    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    rows = {v["name"]: v for v in summary["variants"]}
    naive = rows["dynamic_qint8_naive"]
    assert naive["gate"]["passed"] is False, "quantize_dynamic must fail the default gate"
    assert any("kl_mean" in r for r in naive["gate"]["reasons"]), f"reasons: {naive['gate']['reasons']}"
    assert naive["quality"]["kl_mean"] > 0.5, f"the one-liner's KL is large: {naive['quality']['kl_mean']}"
    int8 = rows["int8_weight_only"]
    assert int8["quality"]["kl_mean"] < 0.02 and int8["quality"]["top1_agreement"] > 0.93, \
        f"per-channel INT8 stays close to fp32: {int8['quality']}"
    assert summary["search"]["picked"] != "dynamic_qint8_naive", "a failed variant is never picked"


def test_report_shows_sensitivity_curve_and_front(run):
    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    sens = summary["sensitivity"]
    assert len(sens["parts"]) == 60, "SmolLM2-135M has 30 blocks x (attention, MLP)"
    assert all(sens["parts"][p]["int4"] > sens["parts"][p]["int8"] for p in sens["parts"]), \
        "INT4 costs more KL than INT8 in every part"
    curve = summary["calibration_curve"]
    assert [p["samples"] for p in curve["points"]] == [4, 8], f"quick-profile curve: {curve}"
    page = (run["ws"] / "reports" / "latest" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4, \
        "Pareto, sensitivity, calibration-curve and semantic-cache plots"
    assert set(summary["search"]["front"]) <= {"fp32", *[v["name"] for v in summary["variants"]]}


@pytest.mark.slow  # two full scans (2.5 min): a property of the method, in `make test-full`; the DAG run covers the scan
def test_sensitivity_ranking_is_stable_across_seeds(run):
    """Two disjoint-seeded draws of sensitivity prompts rank the parts alike (Spearman >= 0.8)."""
    from scipy.stats import spearmanr

    from costopt.storage.layout import Workspace
    from costopt.params import load_params
    from tasks.sensitivity import run_scan

    ws = run["ws"]
    params = load_params(ws / "params.yaml", profile="quick",
                         overrides={"search": {"sensitivity_prompts": 8, "precisions": ["int4"]}})
    a, b = (run_scan(params, Workspace(ws), seed)["parts"] for seed in (1, 2))
    parts = sorted(a)
    rho = spearmanr([a[p]["int4"] for p in parts], [b[p]["int4"] for p in parts]).statistic
    assert rho >= 0.8, f"sensitivity ranking moved between seeds: Spearman {rho:.3f}"


def test_task_set_scores_above_chance(run):
    summary = json.loads((run["ws"] / "reports" / "latest" / "summary.json").read_text())
    acc, chance = summary["baseline"]["quality"]["task_accuracy"], summary["chance_accuracy"]
    assert acc > chance + 0.1, f"fp32 task accuracy {acc} must be clearly above chance {chance}"


def test_dvc_lock_records_the_settings_the_run_used(run):
    """The form's variants (not params.yaml's) and the quick profile's sizes are what dvc.lock records."""
    import yaml

    lock = yaml.safe_load((run["ws"] / "dvc.lock").read_text())["stages"]
    frozen = yaml.safe_load((run["ws"] / "artifacts" / "run" / "params.yaml").read_text())
    assert frozen["quantize"]["variants"] == VARIANTS and frozen["profile"] == "quick", frozen["quantize"]
    recorded = lock["quantize"]["params"]["artifacts/run/params.yaml"]["quantize"]
    assert recorded["variants"] == VARIANTS, f"dvc.lock records the run's variants: {recorded['variants']}"
    assert lock["evaldata"]["params"]["artifacts/run/params.yaml"]["evaldata"] == frozen["evaldata"], \
        "the quick profile's set sizes, as the run used them"


def test_dvc_pull_restores_every_artifact_bit_for_bit(run):
    ws, clone = run["ws"], run["base"] / "clone"
    _git(ws, "clone", "-q", str(ws), str(clone))
    shutil.copy2(ws / "dvc.lock", clone / "dvc.lock")
    shutil.copy2(ws / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    from costopt.storage.layout import Workspace
    from costopt.params import load_params
    from tasks.version import pull

    pull(Workspace(clone), load_params(clone / "params.yaml", profile="quick"))
    want = digest_tree(ws, ["artifacts", "reports"])
    got = digest_tree(clone, ["artifacts", "reports"])
    assert want and got == want, f"pulled files differ: {sorted(set(want.items()) ^ set(got.items()))[:5]}"


def test_bad_input_fails_early_and_keeps_what_is_stored(run):
    ws, env = run["ws"], run["env"]
    latest = ws / "reports" / "latest"
    before_target, before = os.readlink(latest), digest_tree(ws, ["artifacts", "reports"])
    lock = (ws / "dvc.lock").read_bytes()
    proc = dags_test(env, {"profile": "quick", "workspace": str(ws), "model": "nobody/no-such-model"},
                     run["base"] / "bad-model.log")
    assert proc.returncode != 0, "an unknown model must fail the run"
    assert "ingest.model" in proc.stdout + proc.stderr, "the error names the field"
    proc = dags_test(env, {"profile": "turbo", "workspace": str(ws)}, run["base"] / "bad-param.log")
    assert proc.returncode != 0, "a DAG param outside its schema must be refused"
    proc = dags_test(env, {"profile": "quick", "workspace": str(ws), "variants": ["int3_magic"]},
                     run["base"] / "bad-scheme.log")
    assert proc.returncode != 0, "an unknown variant name must be refused"
    bad = ws / "bad-params.yaml"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["quantize"]["definitions"] = {"int4_g128": {"scheme": "int4_weight_only", "group_size": 128}}
    params["quantize"]["variants"] = ["int4_g128"]
    bad.write_text(yaml.safe_dump(params))
    cli = subprocess.run([sys.executable, "-m", "tasks.preflight", "--params", str(bad), "--workspace", str(ws)],
                         cwd=PROJECT, capture_output=True, text=True, env=env)
    assert cli.returncode == 2, f"preflight must refuse group size 128 on widths 576/1536: {cli.stderr}"
    assert "quantize.definitions.int4_g128.group_size: 128 does not divide" in cli.stderr, cli.stderr
    assert os.readlink(latest) == before_target, "reports/latest still points at the good run"
    assert digest_tree(ws, ["artifacts", "reports"]) == before, "no stored artifact or report changed"
    assert (ws / "dvc.lock").read_bytes() == lock, "dvc.lock unchanged"


def test_student_variants_are_made_from_the_distilled_student(run):
    """The DAG's distill task made a student; its variants name it as their base (fingerprint and all),
    are half the teacher's size or less, and were benchmarked and gated like every other variant."""
    ws = run["ws"]
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    student_fp = json.loads((ws / "artifacts" / "distill" / "student" / "fingerprint.json").read_text())
    assert student_fp["distilled_from"] == summary["model_fingerprint"], student_fp
    rows = {v["name"]: v for v in summary["variants"]}
    for name in ("student", "student_gguf_q8_0"):
        spec = json.loads((ws / "artifacts" / "variants" / name / "spec.json").read_text())
        assert spec["base"] == "student" and spec["base_fingerprint"] == student_fp["fingerprint"], spec
        row = rows[name]
        assert row["base"] == "student" and row["size_ratio"] <= 0.5, row
        assert row["quality"]["kl_mean"] is not None and row["cost_per_1m_requests_usd"] > 0, row
        assert isinstance(row["gate"]["passed"], bool), row["gate"]
    assert rows["student_gguf_q8_0"]["runtime"] == "llamacpp" and rows["student"]["runtime"] == "torch", rows
    d = summary["distill"]
    assert d["param_ratio"] <= 0.5 and d["after"]["kl_mean"]["value"] < d["before"]["kl_mean"]["value"], d
    assert all(d["after"][k]["ci95"] for k in ("kl_mean", "top1_agreement", "task_retention")), d["after"]
    assert "Distillation" in (ws / "reports" / "latest" / "report.html").read_text()


def test_distill_builds_a_half_size_student_that_learns_and_refuses_a_shape_the_teacher_cannot_give(run):
    """`python -m tasks.distill` on the run's workspace (quick profile): a student of at most half the
    teacher's parameters, measured before and after training; then a shape with more blocks than the
    teacher has fails at once, naming the field, and leaves the student as it was."""
    ws, env = run["ws"], run["env"]
    cmd = [sys.executable, "-m", "tasks.distill", "--profile", "quick", "--workspace", str(ws)]
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((ws / "artifacts" / "distill" / "distill.json").read_text())
    s = record["summary"]
    assert s["param_ratio"] <= 0.5 and len(s["kept_layers"]) == 16, s
    assert s["kl_mean_after"] < s["kl_mean_before"], f"training did not lower the student's KL: {s}"
    for when in ("before", "after"):
        assert all(record[when][m]["ci95"] for m in ("kl_mean", "top1_agreement", "ppl_ratio", "task_retention")), \
            f"every gate metric with its CI ({when})"
    assert record["sources"]["rows"] == 32 and len(record["train"]["history"]) == 8, record["sources"]
    assert s["student_cost_per_1m_requests_usd"] > 0 and s["teacher_cost_per_1m_requests_usd"] > 0, s
    assert record["speed"]["student"]["served"]["trace"] == record["speed"]["teacher"]["served"]["trace"], \
        "student and teacher timed on the same trace"
    from costopt.models.source import load_model_dir

    student, _ = load_model_dir(ws / "artifacts" / "distill" / "student")  # a model folder like any other
    assert student.config.num_hidden_layers == 16 and student.config.intermediate_size == 768
    again = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and '"cached": true' in again.stdout, again.stdout[-2000:]
    abl = subprocess.run([*cmd, "--ablation"], cwd=PROJECT, capture_output=True, text=True, env=env, timeout=1200)
    assert abl.returncode == 0, abl.stderr[-3000:]
    ablation = json.loads((ws / "artifacts" / "distill" / "ablation.json").read_text())
    default = ablation["kl_schedule_hidden"]
    assert default["reused_distill_run"] and default["kl_mean"] == record["after"]["kl_mean"], default
    for name in ("kl_only", "kl_temperature_schedule"):  # trained and measured here
        assert not ablation[name]["reused_distill_run"] and ablation[name]["kl_mean"]["ci95"], ablation[name]
    assert ablation["kl_only"]["config"]["hidden_weight"] == 0 and ablation["kl_only"]["config"]["t_start"] == 1
    before = digest_tree(ws, ["artifacts/distill"])
    bad = ws / "bad-distill.yaml"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["distill"]["layers"] = 40
    bad.write_text(yaml.safe_dump(params))
    proc = subprocess.run([*cmd, "--params", str(bad)], cwd=PROJECT, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "distill.layers" in proc.stderr and "30 blocks" in proc.stderr, proc.stderr
    assert digest_tree(ws, ["artifacts/distill"]) == before, "a refused shape must leave the student as it was"


def test_a_student_trained_on_a_gpu_machine_travels_there_and_back(run, tmp_path):
    """The GPU round trip on the CPU (`tasks.distill_gpu --allow-cpu`, a few steps): `--export-gpu`
    writes the bundle (teacher parts, plan, training prompts, none held out), the trainer rebuilds
    teacher and student from it and writes the student's parts, `--import-student` measures them and
    makes them the workspace's student; an import whose plan is not the workspace's is refused and
    changes nothing. The workspace's distill folder is put back afterwards."""
    ws, env = run["ws"], run["env"]
    cmd = [sys.executable, "-m", "tasks.distill", "--profile", "quick", "--workspace", str(ws)]
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    proc = subprocess.run([*cmd, "--export-gpu", str(bundle)], cwd=PROJECT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(bundle.glob("teacher-part*.safetensors"))
    assert parts and all(p.stat().st_size <= 48 * 2 ** 20 for p in parts), parts
    plan = json.loads((bundle / "meta" / "plan.json").read_text())
    held = {json.dumps(json.loads(line)["messages"]) for line in (ws / "artifacts" / "data" / "prompts.jsonl").open()}
    assert plan["conversations"] and not held & {json.dumps(c) for c in plan["conversations"]}, "a held-out prompt"
    again = subprocess.run([*cmd, "--export-gpu", str(bundle)], cwd=PROJECT, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "not empty" in again.stderr, again.stderr[-2000:]
    train = [sys.executable, "-m", "tasks.distill_gpu", "--bundle", str(bundle), "--out", str(out), "--allow-cpu",
             "--steps", "3", "--max-prompts", "8", "--gen-seconds", "600", "--gen-rounds", "3", "--samples-per-prompt",
             "1", "--batch", "2", "--max-len", "48", "--answer-tokens", "4", "--gen-batch", "8", "--warmup", "1"]
    proc = subprocess.run(train, cwd=PROJECT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "record.json").read_text())
    assert record["train"]["steps"] == 3 and record["plan"] == plan["plan"] and record["parts"], record["train"]
    assert all(record["data"]["counts"][k] > 0 for k in ("greedy", "sampled", "self_written", "plain_text")), \
        record["data"]
    saved = tmp_path / "distill-before"
    shutil.copytree(ws / "artifacts" / "distill", saved)
    try:
        tampered = tmp_path / "tampered"
        shutil.copytree(out, tampered)
        bad = json.loads((tampered / "record.json").read_text())
        bad["plan"]["kept_layers"] = bad["plan"]["kept_layers"][::-1]
        (tampered / "record.json").write_text(json.dumps(bad))
        before = digest_tree(ws, ["artifacts/distill"])
        proc = subprocess.run([*cmd, "--import-student", str(tampered)], cwd=PROJECT, capture_output=True, text=True,
                              env=env)
        assert proc.returncode == 2 and "plan" in proc.stderr, proc.stderr[-2000:]
        assert digest_tree(ws, ["artifacts/distill"]) == before, "a refused import must change nothing"
        proc = subprocess.run([*cmd, "--import-student", str(out)], cwd=PROJECT, capture_output=True, text=True,
                              env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = json.loads((ws / "artifacts" / "distill" / "distill.json").read_text())
        assert imported["gpu_run"]["train"]["steps"] == 3 and imported["cpu_run"]["summary"]["kl_mean_after"] > 0
        assert all(imported["after"][m]["ci95"] for m in ("kl_mean", "top1_agreement", "task_retention"))
        assert imported["summary"]["trained_on"] == "cpu" and imported["before"] == json.loads(
            (saved / "distill.json").read_text())["before"], "the untrained student's measurement is kept"
        weights = lambda d: hashlib.sha256((d / "student" / "model.safetensors").read_bytes()).hexdigest()
        assert weights(ws / "artifacts" / "distill") != weights(saved), "the imported weights are the student now"
    finally:
        shutil.rmtree(ws / "artifacts" / "distill")
        shutil.copytree(saved, ws / "artifacts" / "distill")
