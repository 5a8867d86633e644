"""The `continuous_optimization` DAG: production traffic feeds back; drift re-optimizes, on its own.

Runs daily (03:00 UTC, `catchup=False`) and whenever new traffic lands: the request log and the serving
metrics are Airflow Assets (whatever ships the log, e.g. a rotation hook, posts an asset event through
Airflow's REST API). Wiring only: each task is a wrapper of a phase in `tasks/continuous.py`.

    traffic -> [ab_test, drift] -> decide --(drift)--> reoptimize (triggers optimize_model) -> report
                                         \\--(no drift: reoptimize skipped)----------------> report

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


def _run(phase: str):
    """tasks.continuous.<phase>(params, ws, run_id) with this run's workspace and profile."""
    from airflow.sdk.exceptions import AirflowFailException

    from costopt.params import ParamsError, load_params
    from costopt.storage.layout import Workspace
    from tasks import continuous

    context = get_current_context()
    form = context["params"]
    ws = Workspace.from_env(form.get("workspace") or None)
    try:
        params = load_params(ws.root / "params.yaml", profile=form.get("profile") or None)
    except ParamsError as exc:  # bad settings: retrying cannot help
        raise AirflowFailException(str(exc)) from exc
    return getattr(continuous, phase)(params, ws, context["run_id"])


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
    params={
        "workspace": Param("", type="string", description="the workspace to watch (empty: the project folder)"),
        "profile": Param("", type="string", enum=["", "quick", "full"],
                         description="params.yaml profile for this run's settings (empty: the file as it is)"),
    },
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
    seen >> [ab_test(), drift()] >> decided >> reoptimize >> report()


continuous_optimization()
