"""The `continuous_optimization` DAG: production traffic feeds back; drift re-optimizes, on its own.

Runs daily (03:00 UTC, `catchup=False`) and whenever new traffic lands: the request log and the serving
metrics are Airflow Assets. The `traffic_watch` DAG below posts their events: every 15 minutes it
counts the requests in the log and in the running predictor's `/metrics`, and a task whose outlet is
the asset succeeds once `continuous.announce_requests` new ones have come in (anything else that ships
the log, e.g. a rotation hook, can post the same event through Airflow's REST API). Wiring only: each
task is a wrapper of a phase in `tasks/continuous.py`.

    traffic -> drift ----------------> decide --(drift)--> reoptimize (triggers optimize_model) -> report
           \\-> quality -> ab_test ---/       \\--(no drift: reoptimize skipped)---------------> report

`drift` tests the prompts (MMD of embeddings), `quality` the served variant's KL and top-1 against fp32
on a sample of them (the validate gates on live traffic), and the A/B arms' KL on the same prompts,
which `ab_test` uses as its quality guard; either drift re-optimizes.

`optimize_model` is the same code path as a manual run: it calibrates on the request log, gates every
candidate, and its deploy phase hands the winner to the deployment's quality-judged canary.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

REQUEST_LOG = Asset(name="costopt_request_log", uri="file:///costopt/logs/requests.jsonl", group="costopt")
SERVING_METRICS = Asset(name="costopt_serving_metrics", uri="file:///costopt/serving/metrics", group="costopt")


def _settings():
    """(params, workspace) of this run's form: its workspace and profile."""
    from airflow.sdk.exceptions import AirflowFailException

    from costopt.params import ParamsError, load_params
    from costopt.storage.layout import Workspace

    form = get_current_context()["params"]
    ws = Workspace.from_env(form.get("workspace") or None)
    try:
        return load_params(ws.root / "params.yaml", profile=form.get("profile") or None), ws
    except ParamsError as exc:  # bad settings: retrying cannot help
        raise AirflowFailException(str(exc)) from exc


def _run(phase: str):
    """tasks.continuous.<phase>(params, ws, run_id) with this run's workspace and profile."""
    from tasks import continuous

    params, ws = _settings()
    return getattr(continuous, phase)(params, ws, get_current_context()["run_id"])


FORM = {
    "workspace": Param("", type="string", description="the workspace to watch (empty: the project folder)"),
    "profile": Param("", type="string", enum=["", "quick", "full"],
                     description="params.yaml profile for this run's settings (empty: the file as it is)"),
}


@dag(
    dag_id="continuous_optimization",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                 assets=(REQUEST_LOG | SERVING_METRICS)),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,  # the trigger's conf stays a dict
    tags=["costopt", "continuous"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params=FORM,
)
def continuous_optimization():
    @task
    def traffic():
        return _run("traffic")

    @task
    def ab_test():
        return _run("ab_test")

    @task
    def drift():
        return _run("drift")

    @task
    def quality():
        return _run("quality")

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def decide():
        result = _run("decide")
        get_current_context()["ti"].xcom_push(key="conf", value=(result.get("trigger") or {}).get("conf"))
        return result["reoptimize"]

    reoptimize = TriggerDagRunOperator(task_id="reoptimize", trigger_dag_id="optimize_model",
                                       conf="{{ ti.xcom_pull(task_ids='decide', key='conf') }}")

    @task(trigger_rule="none_failed")
    def report():
        return _run("report")

    seen = traffic()
    decided = decide()
    measured = quality()
    seen >> measured
    seen >> drift() >> decided
    measured >> ab_test() >> decided
    decided >> reoptimize >> report()


continuous_optimization()


@dag(
    dag_id="traffic_watch",
    schedule=CronTriggerTimetable("*/15 * * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["costopt", "continuous"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md="Posts the request-log and serving-metrics asset events that run `continuous_optimization` "
           "once `continuous.announce_requests` new requests have come in (`tasks.continuous.watch`).",
    params=FORM,
)
def traffic_watch():
    def watcher(what: str, asset: Asset):
        @task.short_circuit(task_id=f"{what}_grew")
        def grew():
            from tasks import continuous

            params, ws = _settings()
            seen = continuous.watch(params, ws, what)
            print(f"{what}: {seen['reason']}")
            return seen if seen["announce"] else None

        @task(task_id=f"announce_{what}", outlets=[asset])
        def announce(seen: dict):
            """Succeeds, so Airflow posts the asset's event (with the counts as its extra)."""
            from tasks import continuous

            _params, ws = _settings()
            get_current_context()["outlet_events"][asset].extra = {"requests": seen["count"],
                                                                   "new": seen["count"] - seen["since"]}
            continuous.announced(ws, what, seen["count"])

        announce(grew())

    watcher("request_log", REQUEST_LOG)
    watcher("serving_metrics", SERVING_METRICS)


traffic_watch()
