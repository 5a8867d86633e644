"""Quality gates on a synthetic quality table (no model): verdicts, reasons, Data Docs, bad input.

One module-scoped call gates every case at once, because importing Great Expectations takes seconds;
a second call checks that thresholds come from the params and that a re-run replaces the Data Docs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from costopt.params import Gates
from tasks.gates import GATES, METRICS, GateError, evaluate_gates, gate_table

POINT = Gates(statistic="point")  # these cases gate the estimates; CI bounds have their own test below
GOOD = {"kl_mean": 0.005, "kl_p99": 0.12, "top1_agreement": 0.967, "ppl_ratio": 1.01,
        "task_retention": 1.0, "task_accuracy": 0.52}


def variant(**values) -> dict:
    """A quality.json variant entry: GOOD metrics, overridden by `values`, each as {"value", "ci95"}."""
    merged = {**GOOD, **values}
    return {m: {"value": v, "ci95": [None, None] if v is None else [v * 0.9, v * 1.1]} for m, v in merged.items()}


def at_threshold(gates: Gates) -> dict:
    return variant(**{g.metric: getattr(gates, g.threshold) for g in GATES})


QUALITY = {
    "int8_weight_only": variant(),
    "kl_only": variant(kl_mean=2.45),
    "dynamic_qint8_naive": variant(kl_mean=2.4517, kl_p99=9.3, top1_agreement=0.38, ppl_ratio=3.2,
                                   task_retention=0.61, task_accuracy=0.31),
    "unmeasured": variant(kl_mean=None, ppl_ratio=None, task_accuracy=None),
    "at_threshold": at_threshold(POINT),
    "just_over": variant(ppl_ratio=1.0500004),
}


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quality") / "data_docs"


@pytest.fixture(scope="module")
def verdicts(docs_dir) -> dict:
    return evaluate_gates(QUALITY, POINT, docs_dir)


def test_variant_within_all_gates_passes_with_no_reasons(verdicts):
    v = verdicts["variants"]["int8_weight_only"]
    assert v["passed"] is True, f"a variant inside every threshold must pass, got {v}"
    assert v["reasons"] == [], f"a passing variant has no reasons, got {v['reasons']}"
    assert [c["metric"] for c in v["checks"]] == [g.metric for g in GATES], f"one check per gate: {v['checks']}"
    assert all(c["passed"] for c in v["checks"]), f"every check passes: {v['checks']}"


def test_kl_over_threshold_fails_naming_metric_value_and_threshold(verdicts):
    v = verdicts["variants"]["kl_only"]
    assert v["passed"] is False, f"KL 2.45 nats/token is over kl_mean_max 0.02 and must fail, got {v}"
    assert v["reasons"] == ["kl_mean = 2.45 nats/token > kl_mean_max = 0.02"], f"reason: {v['reasons']}"
    kl = v["checks"][0]
    assert kl == {"metric": "kl_mean", "value": 2.45, "threshold": 0.02, "op": "<=", "statistic": "value", "passed": False}, \
        f"the kl_mean check records value, threshold and op: {kl}"
    assert all(c["passed"] for c in v["checks"][1:]), f"only kl_mean fails: {v['checks']}"


def test_several_failing_metrics_give_several_reasons(verdicts):
    v = verdicts["variants"]["dynamic_qint8_naive"]
    assert v["passed"] is False, f"the naive variant fails every gate, got {v}"
    assert v["reasons"] == ["kl_mean = 2.4517 nats/token > kl_mean_max = 0.02",
                            "kl_p99 = 9.3 nats/token > kl_p99_max = 0.5",
                            "top1_agreement = 0.38 < top1_agreement_min = 0.93",
                            "ppl_ratio = 3.2 > ppl_ratio_max = 1.05",
                            "task_retention = 0.61 < task_retention_min = 0.97"], f"reasons: {v['reasons']}"
    assert not any(c["passed"] for c in v["checks"]), f"every check fails: {v['checks']}"


def test_unmeasured_metric_fails_as_not_measured(verdicts):
    v = verdicts["variants"]["unmeasured"]
    assert v["passed"] is False, f"a gate whose metric is None must fail, got {v}"
    assert v["reasons"] == ["kl_mean was not measured", "ppl_ratio was not measured"], \
        f"only the gated None metrics give reasons (task_accuracy has no gate): {v['reasons']}"
    by_metric = {c["metric"]: c for c in v["checks"]}
    assert by_metric["kl_mean"]["value"] is None and not by_metric["kl_mean"]["passed"], \
        f"an unmeasured check keeps value None and fails: {by_metric['kl_mean']}"
    assert by_metric["kl_p99"]["passed"], f"measured metrics are still gated normally: {by_metric['kl_p99']}"


def test_values_exactly_at_threshold_pass(verdicts):
    v = verdicts["variants"]["at_threshold"]
    assert v["passed"] is True and v["reasons"] == [], f"thresholds are inclusive (<= max, >= min), got {v}"


def test_value_just_over_threshold_prints_enough_digits(verdicts):
    v = verdicts["variants"]["just_over"]
    assert v["reasons"] == ["ppl_ratio = 1.0500004 > ppl_ratio_max = 1.05"], \
        f"a near miss must not read '1.05 > 1.05': {v['reasons']}"


def test_verdicts_are_json_and_echo_default_thresholds(verdicts):
    assert verdicts["thresholds"] == dataclasses.asdict(POINT), f"thresholds echoed: {verdicts['thresholds']}"
    assert set(verdicts["variants"]) == set(QUALITY), f"one verdict per variant: {sorted(verdicts['variants'])}"
    text = json.dumps(verdicts, allow_nan=False)
    assert json.loads(text) == verdicts, "gates.json round-trips through strict JSON"


def test_data_docs_index_written_and_shows_the_validation(verdicts, docs_dir):
    index = docs_dir / "index.html"
    assert verdicts["data_docs"] == str(index), f"data_docs points at the index: {verdicts['data_docs']}"
    assert index.is_file(), f"Data Docs index missing under {docs_dir}"
    pages = list((docs_dir / "validations").rglob("*.html"))
    assert len(pages) == 1, f"one validation page, got {pages}"
    assert str(pages[0].relative_to(docs_dir)) in index.read_text(), "the index links the validation page"
    page = pages[0].read_text()
    for name in ("kl_only", "dynamic_qint8_naive", "unmeasured"):
        assert name in page, f"the validation page names failing variant {name!r}"
    leftovers = [p.name for p in docs_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"no staging folders left beside the docs: {leftovers}"


def test_thresholds_come_from_params_and_rerun_replaces_docs(verdicts, docs_dir):
    loose = Gates(statistic="point", kl_mean_max=3.0, kl_p99_max=10.0, top1_agreement_min=0.3, ppl_ratio_max=4.0,
                  task_retention_min=0.5)
    quality = {"dynamic_qint8_naive": QUALITY["dynamic_qint8_naive"], "unmeasured": QUALITY["unmeasured"]}
    out = evaluate_gates(quality, loose, docs_dir)
    assert out["thresholds"] == dataclasses.asdict(loose), f"thresholds echoed: {out['thresholds']}"
    naive = out["variants"]["dynamic_qint8_naive"]
    assert naive["passed"] is True, f"under loose gates the naive variant passes: {naive}"
    assert [c["threshold"] for c in naive["checks"]] == [3.0, 10.0, 0.3, 4.0, 0.5], f"checks: {naive['checks']}"
    assert out["variants"]["unmeasured"]["passed"] is False, "an unmeasured metric fails whatever the threshold"
    pages = list((docs_dir / "validations").rglob("*.html"))
    assert len(pages) == 1, f"a re-run replaces the old Data Docs instead of adding to them: {pages}"


def test_gate_table_has_one_row_per_variant_and_nan_for_unmeasured():
    table = gate_table(QUALITY)
    assert list(table.columns) == ["variant", *METRICS], f"columns: {list(table.columns)}"
    assert list(table["variant"]) == list(QUALITY), f"rows: {list(table['variant'])}"
    row = table.set_index("variant").loc["unmeasured"]
    assert math.isnan(row["kl_mean"]) and row["kl_p99"] == GOOD["kl_p99"], f"None -> NaN: {row.to_dict()}"


@pytest.mark.parametrize("quality, words", [
    ({}, ["non-empty"]),
    ({"bf16": {m: v for m, v in variant().items() if m != "kl_p99"}}, ["'bf16'", "kl_p99"]),
    ({"bf16": {**variant(), "ppl_ratio": 1.01}}, ["'bf16'", "'ppl_ratio'", "'value'"]),
    ({"bf16": {**variant(), "top1_agreement": {"value": "high"}}}, ["'bf16'", "'top1_agreement'", "'high'"]),
])
def test_malformed_quality_raises_naming_variant_and_metric(quality, words, tmp_path):
    with pytest.raises(GateError) as err:
        evaluate_gates(quality, POINT, tmp_path / "data_docs")
    for word in words:
        assert word in str(err.value), f"error should mention {word}: {err.value}"
    assert list(tmp_path.iterdir()) == [], f"bad input writes nothing: {list(tmp_path.iterdir())}"


def test_ci_bound_gates_use_the_pessimistic_end_of_the_interval(tmp_path):
    """A variant whose estimate passes but whose 95% CI crosses the threshold fails under ci_bound."""
    close = variant(kl_mean=0.019, task_retention=0.975)  # CIs: kl [0.0171, 0.0209], retention [0.8775, 1.07]
    quality = {"close": close, "clear": variant(kl_mean=0.001, task_retention=1.0)}
    for metric, ci in {"task_retention": [0.98, 1.02], "top1_agreement": [0.96, 0.97], "ppl_ratio": [1.0, 1.02],
                       "kl_p99": [0.1, 0.14]}.items():
        quality["clear"][metric]["ci95"] = ci
    ci = evaluate_gates(quality, Gates(statistic="ci_bound"), tmp_path / "ci")
    point = evaluate_gates(quality, Gates(statistic="point"), tmp_path / "point")
    assert point["variants"]["close"]["passed"], "the estimates pass"
    assert not ci["variants"]["close"]["passed"], "the CI bounds do not"
    reasons = " ".join(ci["variants"]["close"]["reasons"])
    assert "kl_mean (95% CI upper bound) = 0.0209" in reasons, f"reason names the bound: {reasons}"
    assert "task_retention (95% CI lower bound) = 0.8775" in reasons, f"reason names the bound: {reasons}"
    assert ci["variants"]["clear"]["passed"], f"a clear margin passes: {ci['variants']['clear']['reasons']}"
