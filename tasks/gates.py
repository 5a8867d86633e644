"""Phase 5b, quality gates: turn measured quality metrics into pass/fail verdicts with Great Expectations.

`tasks.validate` measures each variant against fp32 (quality.json) and calls `evaluate_gates` with the
"variants" mapping. We put the metrics in a table, one row per variant, and run one Great Expectations
suite over it: for each gate, "values in [-inf, max]" (or "[min, +inf]") plus "not null", because a
GE range check skips missing values and an unmeasured metric must fail. The verdict of every variant is
read back from GE's results (the failing rows are named by the `variant` column), never recomputed by
hand, and the same run renders the Data Docs site the report links to. Reasons follow docs/artifacts.md:

    kl_mean = 2.4517 nats/token > kl_mean_max = 0.02
    ppl_ratio was not measured

    from tasks.gates import evaluate_gates
    verdicts = evaluate_gates(quality["variants"], params.validate.gates, ws.root / "artifacts/quality/data_docs")

great_expectations is imported inside the functions (about 4-6 s on this machine), so importing this
module stays cheap for the DAG parser; after that a call takes about a second, mostly rendering HTML.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from costopt.storage.layout import replace_dir, staging_dir
from costopt.evaluation.sequential import GATES, Gate
from costopt.params import Gates

if TYPE_CHECKING:
    import pandas as pd

# Columns of the gate table, after `variant`; every variant in quality.json must carry all of them.
METRICS = ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "task_retention", "task_accuracy")
SITE = "quality_gates"  # the Data Docs site name, also the suite's and checkpoint's
_RANGE = "expect_column_values_to_be_between"
_NOT_NULL = "expect_column_values_to_not_be_null"


class GateError(ValueError):
    """The metrics cannot be gated: no variants, a missing or non-numeric metric, or GE failed to run a
    check. The message names the variant and the metric."""


def _metric_value(variant: str, metric: str, entry: Any, pick: str = "value") -> float:
    """`{"value": x, "ci95": [lo, hi]}` -> x, lo or hi (`pick`) as float (NaN for None); anything else is
    a GateError."""
    if not isinstance(entry, dict) or "value" not in entry:
        raise GateError(f"variant {variant!r}, metric {metric!r}: expected {{'value': float|None, 'ci95': "
                        f"[lo, hi]}}, got {entry!r}")
    value = entry["value"]
    if pick != "value" and value is not None:
        ci = entry.get("ci95")
        if not isinstance(ci, (list, tuple)) or len(ci) != 2:
            raise GateError(f"variant {variant!r}, metric {metric!r}: gates use the 95% CI bound but "
                            f"ci95 is {ci!r}; expected [lo, hi]")
        value = ci[0] if pick == "lo" else ci[1]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateError(f"variant {variant!r}, metric {metric!r}: expected a number or None, got {value!r}")
    return float(value)


def _pick(metric: str, statistic: str) -> str:
    """Which number of a metric is gated: the estimate, or the CI end on the failing side."""
    gate = next((g for g in GATES if g.metric == metric), None)
    if gate is None or statistic == "point":
        return "value"
    return "hi" if gate.op == "<=" else "lo"


def gate_table(quality_variants: dict[str, dict], statistic: str = "point") -> "pd.DataFrame":
    """quality.json's "variants" -> DataFrame [variant, *METRICS], one row per variant; NaN = not measured.

    With statistic "ci_bound" each gated column holds the pessimistic end of its 95% CI (the upper
    bound for "at most" gates, the lower bound for "at least" gates), so a variant passes only when
    the whole interval clears the threshold's side."""
    import pandas as pd

    if not isinstance(quality_variants, dict) or not quality_variants:
        raise GateError(f"quality variants: expected a non-empty mapping of variant name -> metrics, "
                        f"got {quality_variants!r}")
    rows = []
    for variant, metrics in quality_variants.items():
        if not isinstance(metrics, dict):
            raise GateError(f"variant {variant!r}: expected a mapping of metric -> {{'value', 'ci95'}}, "
                            f"got {type(metrics).__name__}")
        missing = [m for m in METRICS if m not in metrics]
        if missing:
            raise GateError(f"variant {variant!r}: missing metric(s) {missing}; quality.json must give "
                            f"every variant all of {list(METRICS)}")
        rows.append({"variant": str(variant),
                     **{m: _metric_value(variant, m, metrics[m], _pick(m, statistic)) for m in METRICS}})
    return pd.DataFrame(rows, columns=["variant", *METRICS]).astype({m: "float64" for m in METRICS})


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Keep GE's noise out of task logs while we run: on import it logs ~50 INFO lines about its docs
    registry and raises DeprecationWarnings about `sre_parse`; its own warnings and errors still show."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="great_expectations")
            yield
    finally:
        logger.setLevel(level)


def _context(site_dir: Path):
    """An in-memory GE context whose only Data Docs site is `site_dir`: no analytics, no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
    # init_temp_docs_sites=False: otherwise the ephemeral context also renders a site into a temp folder
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               data_docs_sites={SITE: site}, analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False))
    return gx.get_context(project_config=config, mode="ephemeral")


def _suite(gates: Gates):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=SITE)
    for gate in GATES:
        bound = {"max_value": gate.bound(gates)} if gate.op == "<=" else {"min_value": gate.bound(gates)}
        meta = {"gate": gate.threshold, "unit": gate.unit or "ratio"}
        notes = f"{gate.metric}: {gate.meaning}. Gate {gate.threshold} = {gate.bound(gates):g}."
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(
            column=gate.metric, **bound, meta=meta, notes=notes))
        suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(
            column=gate.metric, meta=meta, notes=f"{gate.metric} must be measured for every variant."))
    return suite


def _run_suite(table: "pd.DataFrame", gates: Gates, site_dir: Path, run_name: str):
    """Validate `table` against the gate suite in one checkpoint, rendering Data Docs into `site_dir`."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(site_dir)
    batch = (context.data_sources.add_pandas("quality").add_dataframe_asset("gate_table")
             .add_batch_definition_whole_dataframe("all_variants"))
    suite = context.suites.add(_suite(gates))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=SITE, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=SITE, validation_definitions=[validation],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[SITE])],
        # COMPLETE + the variant column: every failing row comes back named, not just the first 20 values
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["variant"]}))
    result = checkpoint.run(batch_parameters={"dataframe": table}, run_id=RunIdentifier(run_name=run_name))
    (suite_result,) = result.run_results.values()
    return suite_result


def _failing_variants(suite_result) -> dict[tuple[str, str], set[str]]:
    """(expectation type, column) -> names of the variants GE flagged; GateError if a check did not run."""
    failing: dict[tuple[str, str], set[str]] = {}
    for res in suite_result.results:
        config = res.expectation_config
        key = (config.type, config.kwargs["column"])
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise GateError(f"Great Expectations could not evaluate {key[0]} on {key[1]!r}: "
                            f"{res.exception_info.get('exception_message')}")
        rows = res.result.get("unexpected_index_list") or []
        failing[key] = {row["variant"] for row in rows}
        if not res.success and not failing[key]:
            raise GateError(f"{key[0]} on {key[1]!r} failed but named no variant; result: {res.result}")
    expected = {(t, g.metric) for g in GATES for t in (_RANGE, _NOT_NULL)}
    if set(failing) != expected:
        raise GateError(f"Great Expectations returned checks {sorted(failing)}, expected {sorted(expected)}")
    return failing


def _fmt(value: float, other: float) -> str:
    """Short form of `value`, with more digits where the short forms of value and threshold would tie."""
    short = f"{value:.5g}"
    return short if short != f"{other:.5g}" else f"{value:.12g}"


def _check(gate: Gate, variant: str, value: float, failing: dict, gates: Gates) -> tuple[dict, str | None]:
    """One gate for one variant: its gates.json check and, if it failed, the reason."""
    bound = gate.bound(gates)
    measured = variant not in failing[(_NOT_NULL, gate.metric)]
    within = variant not in failing[(_RANGE, gate.metric)]
    check = {"metric": gate.metric, "value": value if measured else None, "threshold": bound,
             "op": gate.op, "statistic": _pick(gate.metric, gates.statistic), "passed": measured and within}
    if not measured:
        return check, f"{gate.metric} was not measured"
    if within:
        return check, None
    unit = f" {gate.unit}" if gate.unit else ""
    broken = ">" if gate.op == "<=" else "<"
    which = "" if gates.statistic == "point" else (" (95% CI upper bound)" if gate.op == "<=" else
                                                   " (95% CI lower bound)")
    return check, f"{gate.metric}{which} = {_fmt(value, bound)}{unit} {broken} {gate.threshold} = {bound:g}"


def evaluate_gates(quality_variants: dict[str, dict], gates: Gates, docs_dir: Path, *,
                   run_name: str = SITE) -> dict[str, Any]:
    """Gate every variant of quality.json's "variants" with one GE suite; return gates.json's structure.

    The Data Docs site is built in a staging folder and swapped into `docs_dir` only when complete, so a
    re-run replaces the previous pages instead of piling up old validations. `run_name` labels the run in
    Data Docs (e.g. the Airflow run id). Raises GateError for malformed input or a check GE could not run.
    """
    table = gate_table(quality_variants, gates.statistic)
    docs_dir = Path(docs_dir)
    stage = staging_dir(docs_dir)
    try:
        with _quiet_gx():
            suite_result = _run_suite(table, gates, stage.resolve(), run_name)
        failing = _failing_variants(suite_result)
        if not (stage / "index.html").is_file():
            raise GateError(f"Great Expectations built no Data Docs index under {stage}")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, docs_dir)
    variants = {}
    for row in table.itertuples(index=False):
        checks, reasons = [], []
        for gate in GATES:
            check, reason = _check(gate, row.variant, float(getattr(row, gate.metric)), failing, gates)
            checks.append(check)
            reasons += [reason] if reason else []
        variants[row.variant] = {"passed": all(c["passed"] for c in checks), "reasons": reasons, "checks": checks}
    return {"thresholds": dataclasses.asdict(gates), "variants": variants,
            "data_docs": str(docs_dir / "index.html")}
