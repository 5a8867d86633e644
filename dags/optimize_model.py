"""The `optimize_model` DAG: the cost-optimization roadmap on one model, end to end.

Wiring only: each task is a one-line wrapper of a phase function in `tasks/` (the same functions the
DVC stages and `python -m tasks.<phase>` run). Nothing heavy is imported at parse time. The form
(Params) lets a platform engineer pick the model, variants, gate thresholds, price and profile.

    preflight -> ingest -> evaldata -> benchmark -> quantize -> [benchmark_variants, validate]
              -> report -> version
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

SCHEMES = ["bf16", "int8_weight_only", "dynamic_qint8_naive"]  # costopt.quant.SCHEMES, kept light


def _run(phase_module: str, phase: str):
    """Call tasks.<module>.<phase>(params, ws) for this run's form; returns its small JSON result."""
    import importlib

    from airflow.sdk.exceptions import AirflowFailException

    from tasks.cli import USER_ERRORS
    from tasks.dagparams import resolve

    try:
        params, ws = resolve(get_current_context()["params"])
        return getattr(importlib.import_module(f"tasks.{phase_module}"), phase)(params, ws)
    except USER_ERRORS as exc:  # bad input: retrying cannot help, fail now with the message
        raise AirflowFailException(str(exc)) from exc


@dag(
    dag_id="optimize_model",
    schedule=None,
    catchup=False,
    tags=["costopt", "optimization"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    params={
        "model": Param("builtin:smollm2-135m-instruct", type="string", minLength=1,
                       description="builtin:<name>, a local model folder, or a Hugging Face id in the local cache"),
        "variants": Param(SCHEMES, type="array", minItems=1, uniqueItems=True,
                          items={"type": "string", "enum": SCHEMES},
                          description="quantization schemes to build and validate"),
        "gates": Param({"kl_mean_max": 0.02, "kl_p99_max": 0.5, "top1_agreement_min": 0.93,
                        "ppl_ratio_max": 1.05, "task_retention_min": 0.95}, type="object",
                       properties={"kl_mean_max": {"type": "number", "minimum": 0, "maximum": 20},
                                   "kl_p99_max": {"type": "number", "minimum": 0, "maximum": 50},
                                   "top1_agreement_min": {"type": "number", "minimum": 0, "maximum": 1},
                                   "ppl_ratio_max": {"type": "number", "minimum": 1, "maximum": 100},
                                   "task_retention_min": {"type": "number", "minimum": 0, "maximum": 1.5}},
                       additionalProperties=False, description="quality gates against fp32"),
        "price_per_hour_usd": Param(0.10, type="number", exclusiveMinimum=0, maximum=10000,
                                    description="machine price, USD per hour"),
        "profile": Param("full", type="string", enum=["quick", "full"],
                         description="quick: small sets (tests); full: the real run"),
        "workspace": Param("", type="string",
                           description="folder for artifacts/ and reports/ (empty: the project folder)"),
    },
)
def optimize_model():
    @task
    def preflight():
        return _run("preflight", "preflight")

    @task
    def ingest():
        return _run("ingest", "ingest")

    @task
    def evaldata():
        return _run("evaldata", "evaldata")

    @task
    def benchmark():
        return _run("benchmark", "benchmark_baseline")

    @task
    def quantize():
        return _run("quantize", "quantize_variants")

    @task
    def benchmark_variants():
        return _run("benchmark", "benchmark_variants")

    @task
    def validate():
        return _run("validate", "validate")

    @task
    def report():
        return _run("report", "report")

    @task
    def version():
        return _run("version", "version")

    measured = [benchmark_variants(), validate()]
    preflight() >> ingest() >> evaldata() >> benchmark() >> quantize() >> measured
    measured >> report() >> version()


optimize_model()
