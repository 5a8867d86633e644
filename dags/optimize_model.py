"""The `optimize_model` DAG: the cost-optimization roadmap on one model, end to end.

Wiring only: each task is a one-line wrapper of a phase function in `tasks/` (the same functions the
DVC stages and `python -m tasks.<phase>` run). Nothing heavy is imported at parse time. The form
(Params) lets a platform engineer pick the model, variants, gates, price and profile. Variants fan out
with dynamic task mapping: one quantize -> benchmark -> validate chain per variant.

    preflight -> ingest -> evaldata -> [benchmark, reference, sensitivity]
      -> distill (a student at most half the teacher's size, trained on its outputs; the base of the
         student* variants)
      -> plan -> quantize[v] -> benchmark_variant[v] -> validate[v]   (mapped over the variants)
      -> calibration_curve (reuses the curve variant quantize built) -> search (mixed precision, cheapest passing variant, Pareto front)
      -> route (the precision router's tiers and thresholds, fitted and judged on held-out prompts)
      -> deploy (fp32 + the winners on a loopback KServe server, short load test) -> report -> version
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

# costopt.params.QuantizeParams.presets() (the schemes' and the runtimes'), kept light (a test checks they match)
PRESETS = ["bf16", "int8_weight_only", "int8_dynamic", "int8_static", "int4_rtn_g64", "int4_gptq_g64",
           "int4_awq_g64", "int4_rtn_g32", "int4_gptq_g32", "dynamic_qint8_naive",
           "gguf_bf16", "gguf_q8_0", "gguf_q6_k", "gguf_q5_k_m", "gguf_q4_k_m", "gguf_q4_0", "gguf_bf16_fa", "gguf_q8_0_fa",
           "gguf_q6_k_fa",
           "student", "student_int8_weight_only", "student_int4_gptq_g64", "student_gguf_q8_0", "student_gguf_q8_0_fa",
           "student_gguf_q4_k_m"]
FORM_GATES = {"kl_mean_max": {"type": "number", "minimum": 0, "maximum": 20},
              "kl_p99_max": {"type": "number", "minimum": 0, "maximum": 50},
              "top1_agreement_min": {"type": "number", "minimum": 0, "maximum": 1},
              "ppl_ratio_max": {"type": "number", "minimum": 1, "maximum": 100},
              "task_retention_min": {"type": "number", "minimum": 0, "maximum": 1.5},
              "statistic": {"type": "string", "enum": ["ci_bound", "point"]}}


def form_defaults(path: Path = Path(__file__).resolve().parents[1] / "params.yaml") -> dict:
    """The form's defaults, read from params.yaml at parse time (PyYAML only, no costopt import), so the
    file is the one source of truth: editing it changes what the next run's form shows and sends. Any
    variant defined under quantize.definitions is offered next to the presets."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        quantize, gates = raw.get("quantize") or {}, (raw.get("validate") or {}).get("gates") or {}
        return {"model": (raw.get("ingest") or {})["model"], "variants": list(quantize["variants"]),
                "definitions": sorted(quantize.get("definitions") or {}),
                "gates": {k: v for k, v in gates.items() if k in FORM_GATES},
                "search": bool((raw.get("search") or {})["enabled"]),
                "distill": bool((raw.get("distill") or {}).get("enabled", True)),
                "price": (raw.get("cost") or {})["price_per_hour_usd"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: cannot read the form's defaults ({type(exc).__name__}: {exc}); expected "
                         f"ingest.model, quantize.variants, validate.gates, search.enabled and "
                         f"cost.price_per_hour_usd") from exc


DEFAULTS = form_defaults()
VARIANTS = PRESETS + [n for n in DEFAULTS["definitions"] if n not in PRESETS]


# Tasks that talk to the S3 remote retry transient faults with back-off: 20 s, 40 s, 80 s, 160 s.
STORAGE_RETRIES = {"retries": 4, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": 2.0,
                   "max_retry_delay": timedelta(minutes=5)}


def _run(phase_module: str, phase: str, *args):
    """Call tasks.<module>.<phase>(params, ws, *args) for this run's form; returns its small JSON result."""
    import importlib

    from airflow.sdk.exceptions import AirflowFailException

    from costopt.storage.s3 import TransientStorageError
    from tasks.cli import USER_ERRORS, phase_timer
    from tasks.dagparams import resolve_run

    try:
        context = get_current_context()
        first = phase == "preflight"  # it freezes the run's settings; the others read the frozen copy
        params, ws = resolve_run(context["params"], context["run_id"], first)
        extra = {"run_id": context["run_id"]} if first else {}
        with phase_timer(ws, "-".join([phase, *map(str, args)])):
            return getattr(importlib.import_module(f"tasks.{phase_module}"), phase)(params, ws, *args, **extra)
    except TransientStorageError:  # a timeout, 5xx or lost connection: Airflow retries (STORAGE_RETRIES)
        raise
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
        "model": Param(DEFAULTS["model"], type="string", minLength=1,
                       description="builtin:<name>, a local model folder, or a Hugging Face id in the local cache"),
        "variants": Param(DEFAULTS["variants"], type="array", minItems=1, uniqueItems=True,
                          items={"type": "string", "enum": VARIANTS},
                          description="named variants to build, benchmark and validate: the presets and every "
                                      "name under params.yaml's quantize.definitions"),
        "gates": Param(DEFAULTS["gates"], type="object", properties=FORM_GATES, additionalProperties=False,
                       description="quality gates against fp32; ci_bound: the 95% CI's pessimistic end must pass"),
        "distill": Param(DEFAULTS["distill"], type="boolean",
                         description="distill a student (at most half the teacher's size) from the model; the "
                                     "student* variants are made from it"),
        "mixed_precision_search": Param(DEFAULTS["search"], type="boolean",
                                        description="run the sensitivity scan and search mixed precision"),
        "price_per_hour_usd": Param(DEFAULTS["price"], type="number", exclusiveMinimum=0, maximum=10000,
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
    def reference():
        return _run("reference", "reference")

    @task
    def sensitivity():
        return _run("sensitivity", "sensitivity")

    @task
    def distill():
        return _run("distill", "distill")

    @task
    def calibration_curve():
        return _run("calibcurve", "calibration_curve")

    @task
    def plan() -> list[str]:
        return _run("preflight", "variant_names")

    @task(map_index_template="{{ variant }}")
    def quantize(name: str) -> str:
        get_current_context()["variant"] = name  # labels the mapped instance in the UI
        _run("quantize", "quantize_variant", name)
        return name

    @task(map_index_template="{{ variant }}")
    def benchmark_variant(name: str) -> str:
        get_current_context()["variant"] = name  # labels the mapped instance in the UI
        _run("benchmark", "benchmark_variant", name)
        return name

    @task(map_index_template="{{ variant }}")
    def validate(name: str) -> str:
        get_current_context()["variant"] = name  # labels the mapped instance in the UI
        _run("validate", "validate_variant", name)
        return name

    @task
    def search():
        return _run("search", "search")

    @task
    def route():
        return _run("route", "route")

    @task(**STORAGE_RETRIES)  # pulls missing weights from the remote
    def deploy():
        return _run("deploy", "deploy")

    @task
    def report():
        return _run("report", "report")

    @task(**STORAGE_RETRIES)
    def version():
        return _run("version", "version")

    data = evaldata()
    preflight() >> ingest() >> data
    ready = [benchmark(), reference()]
    data >> ready
    names = plan()
    distilled = distill()
    ready >> distilled >> names  # the student* variants are made from the student
    checked = validate.expand(name=benchmark_variant.expand(name=quantize.expand(name=names)))
    side = [sensitivity(), calibration_curve()]
    checked >> side[1]  # its point at calibrate.samples is the variant quantize built
    data >> side[0]
    found = search()
    [checked, *side] >> found
    found >> route() >> deploy() >> report() >> version()


optimize_model()
