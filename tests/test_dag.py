"""DAG integrity and policy: it imports cleanly and cheaply, and its shape and settings are as designed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
EXPECTED_EDGES = {
    "preflight": {"ingest"}, "ingest": {"evaldata"},
    "evaldata": {"benchmark", "reference", "sensitivity"},
    "benchmark": {"distill"}, "reference": {"distill"}, "distill": {"plan"},
    "plan": {"quantize"}, "quantize": {"benchmark_variant"}, "benchmark_variant": {"validate"},
    "validate": {"search", "calibration_curve"}, "sensitivity": {"search"}, "calibration_curve": {"search"},
    "search": {"route"}, "route": {"deploy"}, "deploy": {"report"}, "report": {"version"}, "version": set(),
}
MAPPED = {"quantize", "benchmark_variant", "validate"}  # dynamic task mapping over the variants


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT / "dags"))


def test_every_dag_imports_without_errors(dagbag):
    assert not dagbag.import_errors, f"DAG import errors: {dagbag.import_errors}"
    assert "optimize_model" in dagbag.dags, "optimize_model must be defined"


@pytest.mark.parametrize("dag_file", ["optimize_model.py", "continuous_optimization.py"])
def test_parsing_imports_nothing_heavy(tmp_path, dag_file):
    code = ("import sys, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('d', r'{PROJECT / 'dags' / dag_file}')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "heavy = [x for x in ('torch', 'transformers', 'great_expectations', 'dvc', 'matplotlib') if x in sys.modules]\n"
            "print(','.join(heavy))\n")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"parsing the DAG imported heavy modules: {out.stdout.strip()}"


def test_policy(dagbag):
    dag = dagbag.dags["optimize_model"]
    assert {"costopt", "optimization"} <= set(dag.tags), f"tags: {dag.tags}"
    assert dag.catchup is False, "no backfills of an optimization run"
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", ""), "triggered by hand or by API"
    for t in dag.tasks:
        assert t.retries >= 1, f"{t.task_id} should retry transient failures"


def test_task_graph(dagbag):
    dag = dagbag.dags["optimize_model"]
    graph = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert graph == EXPECTED_EDGES, f"task graph changed: {graph}"


def test_variants_fan_out_with_dynamic_task_mapping(dagbag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = dagbag.dags["optimize_model"]
    mapped = {t.task_id for t in dag.tasks if isinstance(t, MappedOperator)}
    assert mapped == MAPPED, f"mapped tasks: {mapped}"


def test_form_has_a_typed_schema(dagbag):
    params = dagbag.dags["optimize_model"].params
    schema = {k: params.get_param(k).schema for k in params.keys()}
    assert schema["profile"].get("enum") == ["quick", "full"], "profile is a choice"
    assert schema["variants"]["items"]["enum"], "variants are chosen from the registered schemes"
    assert schema["gates"]["properties"]["top1_agreement_min"]["maximum"] == 1, "gate ranges are in the form"


def test_form_variants_match_the_presets(dagbag):
    from costopt.params import QuantizeParams, load_params

    PRESETS = QuantizeParams.presets()
    param = dagbag.dags["optimize_model"].params.get_param("variants")
    defined = sorted(load_params(PROJECT / "params.yaml").quantize.definitions)
    assert sorted(param.schema["items"]["enum"]) == sorted([*PRESETS, *defined]), \
        "the form offers the presets and every variant params.yaml defines"


def _dag_over(tmp_path, edit) -> object:
    """The DAG parsed beside an edited copy of params.yaml (it reads ../params.yaml from its own folder)."""
    import shutil

    import yaml
    from airflow.dag_processing.dagbag import DagBag

    shutil.copytree(PROJECT / "dags", tmp_path / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    bag = DagBag(dag_folder=str(tmp_path / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["optimize_model"]


def test_form_defaults_come_from_params_yaml(dagbag, tmp_path):
    """One source of truth: what params.yaml says is what the form shows and sends by default, and a
    variant defined there can be picked."""
    def edit(raw):
        raw["ingest"]["model"] = "builtin:some-other-model"
        raw["quantize"]["variants"] = ["int8_weight_only", "my_q5"]
        raw["quantize"]["definitions"] = {"my_q5": {"runtime": "llamacpp", "qtype": "Q5_K_M"}}
        raw["validate"]["gates"]["kl_mean_max"] = 0.031
        raw["search"]["enabled"] = False
        raw["cost"]["price_per_hour_usd"] = 0.25

    params = _dag_over(tmp_path, edit).params
    assert params["model"] == "builtin:some-other-model"
    assert params["variants"] == ["int8_weight_only", "my_q5"]
    assert "my_q5" in params.get_param("variants").schema["items"]["enum"], "a defined variant is selectable"
    assert params.get_param("variants").resolve(["my_q5"]) == ["my_q5"]
    assert params["gates"]["kl_mean_max"] == 0.031 and params["mixed_precision_search"] is False
    assert params["price_per_hour_usd"] == 0.25


def test_a_broken_params_yaml_is_a_dag_import_error_naming_the_file(dagbag, tmp_path):
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    shutil.copytree(PROJECT / "dags", tmp_path / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text("ingest: {}\n")
    bag = DagBag(dag_folder=str(tmp_path / "dags"))
    (error,) = bag.import_errors.values()
    assert "params.yaml" in error and "ingest.model" in error, error


def test_a_run_uses_the_settings_frozen_at_its_preflight(tmp_path, monkeypatch):
    """Editing params.yaml during a run changes nothing in it: every task after preflight reads the copy
    preflight froze for that run, and a copy frozen by another run is refused."""
    import shutil

    from costopt.params import FROZEN, ParamsError, freeze
    from tasks.dagparams import resolve_run

    shutil.copy2(PROJECT / "params.yaml", tmp_path / "params.yaml")
    form = {"workspace": str(tmp_path), "profile": "quick", "gates": {"kl_mean_max": 0.04}}
    params, ws = resolve_run(form, "run-1", first=True)
    freeze(params, ws.root / FROZEN, "run-1")  # what preflight does once its checks pass
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("price_per_hour_usd: 0.10", "price_per_hour_usd: 9.0")
                                          .replace("quantize:", "quantize: [broken"))
    later, _ = resolve_run(form, "run-1", first=False)
    assert later == params, "a later task sees exactly the frozen settings"
    assert later.validate.gates.kl_mean_max == 0.04 and later.profile == "quick"
    with pytest.raises(ParamsError, match="frozen by run 'run-1', not by this run 'run-2'"):
        resolve_run(form, "run-2", first=False)


@pytest.mark.parametrize("key,value", [("profile", "turbo"), ("price_per_hour_usd", -1),
                                       ("gates", {"kl_mean_max": "low"}), ("variants", ["int3"])])
def test_form_rejects_values_outside_its_schema(dagbag, key, value):
    from airflow.sdk.definitions.param import ParamValidationError

    params = dagbag.dags["optimize_model"].params
    with pytest.raises(ParamValidationError):
        params.get_param(key).resolve(value)


def test_form_overrides_flow_into_validated_params():
    from costopt.params import ParamsError
    from tasks.dagparams import resolve

    params, ws = resolve({"profile": "quick", "gates": {"kl_mean_max": 0.05}, "price_per_hour_usd": 2.0})
    assert params.validate.gates.kl_mean_max == 0.05 and params.cost.price_per_hour_usd == 2.0, "form applied"
    assert params.profile == "quick", "profile applied"
    with pytest.raises(ParamsError, match="quantize.variants"):
        resolve({"variants": ["nope"]})


def test_storage_tasks_retry_with_back_off(dagbag):
    dag = dagbag.dags["optimize_model"]
    for task_id in ("deploy", "version"):  # the tasks that talk to the S3 remote
        t = dag.get_task(task_id)
        assert t.retries >= 3 and t.retry_exponential_backoff and t.max_retry_delay, \
            f"{task_id}: retries {t.retries}, back-off {t.retry_exponential_backoff}, cap {t.max_retry_delay}"


@pytest.mark.parametrize("error, retried", [
    ("transient", True), ("unreachable", True), ("denied", False), ("dvc", False)])
def test_transient_storage_faults_are_retried_and_user_errors_fail_at_once(dagbag, monkeypatch, tmp_path,
                                                                        error, retried):
    """`_run` lets a TransientStorageError (timeouts, 5xx, resets; an unreachable endpoint) through for
    Airflow to retry, and turns a user error (denied access, a failing dvc command) into a failure
    without retries."""
    import importlib
    import types

    from airflow.sdk.exceptions import AirflowFailException

    from costopt.params import Params
    from costopt.storage.dvc import DvcError, DvcTransientError
    from costopt.storage.layout import Workspace
    from costopt.storage.s3 import EndpointUnreachableError, StorageError, TransientStorageError

    monkeypatch.syspath_prepend(str(PROJECT / "dags"))
    module = importlib.import_module("optimize_model")
    exc = {"transient": DvcTransientError("push: Read timed out"),
           "unreachable": EndpointUnreachableError("version.endpoint_url: cannot reach"),
           "denied": StorageError("version.endpoint_url: refused HEAD (403 AccessDenied)"),
           "dvc": DvcError("dvc push failed: NoSuchBucket")}[error]

    def phase(params, ws):
        raise exc

    monkeypatch.setitem(sys.modules, "tasks.fakephase", types.SimpleNamespace(go=phase))
    monkeypatch.setattr(module, "get_current_context", lambda: {"params": {}, "run_id": "r1"})
    monkeypatch.setattr("tasks.dagparams.resolve_run", lambda form, run_id, first: (Params(), Workspace(tmp_path)))
    with pytest.raises(Exception) as info:
        module._run("fakephase", "go")
    if retried:
        assert info.value is exc and isinstance(exc, TransientStorageError), f"retried as is: {info.value!r}"
    else:
        assert isinstance(info.value, AirflowFailException) and str(exc) in str(info.value), repr(info.value)


def test_continuous_dag_policy_schedule_and_graph(dagbag):
    """Daily and on new traffic (assets), never backfilled, one run at a time; prompt and quality drift ->
    reoptimize -> report."""
    from airflow.timetables.assets import AssetOrTimeSchedule

    dag = dagbag.dags["continuous_optimization"]
    assert dag.catchup is False and dag.max_active_runs == 1, (dag.catchup, dag.max_active_runs)
    assert {"costopt", "continuous"} <= set(dag.tags), dag.tags
    assert isinstance(dag.timetable, AssetOrTimeSchedule) and "0 3 * * *" in dag.timetable.summary, dag.timetable.summary
    assets = {asset.name for _key, asset in dag.timetable.asset_condition.iter_assets()}
    assert assets == {"costopt_request_log", "costopt_serving_metrics"}, assets
    graph = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    assert graph == {"traffic": {"drift", "quality"}, "quality": {"ab_test"}, "ab_test": {"decide"},
                     "drift": {"decide"}, "decide": {"reoptimize"}, "reoptimize": {"report"}, "report": set()}, graph
    assert dag.get_task("report").trigger_rule == "none_failed", "the report is written whether or not it re-optimizes"
    assert dag.get_task("reoptimize").trigger_dag_id == "optimize_model"
    for t in dag.tasks:
        assert t.retries >= 1, f"{t.task_id} should retry transient failures"
