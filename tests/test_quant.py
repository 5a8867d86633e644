"""Quantization schemes: configs round-trip, transforms stay close to fp32, artifacts reload exactly."""
import copy
from pathlib import Path

import pytest
import torch

from costopt.kernels import int8_gemm, native_available
from costopt.metrics import token_kl
from costopt.quant import (SCHEMES, Int8Linear, SchemeError, config_from_dict, load_variant, quantize,
                           quantize_per_channel, save_variant)

# Mean KL (nats/token) each scheme may add on a tiny random model; quantize_dynamic has no bound.
KL_BOUND = {"bf16": 1e-3, "int8_weight_only": 1e-3}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_config_round_trips(name):
    cfg = config_from_dict({"scheme": name})
    assert config_from_dict(cfg.to_dict()) == cfg, f"{name}: to_dict -> from_dict must give the same config"
    assert cfg.to_dict()["version"] >= 1, "every config carries a format version"


def test_unknown_scheme_and_field_are_named():
    with pytest.raises(SchemeError, match="int3"):
        config_from_dict({"scheme": "int3"})
    with pytest.raises(SchemeError, match="group_size"):
        config_from_dict({"scheme": "int8_weight_only", "group_size": 7})


@pytest.mark.parametrize("M", [1, 3, 5, 16, 40, 48, 64])
def test_int8_gemm_matches_dequantized_reference(M):
    torch.manual_seed(M)
    w = torch.randn(72, 200)
    q, s = quantize_per_channel(w)
    x = torch.randn(M, 200)
    ref = x @ (q.float() * s[:, None]).T
    got = int8_gemm(x, q, s)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-4), f"M={M}: max err {(got - ref).abs().max()}"


def test_native_kernel_builds_here():
    assert native_available(), "the AVX2 INT8 kernel must compile on the reference machine"


def test_per_channel_int8_error_is_bounded():
    w = torch.randn(64, 128)
    q, s = quantize_per_channel(w)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all(), "round-to-nearest error is at most half a step per row"


@pytest.mark.parametrize("name", sorted(KL_BOUND))
def test_schemes_stay_close_to_fp32(tiny_llama, name):
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        out = quantize(copy.deepcopy(tiny_llama), config_from_dict({"scheme": name}))(ids).logits.float()
    kl = token_kl(ref, out).mean().item()
    assert kl < KL_BOUND[name], f"{name}: mean KL {kl} above {KL_BOUND[name]}"


def test_int8_replaces_every_linear_and_ties_the_head(tiny_llama):
    model = quantize(tiny_llama, config_from_dict({"scheme": "int8_weight_only"}))
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert not plain, f"Linear layers left in fp32: {plain}"
    assert isinstance(model.lm_head, Int8Linear), "the LM head runs on the int8 kernel"
    assert model.lm_head.weight_int8 is model.get_input_embeddings().weight_int8, "tied head shares one tensor"


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_saved_variant_reloads_to_identical_logits(tiny_llama, tmp_path, name):
    base_dir = tmp_path / "base"
    tiny_llama.save_pretrained(base_dir)
    cfg = config_from_dict({"scheme": name})
    model = quantize(copy.deepcopy(tiny_llama), cfg)
    size = save_variant(model, cfg, tmp_path / "variant")
    assert size == (tmp_path / "variant" / "model.safetensors").stat().st_size, "size is the artifact's size"
    again = load_variant(tmp_path / "variant", base_dir, cfg)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.equal(a, b), f"{name}: reloaded variant must give bit-identical logits"


def test_int8_artifact_is_a_quarter_of_fp32(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "fp32")
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    cfg = config_from_dict({"scheme": "int8_weight_only"})
    size = save_variant(quantize(tiny_llama, cfg), cfg, tmp_path / "int8")
    assert size < 0.3 * fp32, f"int8 artifact {size} B should be about 1/4 of fp32 {fp32} B"
