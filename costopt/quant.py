"""Quantization schemes behind one entry point: `quantize(model, config)`.

Each scheme is a versioned config dataclass plus one registered `Scheme` that pairs an offline pass
(fp32 model -> quantized model) with a save/load of its artifact, in the manner of torchao's
`quantize_(model, config)` and gpt-fast's handlers. Adding a scheme touches this file and its test.

Schemes in this slice:
- `bf16`: every weight and activation in bfloat16.
- `int8_weight_only`: symmetric per-output-channel INT8 weights (embedding and tied LM head too),
  fp32 activations. Small batches run on a native INT8 kernel (`costopt.kernels`) that reads the int8
  weights and widens them in registers, so batch-1 decode moves 4x fewer weight bytes; the module
  docstring there says why the stock kernels were not enough.
- `dynamic_qint8_naive`: the seed paper's one-liner,
  `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`, kept so users see
  why gates exist (per-tensor weight scales wreck this model).

    cfg = config_from_dict({"scheme": "int8_weight_only"})
    qmodel = quantize(model, cfg)
    save_variant(qmodel, cfg, folder); model = load_variant(folder, base_dir)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from costopt.kernels import int8_gemm

BF16_NATIVE_ROWS = 16  # bf16 GEMM has no FMA on AVX2: past a few rows, widening to fp32 is faster

WEIGHTS = "model.safetensors"


class SchemeError(ValueError):
    """Unknown scheme name, or a config that does not fit the scheme."""


@dataclass(frozen=True)
class SchemeConfig:
    """Base of every scheme config: the registry name and a format version."""
    version: int = 1  # bump when the artifact format changes

    scheme = "base"

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Bf16Config(SchemeConfig):
    scheme = "bf16"


@dataclass(frozen=True)
class Int8WeightOnlyConfig(SchemeConfig):
    include_embedding: bool = True  # the tied embedding/LM head is 21% of this model's weights

    scheme = "int8_weight_only"


@dataclass(frozen=True)
class DynamicQint8NaiveConfig(SchemeConfig):
    scheme = "dynamic_qint8_naive"


# ---------------------------------------------------------------------------------------------
# INT8 weight-only modules


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: w [out, in] fp32 -> (int8 [out, in], scale [out] fp32)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.float()


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale).T + b with fp32 activations, on the native INT8 kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight_int8, mod.scale = quantize_per_channel(linear.weight.detach().float())
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [..., in]
        y = int8_gemm(x.reshape(-1, self.in_features).float(), self.weight_int8, self.scale)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., out]
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Embedding(nn.Module):
    """Row lookup into per-row INT8 embeddings; shares its tensors with a tied Int8Linear head."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(num, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).float()  # [..., dim]
        return rows * F.embedding(ids, self.scale[:, None])


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: set[str]) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, make(child))


def _int8_weight_only(model: nn.Module, cfg: Int8WeightOnlyConfig) -> nn.Module:
    tied = _tied_head(model)
    _swap_linears(model, Int8Linear.from_linear, skip={"lm_head"} if tied else set())
    if cfg.include_embedding:
        emb = model.get_input_embeddings()
        qemb = Int8Embedding(emb.num_embeddings, emb.embedding_dim)
        qemb.weight_int8, qemb.scale = quantize_per_channel(emb.weight.detach().float())
        model.set_input_embeddings(qemb)
        if tied:
            head = Int8Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
            head.weight_int8, head.scale = qemb.weight_int8, qemb.scale  # one tensor, two uses
            model.lm_head = head
    elif tied:
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.config.tie_word_embeddings = False  # the tie is now ours, not transformers'
    return model


def _tied_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    return isinstance(head, nn.Linear) and head.weight is getattr(emb, "weight", None)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Scheme:
    name: str
    config_cls: type
    precision: str  # the label in reports: the narrowest weight format
    apply: Callable[[nn.Module, Any], nn.Module]
    fast_kernel: bool  # False: quality-only here, no kernel makes it faster on this CPU


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise SchemeError(f"scheme {scheme.name!r} is registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


class Bf16Linear(nn.Linear):
    """A bf16 Linear that picks its kernel by batch size, with bf16 semantics either way.

    Small batches (decode) run the native bf16 GEMM, which reads half the bytes of fp32. Large batches
    (prefill, teacher-forced evaluation) are compute-bound, and this AVX2 CPU has no bf16 FMA, so the
    native bf16 GEMM is 6x slower than fp32 there (measured). For them we widen the bf16 inputs to fp32,
    multiply with fp32 accumulation and round the result to bf16: every product of two bf16 numbers is
    exact in fp32, so this equals a bf16 GEMM with fp32 accumulation up to summation order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= BF16_NATIVE_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)


def _to_bf16_linear(linear: nn.Linear) -> Bf16Linear:
    mod = Bf16Linear.__new__(Bf16Linear)
    nn.Module.__init__(mod)
    mod.in_features, mod.out_features = linear.in_features, linear.out_features
    mod.weight, mod.bias = linear.weight, linear.bias  # same Parameters: ties survive the swap
    return mod


def _bf16(model: nn.Module, cfg: Bf16Config) -> nn.Module:
    model = model.to(torch.bfloat16)
    _swap_linears(model, _to_bf16_linear, skip=set())
    _reinit_buffers(model, model.config)  # rotary frequencies stay fp32, as a freshly loaded model has them
    return model


register(Scheme("bf16", Bf16Config, "bf16", _bf16, True))
register(Scheme("int8_weight_only", Int8WeightOnlyConfig, "int8", _int8_weight_only, True))
register(Scheme(
    "dynamic_qint8_naive", DynamicQint8NaiveConfig, "int8",
    lambda m, c: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8), True))


def config_from_dict(data: dict[str, Any]) -> SchemeConfig:
    """Build a scheme config from its dict form; unknown schemes or fields raise SchemeError."""
    data = dict(data)
    name = data.pop("scheme", None)
    if name not in SCHEMES:
        raise SchemeError(f"scheme: unknown scheme {name!r}; expected one of {sorted(SCHEMES)}")
    cls = SCHEMES[name].config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SchemeError(f"{name}: unknown config field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)


def quantize(model: nn.Module, config: SchemeConfig) -> nn.Module:
    """Apply `config`'s scheme to an fp32 model in place and return it (eval mode)."""
    if config.scheme not in SCHEMES:
        raise SchemeError(f"scheme: unknown scheme {config.scheme!r}; expected one of {sorted(SCHEMES)}")
    with torch.no_grad():
        return SCHEMES[config.scheme].apply(model, config).eval()


# ---------------------------------------------------------------------------------------------
# Artifacts


def save_variant(model: nn.Module, config: SchemeConfig, folder: Path) -> int:
    """Write the variant's weights as safetensors; return the artifact's size in bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = _plain_state(model)
    save_file(state, str(folder / WEIGHTS), metadata={"scheme": config.scheme})
    (folder / WEIGHTS).chmod(0o644)
    return (folder / WEIGHTS).stat().st_size


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors kept once and quantized packed params unpacked to plain tensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):  # torch.ao dynamic Linear
            w, b = packed._weight_bias()
            out[f"{name}.weight_int8"] = w.int_repr().contiguous()
            out[f"{name}.scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
            if b is not None:
                out[f"{name}.bias"] = b.detach().contiguous()
    for key, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or "_packed_params" in key or key in out:
            continue
        if tensor.is_quantized:
            continue
        ident = tensor.untyped_storage().data_ptr()
        if ident in seen and tensor.numel() > 1:
            continue  # tied: stored once, re-tied on load
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out


def load_variant(folder: Path, base_dir: Path, config: SchemeConfig) -> nn.Module:
    """Rebuild a saved variant: the base architecture, the scheme's module swap, then its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.scheme == "dynamic_qint8_naive":
        # torch.ao's packed params have no safetensors form; the transform is deterministic, so rebuild.
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
        return quantize(model, config)
    hf_config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model = quantize(model, config)
    state = load_file(str(folder / WEIGHTS))
    model.load_state_dict(state, strict=False, assign=True)
    if isinstance(config, Int8WeightOnlyConfig) and config.include_embedding and _is_int8_tied(model):
        model.lm_head.weight_int8 = model.get_input_embeddings().weight_int8
        model.lm_head.scale = model.get_input_embeddings().scale
    elif getattr(hf_config, "tie_word_embeddings", False) and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight
    _reinit_buffers(model, hf_config)
    _check_materialized(model, folder)
    return model.eval()


def _is_int8_tied(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lm_head", None), Int8Linear) and \
        isinstance(model.get_input_embeddings(), Int8Embedding)


def _reinit_buffers(model: nn.Module, hf_config: Any) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the file; rebuild them on the CPU in fp32."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return
    fresh = type(rotary)(config=hf_config)
    for name, buf in fresh.named_buffers():
        setattr(rotary, name, buf)
    if hasattr(fresh, "original_inv_freq"):
        rotary.original_inv_freq = fresh.original_inv_freq


def _check_materialized(model: nn.Module, folder: Path) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and "rotary_emb" not in n]
    if missing:
        raise SchemeError(f"{folder / WEIGHTS}: missing tensors {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}; the artifact does not match its spec")
