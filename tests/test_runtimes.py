"""The runtime registry: definitions split into weights x runtime, configs checked, old specs read.

Pure logic, no runtime installed needed (llama.cpp's own tests are in tests/test_llamacpp.py).
"""
from __future__ import annotations

import dataclasses

import pytest

from costopt.models.variants import VariantSpec
from costopt.params import ParamsError, QuantizeParams
from costopt.quantization.schemes import PRESETS as SCHEME_PRESETS, SchemeError
from costopt.runtimes import registry
from costopt.runtimes.registry import RuntimeConfigError, spec_runtime, variant_definition


def test_a_scheme_alone_runs_on_torch_eager():
    d = variant_definition({"scheme": "int8_weight_only"})
    assert d.runtime.name == "torch", "no runtime means the torch engine"
    assert d.scheme == {"scheme": "int8_weight_only"}, "the scheme's fields pass through untouched"
    assert d.runtime_record() == {"name": "torch", "config": {"version": 1, "compile": False}}


def test_runtime_fields_are_split_from_the_scheme():
    d = variant_definition({"scheme": "int4_weight_only", "method": "gptq", "group_size": 64,
                            "runtime": "torch", "compile": True})
    assert d.scheme == {"scheme": "int4_weight_only", "method": "gptq", "group_size": 64}, d.scheme
    assert d.runtime_config.compile is True, "compile belongs to the runtime"


def test_llamacpp_definition_needs_no_scheme():
    d = variant_definition({"runtime": "llamacpp", "qtype": "Q4_K_M"})
    assert d.scheme is None and d.runtime.name == "llamacpp", "llama.cpp quantizes the fp32 weights itself"
    assert d.runtime.precision(d.runtime_config) == "q4_k_m", "the precision label is llama.cpp's type"


@pytest.mark.parametrize("data,needle", [
    ({"runtime": "tensorrt", "scheme": "bf16"}, "unknown runtime 'tensorrt'"),
    ({"runtime": "llamacpp", "qtype": "Q3_K"}, "llamacpp.qtype"),
    ({"runtime": "llamacpp", "qtype": "Q8_0", "scheme": "int8_weight_only"}, "not supported"),
    ({"runtime": "torch"}, "expected a 'scheme'"),
    ({"scheme": "bf16", "compile": "yes"}, "torch.compile"),
    ({"runtime": 3, "scheme": "bf16"}, "expected a runtime name"),
])
def test_bad_runtime_definitions_name_the_field(data, needle):
    with pytest.raises(RuntimeConfigError) as err:
        variant_definition(data)
    assert needle in str(err.value), f"error {err.value!r} should mention {needle!r}"


def test_bad_scheme_fields_still_raise_scheme_errors():
    with pytest.raises(SchemeError, match="group_size"):
        variant_definition({"scheme": "int4_weight_only", "group_size": 7})


def test_every_runtime_config_round_trips():
    for name, rt in registry.RUNTIMES.items() or []:
        cfg = registry.runtime_config(name, {})
        again = registry.runtime_config(name, {k: v for k, v in cfg.to_dict().items() if k != "version"})
        assert again == cfg, f"{name}: config must round-trip through its dict form"
    assert {"torch", "llamacpp"} <= set(registry.RUNTIMES), "both built-in runtimes are registered"


def test_specs_without_a_runtime_read_as_torch():
    spec = VariantSpec(name="v", base_model="m", base_fingerprint="f", precision="int8")
    rt, cfg = spec_runtime(spec)
    assert rt.name == "torch" and cfg.compile is False, "specs written before runtimes existed stay torch, eager"
    spec = dataclasses.replace(spec, runtime={"name": "llamacpp", "config": {"version": 1, "qtype": "Q6_K"}})
    rt, cfg = spec_runtime(spec)
    assert (rt.name, cfg.qtype) == ("llamacpp", "Q6_K"), "the recorded runtime and config come back"
    assert VariantSpec.from_dict(spec.to_dict()) == spec, "the spec round-trips with its runtime"


def test_params_know_the_runtime_presets_and_definitions():
    presets = QuantizeParams.presets()
    assert set(SCHEME_PRESETS) < set(presets), "scheme presets stay"
    assert presets["gguf_q4_k_m"] == {"runtime": "llamacpp", "qtype": "Q4_K_M"}, presets.get("gguf_q4_k_m")
    q = QuantizeParams(variants=("gguf_q8_0", "mine"), definitions={"mine": {"runtime": "llamacpp", "qtype": "Q6_K"}})
    q.check("quantize")
    assert q.config("mine") == {"runtime": "llamacpp", "qtype": "Q6_K"}
    bad = QuantizeParams(variants=("mine",), definitions={"mine": {"runtime": "llamacpp", "qtype": "Q2"}})
    with pytest.raises(ParamsError, match=r"quantize.definitions.mine: llamacpp.qtype"):
        bad.check("quantize")


def test_a_runtime_that_cannot_run_rules_out_its_candidate_only(tmp_path, monkeypatch):
    """Not installed -> quantize records the reason, benchmark and validate skip it, nothing half-written."""
    from costopt.models.variants import read_failure
    from costopt.params import load_params
    from costopt.storage.layout import Workspace
    from tasks.benchmark import benchmark_variant
    from tasks.quantize import quantize_variant
    from tasks.validate import validate_variant

    rt = registry.RUNTIMES["llamacpp"]
    monkeypatch.setitem(registry.RUNTIMES, "llamacpp",
                        dataclasses.replace(rt, available=lambda: "llama-cpp-python is not installed (test)"))
    params = load_params("params.yaml", profile="quick", overrides={"quantize": {"variants": ["gguf_q8_0"]}})
    ws = Workspace(tmp_path)
    out = quantize_variant(params, ws, "gguf_q8_0")
    assert out["phase"] == "quantize" and "not installed (test)" in out["reason"], out
    assert read_failure(ws, "gguf_q8_0") == out, "the failure is recorded for the later phases"
    assert not ws.variant_dir("gguf_q8_0").exists(), "no half-written variant folder is left behind"
    assert not list(ws.variants_dir.glob(".*staging*")), "no staging folder is left behind"
    assert "ruled out by quantize" in benchmark_variant(params, ws, "gguf_q8_0")["skipped"]
    assert "ruled out by quantize" in validate_variant(params, ws, "gguf_q8_0")["skipped"]
