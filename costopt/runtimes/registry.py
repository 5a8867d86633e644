"""The runtime registry: which program executes a variant, behind one entry point.

A variant is (weights x runtime). Its definition in `params.yaml` (or a preset) is one mapping: the
weights' scheme and config, as today (`costopt.quantization.schemes`), plus an optional `runtime`
(default `torch`) and that runtime's own fields. A runtime is registered once, with:
- a versioned config dataclass (`from_dict` / `to_dict`, checked when built);
- `available()`: None when it can run here, else the reason (not installed, failed to build);
- `export(source_dir, out_dir, config, base_model)`: turns the variant's weights into the runtime's
  own format (GGUF for llama.cpp); None for runtimes that read the torch weights directly;
- `scorer(ws, spec)`: an object called like a Hugging Face causal LM, `m(input_ids=, attention_mask=)
  .logits`, whose logits come from the runtime itself, so every quality metric, CI and gate is the
  runtime's own (never a torch twin's);
- `engine(ws, spec, eos_token_ids, max_batch, max_len, threads)`: a continuous-batching engine with
  the interface of `costopt.runtimes.engine.Engine`, which the server and the benchmark drive.

Adding a runtime is one module (building a `costopt.runtimes.base.Runtime`), one line in
`RUNTIMES` below, and its test.

    definition = variant_definition({"runtime": "llamacpp", "qtype": "Q4_K_M"})
    definition.runtime.name, definition.runtime_config.to_dict()   # 'llamacpp', {'qtype': 'Q4_K_M', ...}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from costopt.runtimes import cuda_runtime, llamacpp_runtime, torch_runtime
from costopt.runtimes.base import Runtime, RuntimeConfig, RuntimeConfigError, RuntimeFailure, RuntimeUnavailable

__all__ = ["Runtime", "RuntimeConfig", "RuntimeConfigError", "RuntimeFailure", "RuntimeUnavailable", "RUNTIMES", "get",
           "presets", "runtime_config", "variant_definition", "spec_runtime", "load_scorer"]

DEFAULT_RUNTIME = "torch"


RUNTIMES: dict[str, Runtime] = {rt.name: rt for rt in (torch_runtime.RUNTIME, llamacpp_runtime.RUNTIME,
                                                      cuda_runtime.RUNTIME)}


def get(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise RuntimeConfigError(f"runtime: unknown runtime {name!r}; expected one of {sorted(RUNTIMES)}")
    return RUNTIMES[name]


def presets() -> dict[str, dict[str, Any]]:
    """Named variants that only make sense on one runtime (llama.cpp's own quant types)."""
    out: dict[str, dict[str, Any]] = {}
    for rt in RUNTIMES.values():
        out.update(rt.presets)
    return out


def runtime_config(name: str, data: dict[str, Any]) -> RuntimeConfig:
    """Build and check the config of runtime `name` from its fields; bad fields raise RuntimeConfigError."""
    cls = get(name).config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RuntimeConfigError(f"{name}: unknown runtime field(s) {unknown}; expected some of {sorted(known)}")
    cfg = cls(**data)
    cfg.check()
    return cfg


@dataclass(frozen=True)
class VariantDefinition:
    """One variant's recipe: weights (a scheme config, or None for the fp32 weights) x runtime."""
    scheme: dict[str, Any] | None  # {"scheme": ..., **config} for costopt.quantization.schemes, or None
    runtime: Runtime
    runtime_config: RuntimeConfig
    base: str = "teacher"  # costopt.models.variants.BASES: the ingested model, or the distilled student

    def runtime_record(self) -> dict[str, Any]:
        return {"name": self.runtime.name, "config": self.runtime_config.to_dict()}


def variant_definition(data: dict[str, Any]) -> VariantDefinition:
    """Split a definition into its weights' scheme and its runtime, checking both.

    Raises RuntimeConfigError for runtime fields and SchemeError (costopt.quantization.schemes) for the
    scheme's, each naming the field."""
    from costopt.models.variants import BASES

    data = dict(data)
    base = data.pop("base", "teacher")
    if base not in BASES:
        raise RuntimeConfigError(f"base: expected one of {list(BASES)} (the ingested model, or the distilled "
                                 f"student), got {base!r}")
    name = data.pop("runtime", DEFAULT_RUNTIME)
    if not isinstance(name, str):
        raise RuntimeConfigError(f"runtime: expected a runtime name, got {name!r}")
    runtime = get(name)
    fields = {f.name for f in dataclasses.fields(runtime.config_cls)} - {"version"}
    own = {k: data.pop(k) for k in list(data) if k in fields}
    config = runtime_config(name, own)
    scheme = data if data else None
    if scheme is not None and not runtime.reads_torch_weights:
        raise RuntimeConfigError(f"{name}: exports the fp32 weights with its own quantizer; combining it with "
                                 f"scheme {scheme.get('scheme')!r} is not supported (drop the scheme fields "
                                 f"{sorted(scheme)})")
    if scheme is not None:
        from costopt.quantization.schemes import config_from_dict  # late: the registry imports torch

        config_from_dict(scheme)
    elif runtime.reads_torch_weights:
        raise RuntimeConfigError(f"{name}: expected a 'scheme' (the weights this runtime runs), got only {own}")
    return VariantDefinition(scheme, runtime, config, base)


def spec_runtime(spec: Any) -> tuple[Runtime, RuntimeConfig]:
    """The runtime and config recorded in a variant spec (older specs without one: torch, eager)."""
    record = getattr(spec, "runtime", None) or {"name": DEFAULT_RUNTIME, "config": {}}
    cfg = dict(record.get("config") or {})
    cfg.pop("version", None)
    return get(record["name"]), runtime_config(record["name"], cfg)


def load_scorer(ws: Any, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a variant for teacher-forced scoring, from its own runtime.

    The model is called like a Hugging Face causal LM (`model(input_ids=, attention_mask=).logits`); for
    a runtime other than torch its logits come from that runtime (llama.cpp's), not from a torch twin."""
    from transformers import AutoTokenizer

    from costopt.models.variants import read_spec

    spec = read_spec(ws, name)
    runtime, _ = spec_runtime(spec)
    reason = runtime.available()
    if reason:
        raise RuntimeUnavailable(f"variant {name!r}: runtime {runtime.name!r} cannot run here: {reason}")
    model = runtime.scorer(ws, spec)
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    return model, tok
