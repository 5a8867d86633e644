"""Quantization schemes behind one entry point: `quantize(model, config, calibration)`.

Each scheme is a versioned config dataclass plus one registered `Scheme` that pairs an offline pass
(fp32 model -> quantized model) with a save/load of its artifact, in the manner of torchao's
`quantize_(model, config)` and gpt-fast's handlers. Adding a scheme touches this file and its test.
Named presets (`PRESETS`) are the variants users pick by name; `quantize.definitions` in params.yaml
adds more.

Schemes:
- `fp32`: the weights as they are (the identity), so a base other than the ingested model, such as
  the distilled student, is a variant like any other.
- `bf16`: every weight and activation in bfloat16.
- `int8_weight_only`: symmetric per-output-channel INT8 weights (embedding and tied LM head too), fp32
  activations, on the native INT8 kernel (`costopt.kernels.ops`).
- `int8_dynamic`: W8A8: INT8 weights per output channel, activations quantized per token at run time,
  int32 accumulation (the LM head stays INT8 weight-only).
- `int8_static`: W8A8 with one calibrated activation scale per Linear (min/max observer over the
  calibration set), and a SmoothQuant scale migration chosen per layer where it lowers the output
  error on calibration data.
- `int4_weight_only`: grouped INT4 weights (asymmetric, one scale and zero per group), fp32
  activations; `method` = `rtn` (round to nearest, the reference), `gptq` or `awq` (calibrated). The
  tied embedding/LM head is INT8 (or fp32), never INT4.
- `mixed`: a precision per block part (attention or MLP of each layer: int4, int8 or fp32), the
  output of the sensitivity-driven search (`costopt.search.frontier`).
- `dynamic_qint8_naive`: the seed paper's one-liner,
  `torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`, kept so users see
  why gates exist (per-tensor weight scales wreck this model).

    cfg = config_from_dict({"scheme": "int4_weight_only", "method": "gptq", "group_size": 64})
    qmodel = quantize(model, cfg, Calibration(batches))
    save_variant(qmodel, cfg, folder); model = load_variant(folder, base_dir, cfg)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from costopt.quantization.modules import (Bf16Linear, Int4Linear, Int8Embedding, Int8Linear, W8A8Linear,
                                          quantize_per_channel, set_module)

WEIGHTS = "model.safetensors"
PRECISIONS = ("int4", "int8", "fp32")  # per-part choices of the mixed scheme, cheapest first
INT4_METHODS = ("rtn", "gptq", "awq")
HEADS = ("int8", "fp32")


class SchemeError(ValueError):
    """Unknown scheme name, or a config that does not fit the scheme (the message names the field)."""


@dataclass(frozen=True)
class SchemeConfig:
    """Base of every scheme config: the registry name and a format version."""
    version: int = 1  # bump when the artifact format changes

    scheme = "base"

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **dataclasses.asdict(self)}

    def check(self) -> None:
        """Raise SchemeError naming the field when a value is out of range."""


def _choice(scheme: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SchemeError(f"{scheme}.{name}: expected one of {list(allowed)}, got {value!r}")


def _group(scheme: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise SchemeError(f"{scheme}.group_size: expected an even integer >= 2, got {value!r}")


@dataclass(frozen=True)
class Fp32Config(SchemeConfig):
    scheme = "fp32"


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


@dataclass(frozen=True)
class Int8DynamicConfig(SchemeConfig):
    scheme = "int8_dynamic"


@dataclass(frozen=True)
class Int8StaticConfig(SchemeConfig):
    smoothquant: bool = True  # try SmoothQuant migration per layer; kept only where it lowers the error
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)  # migration strengths tried (0 = none is always tried)

    scheme = "int8_static"

    def check(self) -> None:
        if not isinstance(self.smoothquant, bool):
            raise SchemeError(f"{self.scheme}.smoothquant: expected true or false, got {self.smoothquant!r}")
        if not self.alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1
                                  for a in self.alphas):
            raise SchemeError(f"{self.scheme}.alphas: expected numbers in (0, 1), got {list(self.alphas)}")


@dataclass(frozen=True)
class Int4WeightOnlyConfig(SchemeConfig):
    group_size: int = 64  # input channels per scale/zero; must divide every Linear's in_features
    method: str = "rtn"  # rtn | gptq | awq
    damp: float = 0.01  # GPTQ: Hessian dampening, as a share of its mean diagonal
    head: str = "int8"  # tied embedding/LM head: int8 or fp32 (INT4 there costs too much quality)

    scheme = "int4_weight_only"

    def check(self) -> None:
        _group(self.scheme, self.group_size)
        _choice(self.scheme, "method", self.method, INT4_METHODS)
        _choice(self.scheme, "head", self.head, HEADS)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise SchemeError(f"{self.scheme}.damp: expected a number in (0, 1], got {self.damp!r}")


@dataclass(frozen=True)
class MixedConfig(SchemeConfig):
    assign: dict[str, str] = field(default_factory=dict)  # part ("layers.3.mlp") -> int4 | int8 | fp32
    default: str = "int8"  # parts not named in `assign`
    group_size: int = 64  # INT4 parts
    method: str = "gptq"  # INT4 parts: rtn | gptq | awq
    damp: float = 0.01
    head: str = "int8"

    scheme = "mixed"

    def check(self) -> None:
        _group(self.scheme, self.group_size)
        _choice(self.scheme, "method", self.method, INT4_METHODS)
        _choice(self.scheme, "head", self.head, HEADS)
        _choice(self.scheme, "default", self.default, PRECISIONS)
        if not isinstance(self.assign, dict):
            raise SchemeError(f"{self.scheme}.assign: expected a mapping part -> precision, got {self.assign!r}")
        for part, prec in self.assign.items():
            if not re.fullmatch(r"layers\.\d+\.\w+", str(part)):
                raise SchemeError(f"{self.scheme}.assign: part {part!r}: expected 'layers.<i>.<module>'")
            _choice(self.scheme, f"assign[{part!r}]", prec, PRECISIONS)

    def precision_of(self, part: str) -> str:
        return self.assign.get(part, self.default)


@dataclass(frozen=True)
class Calibration:
    """Tokenized calibration batches (right-padded `input_ids` + `attention_mask`) and where they came from."""
    batches: list[dict[str, torch.Tensor]]
    source: str = "prompts"  # "prompts" (the project's calibration prompts) or "logs" (serving traffic)
    skip: int = 0  # leading positions left out of statistics (0: all; attention-sink tokens matter)

    @property
    def samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)


# Variants users pick by name (the DAG form and params.yaml quantize.variants). SmolLM2-135M's widths
# (576, 1536) are not multiples of 128, so the INT4 presets use groups of 64 and 32.
PRESETS: dict[str, dict[str, Any]] = {
    "bf16": {"scheme": "bf16"},
    "int8_weight_only": {"scheme": "int8_weight_only"},
    "int8_dynamic": {"scheme": "int8_dynamic"},
    "int8_static": {"scheme": "int8_static"},
    "int4_rtn_g64": {"scheme": "int4_weight_only", "method": "rtn", "group_size": 64},
    "int4_gptq_g64": {"scheme": "int4_weight_only", "method": "gptq", "group_size": 64},
    "int4_awq_g64": {"scheme": "int4_weight_only", "method": "awq", "group_size": 64},
    "int4_rtn_g32": {"scheme": "int4_weight_only", "method": "rtn", "group_size": 32},
    "int4_gptq_g32": {"scheme": "int4_weight_only", "method": "gptq", "group_size": 32},
    "dynamic_qint8_naive": {"scheme": "dynamic_qint8_naive"},
}


# ---------------------------------------------------------------------------------------------
# Layer plans: which Linear becomes what. One plan serves the transform and the artifact skeleton.


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: set[str]) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, make(child))


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks (the LM head excluded), by full module name."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and part_of(name) is not None}


def part_of(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj' -> 'layers.3.self_attn'; None outside the blocks."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.(\w+)\.", name)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def parts(model: nn.Module) -> dict[str, list[str]]:
    """Block parts (attention, MLP of each layer) -> their Linears' names, in model order."""
    out: dict[str, list[str]] = {}
    for name in block_linears(model):
        out.setdefault(part_of(name), []).append(name)
    return out


def layer_plan(model: nn.Module, cfg: SchemeConfig) -> dict[str, str]:
    """Full Linear name -> kind ("int4", "int8", "w8a8_dynamic", "w8a8_static", "fp32") for the block Linears."""
    names = block_linears(model)
    if isinstance(cfg, Int4WeightOnlyConfig):
        return {n: "int4" for n in names}
    if isinstance(cfg, Int8DynamicConfig):
        return {n: "w8a8_dynamic" for n in names}
    if isinstance(cfg, Int8StaticConfig):
        return {n: "w8a8_static" for n in names}
    if isinstance(cfg, MixedConfig):
        return {n: cfg.precision_of(part_of(n)) for n in names}
    raise SchemeError(f"{cfg.scheme}: has no layer plan")


def check_group_size(model: nn.Module, cfg: SchemeConfig, where: str = "") -> None:
    """Raise SchemeError when an INT4 group size does not divide a planned Linear's input width."""
    if not isinstance(cfg, (Int4WeightOnlyConfig, MixedConfig)):
        return
    widths = sorted({mod.in_features for name, mod in block_linears(model).items()
                     if layer_plan(model, cfg)[name] == "int4"})
    bad = [w for w in widths if w % cfg.group_size]
    if bad:
        ok = [g for g in (16, 32, 64, 96, 128, 192, 256) if all(w % g == 0 for w in widths)]
        raise SchemeError(f"{where or cfg.scheme}.group_size: {cfg.group_size} does not divide the layer "
                          f"width(s) {bad}; group sizes that fit this model: {ok}")


def _skeleton(model: nn.Module, cfg: SchemeConfig) -> nn.Module:
    """The scheme's module layout with empty buffers, for loading an artifact into."""
    plan = layer_plan(model, cfg)
    group = getattr(cfg, "group_size", 0)
    make = {
        "int4": lambda lin: Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, group),
        "int8": Int8Linear.from_linear,
        "w8a8_dynamic": lambda lin: W8A8Linear(lin.in_features, lin.out_features, lin.bias is not None),
        "w8a8_static": lambda lin: W8A8Linear(lin.in_features, lin.out_features, lin.bias is not None),
    }
    for name, kind in plan.items():
        if kind != "fp32":
            set_module(model, name, make[kind](model.get_submodule(name)))
    return _quantize_head(model, getattr(cfg, "head", "int8"))


# ---------------------------------------------------------------------------------------------
# Transforms


def _quantize_head(model: nn.Module, head: str) -> nn.Module:
    """INT8 per-row embedding and (tied) LM head, one shared tensor; `head='fp32'` leaves them."""
    tied = _tied_head(model)
    if head == "fp32":
        return model
    emb = model.get_input_embeddings()
    qemb = Int8Embedding(emb.num_embeddings, emb.embedding_dim)
    qemb.weight_int8, qemb.scale = quantize_per_channel(emb.weight.detach().float())
    model.set_input_embeddings(qemb)
    if tied:
        lm = Int8Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
        lm.weight_int8, lm.scale = qemb.weight_int8, qemb.scale  # one tensor, two uses
        model.lm_head = lm
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.config.tie_word_embeddings = False  # the tie is now ours, not transformers'
    return model


def _int8_weight_only(model: nn.Module, cfg: Int8WeightOnlyConfig, calib: Calibration | None) -> nn.Module:
    tied = _tied_head(model)
    _swap_linears(model, Int8Linear.from_linear, skip={"lm_head"} if tied else set())
    if cfg.include_embedding:
        return _quantize_head(model, "int8")
    if tied:
        model.lm_head = Int8Linear.from_linear(model.lm_head)
        model.config.tie_word_embeddings = False
    return model


def _tied_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    return isinstance(head, nn.Linear) and head.weight is getattr(emb, "weight", None)


def _int8_dynamic(model: nn.Module, cfg: Int8DynamicConfig, calib: Calibration | None) -> nn.Module:
    for name, lin in block_linears(model).items():
        set_module(model, name, W8A8Linear.from_linear(lin))
    return _quantize_head(model, "int8")


def _calibrated(model: nn.Module, cfg: SchemeConfig, calib: Calibration | None) -> nn.Module:
    from costopt.quantization.calibrated import apply_plan  # torch-heavy algorithms, loaded when needed

    check_group_size(model, cfg)
    plan = layer_plan(model, cfg)
    needs = any(k == "w8a8_static" for k in plan.values()) or \
        (getattr(cfg, "method", "rtn") != "rtn" and "int4" in plan.values())
    if needs and (calib is None or not calib.batches):
        raise SchemeError(f"{cfg.scheme}: needs a calibration set (method {getattr(cfg, 'method', 'static')!r}); "
                          "got none or an empty one")
    apply_plan(model, plan, cfg, calib)
    return _quantize_head(model, getattr(cfg, "head", "int8"))


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Scheme:
    name: str
    config_cls: type
    precision: str  # the label in reports: the narrowest weight format
    apply: Callable[[nn.Module, Any, Calibration | None], nn.Module]
    fast_kernel: bool  # False: quality-only here, no kernel makes it faster on this CPU
    skeleton: Callable[[nn.Module, Any], nn.Module] | None = None  # layout to load an artifact into
    calibrated: Callable[[Any], bool] = lambda cfg: False  # does this config read calibration data?


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise SchemeError(f"scheme {scheme.name!r} is registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


def _to_bf16_linear(linear: nn.Linear) -> Bf16Linear:
    mod = Bf16Linear.__new__(Bf16Linear)
    nn.Module.__init__(mod)
    mod.in_features, mod.out_features = linear.in_features, linear.out_features
    mod.weight, mod.bias = linear.weight, linear.bias  # same Parameters: ties survive the swap
    return mod


def _bf16(model: nn.Module, cfg: Bf16Config, calib: Calibration | None) -> nn.Module:
    model = model.to(torch.bfloat16)
    _swap_linears(model, _to_bf16_linear, skip=set())
    _reinit_buffers(model, model.config)  # rotary frequencies stay fp32, as a freshly loaded model has them
    return model


def _identity(model: nn.Module, cfg: Fp32Config, calib: Calibration | None) -> nn.Module:
    return model


def _naive(model: nn.Module, cfg: DynamicQint8NaiveConfig, calib: Calibration | None) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


register(Scheme("fp32", Fp32Config, "fp32", _identity, True))
register(Scheme("bf16", Bf16Config, "bf16", _bf16, True))
register(Scheme("int8_weight_only", Int8WeightOnlyConfig, "int8", _int8_weight_only, True))
register(Scheme("int8_dynamic", Int8DynamicConfig, "int8", _int8_dynamic, True, skeleton=_skeleton))
register(Scheme("int8_static", Int8StaticConfig, "int8", _calibrated, True, skeleton=_skeleton,
                calibrated=lambda cfg: True))
register(Scheme("int4_weight_only", Int4WeightOnlyConfig, "int4", _calibrated, True, skeleton=_skeleton,
                calibrated=lambda cfg: cfg.method != "rtn"))
register(Scheme("mixed", MixedConfig, "mixed", _calibrated, True, skeleton=_skeleton,
                calibrated=lambda cfg: cfg.method != "rtn" and "int4" in {cfg.default, *cfg.assign.values()}))
register(Scheme("dynamic_qint8_naive", DynamicQint8NaiveConfig, "int8", _naive, True))


def config_from_dict(data: dict[str, Any]) -> SchemeConfig:
    """Build and check a scheme config from its dict form; bad schemes or fields raise SchemeError."""
    data = dict(data)
    name = data.pop("scheme", None)
    if name not in SCHEMES:
        raise SchemeError(f"scheme: unknown scheme {name!r}; expected one of {sorted(SCHEMES)}")
    cls = SCHEMES[name].config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SchemeError(f"{name}: unknown config field(s) {unknown}; expected some of {sorted(known)}")
    if isinstance(data.get("alphas"), list):
        data["alphas"] = tuple(data["alphas"])  # JSON has no tuples
    cfg = cls(**data)
    cfg.check()
    return cfg


def preset(name: str) -> SchemeConfig:
    """The config of a named preset (`PRESETS`)."""
    if name not in PRESETS:
        raise SchemeError(f"variant {name!r}: not a preset; expected one of {sorted(PRESETS)}")
    return config_from_dict(PRESETS[name])


def quantize(model: nn.Module, config: SchemeConfig, calibration: Calibration | None = None) -> nn.Module:
    """Apply `config`'s scheme to an fp32 model in place and return it (eval mode).

    Calibrated schemes (GPTQ, AWQ, static INT8) read `calibration`; they raise SchemeError without one.
    """
    if config.scheme not in SCHEMES:
        raise SchemeError(f"scheme: unknown scheme {config.scheme!r}; expected one of {sorted(SCHEMES)}")
    with torch.no_grad():
        return SCHEMES[config.scheme].apply(model, config, calibration).eval()


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
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True,
                                                     use_safetensors=True)
        return quantize(model, config)
    hf_config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    scheme = SCHEMES[config.scheme]
    with torch.no_grad():
        model = scheme.skeleton(model, config) if scheme.skeleton else quantize(model, config)
    state = load_file(str(folder / WEIGHTS))
    model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, (Int4Linear, W8A8Linear)):
            module.finalize()  # derive run-time flags from the loaded buffers
    if _is_int8_tied(model) and model.lm_head.weight_int8.is_meta:
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
