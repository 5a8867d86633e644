"""params.yaml validation: bad values fail early and name the field."""
from pathlib import Path

import pytest

from costopt.params import ParamsError, load_params, params_from_dict

PROJECT = Path(__file__).resolve().parents[1]


def test_project_params_load_in_both_profiles():
    full, quick = load_params(PROJECT / "params.yaml"), load_params(PROJECT / "params.yaml", profile="quick")
    assert full.evaldata.prompts >= 200, "the full profile holds at least 200 held-out prompts"
    assert full.evaldata.task_items >= 300, "the full profile holds at least 300 task items"
    assert quick.evaldata.prompts < full.evaldata.prompts, "quick profile overlays smaller sets"
    assert quick.validate.gates == full.validate.gates, "profiles never change the gates"


@pytest.mark.parametrize("section,value,field", [
    ({"validate": {"gates": {"kl_mean_max": -1}}}, None, "validate.gates.kl_mean_max"),
    ({"validate": {"gates": {"top1_agreement_min": 1.5}}}, None, "validate.gates.top1_agreement_min"),
    ({"evaldata": {"prompts": "many"}}, None, "evaldata.prompts"),
    ({"quantize": {"variants": ["int3_magic"]}}, None, "quantize.variants[0]"),
    ({"cost": {"price_per_hour_usd": 0}}, None, "cost.price_per_hour_usd"),
    ({"benchmark": {"threads": 0}}, None, "benchmark.threads"),
    ({"version": {"remote": "not-a-url"}}, None, "version.remote"),
    ({"ingest": {"colour": "blue"}}, None, "ingest"),
    ({"nonsense": {}}, None, "nonsense"),
    ({"quantize": {"definitions": {"g7": {"scheme": "int4_weight_only", "group_size": 7}}}}, None,
     "quantize.definitions.g7: int4_weight_only.group_size"),
    ({"quantize": {"definitions": {"x": {"scheme": "int4_weight_only", "method": "hqq"}}}}, None,
     "int4_weight_only.method"),
    ({"quantize": {"definitions": {"x": {"scheme": "int3"}}}}, None, "quantize.definitions.x: scheme"),
    ({"validate": {"gates": {"statistic": "median"}}}, None, "validate.gates.statistic"),
    ({"calibrate": {"samples": 0}}, None, "calibrate.samples"),
    ({"calibrate": {"source": "web"}}, None, "calibrate.source"),
    ({"search": {"precisions": ["int2"]}}, None, "search.precisions"),
    ({"search": {"group_size": 33}}, None, "search.group_size"),
    ({"cache": {"embedder_backend": "tfidf"}}, None, "cache.embedder_backend"),
    ({"cache": {"store_prompts": "no"}}, None, "cache.store_prompts"),
    ({"cache": {"max_false_hit": 0}}, None, "cache.max_false_hit"),
    ({"distill": {"intermediate_size": 100}}, None, "distill.intermediate_size"),
    ({"distill": {"hidden_layers": 20}}, None, "distill.hidden_layers"),
    ({"distill": {"steps": 0}}, None, "distill.steps"),
    ({"route": {"task_items": -1}}, None, "route.task_items"),
    ({"route": {"retention_target": 2}}, None, "route.retention_target"),
])
def test_bad_values_name_their_field(section, value, field):
    with pytest.raises(ParamsError) as err:
        params_from_dict(section)
    assert field in str(err.value), f"error must name {field!r}: {err.value}"


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("validate: {gates: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")


def test_unknown_profile_is_rejected():
    with pytest.raises(ParamsError, match="profile"):
        params_from_dict({}, profile="turbo")


def test_overrides_are_validated_like_the_file():
    p = params_from_dict({}, overrides={"validate": {"gates": {"kl_mean_max": 0.05}}})
    assert p.validate.gates.kl_mean_max == 0.05, "override applied"
    with pytest.raises(ParamsError, match="ppl_ratio_max"):
        params_from_dict({}, overrides={"validate": {"gates": {"ppl_ratio_max": 0.5}}})


def _preflight_params(**over):
    return params_from_dict(over)


def test_group_size_must_divide_the_model_widths():
    from tasks.preflight import check_group_sizes

    widths = {"hidden_size": 576, "intermediate_size": 1536}  # SmolLM2-135M: 128 does not divide 576
    ok = params_from_dict({"quantize": {"variants": ["int4_rtn_g64"]}})
    check_group_sizes(ok, widths)
    bad = params_from_dict({"quantize": {"variants": ["g128"], "definitions": {
        "g128": {"scheme": "int4_weight_only", "group_size": 128}}}})
    with pytest.raises(ParamsError, match=r"quantize.definitions.g128.group_size: 128 does not divide .*576"):
        check_group_sizes(bad, widths)
    with pytest.raises(ParamsError, match="search.group_size"):
        check_group_sizes(params_from_dict({"search": {"group_size": 128},
                                            "quantize": {"variants": ["int8_weight_only"]}}), widths)


def test_calibration_that_cannot_be_met_fails_in_preflight(tmp_path):
    from costopt.storage.layout import Workspace
    from tasks.preflight import check_calibration

    ws = Workspace(tmp_path)
    with pytest.raises(ParamsError, match="calibrate.samples: needs 300"):
        check_calibration(params_from_dict({"calibrate": {"samples": 300}}), ws)
    with pytest.raises(ParamsError, match="calibrate.source: 'logs'"):
        check_calibration(params_from_dict({"calibrate": {"source": "logs"}}), ws)


def test_cache_settings_become_the_gateway_flags():
    flags = params_from_dict({"cache": {"store_prompts": False, "ttl_s": 60}}).cache.gateway_flags()
    assert "--no_store_prompts" in flags and flags[flags.index("--ttl_s") + 1] == "60"
    assert "--no_store_prompts" not in params_from_dict({}).cache.gateway_flags(), "prompts are stored by default"
