"""The torch runtime: a variant's own modules (fp32, bf16 or costopt-quantized) in costopt's engine.

The weights need no export: the quantize phase's safetensors are what runs. `compile: true` runs the
engine's decode step compiled (`costopt.runtimes.engine`); compiled and eager agree (tested), so such
a variant shares its quality with the eager one and differs only in speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from costopt.runtimes.base import Runtime, RuntimeConfig, RuntimeConfigError


@dataclass(frozen=True)
class TorchConfig(RuntimeConfig):
    """The torch engine: the variant's own modules, eager (`compile: true` adds the compiled decode step)."""
    compile: bool = False  # torch.compile the decode step (costopt.runtimes.engine); exact, so quality is shared

    def check(self) -> None:
        if not isinstance(self.compile, bool):
            raise RuntimeConfigError(f"torch.compile: expected true or false, got {self.compile!r}")


def config_of(spec: Any) -> TorchConfig:
    record = getattr(spec, "runtime", None) or {}
    cfg = {k: v for k, v in (record.get("config") or {}).items() if k != "version"}
    return TorchConfig(**cfg)


def scorer(ws: Any, spec: Any) -> Any:
    from costopt.models.variants import load_torch_variant

    return load_torch_variant(ws, spec)[0]


def engine(ws: Any, spec: Any, *, eos_token_ids: list[int], max_batch: int, max_len: int,
                  threads: int) -> Any:
    import torch

    from costopt.models.variants import load_torch_variant
    from costopt.runtimes.engine import Engine

    torch.set_num_threads(threads)
    model, _ = load_torch_variant(ws, spec)
    # compile: true whose compile fails runs eager, logging why (engine.compiled / engine.compile_error)
    return Engine(model, eos_token_ids=eos_token_ids, max_batch=max_batch, max_len=max_len,
                  compile=config_of(spec).compile)

RUNTIME = Runtime("torch", TorchConfig, available=lambda: None, export=lambda *a, **k: None,
                  scorer=scorer, engine=engine)
