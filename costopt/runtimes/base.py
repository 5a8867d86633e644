"""What every runtime provides (`Runtime`), its config base class and the runtime errors.

The registry (`costopt.runtimes.registry`) holds the instances; each runtime's module builds one from
these types, so runtime modules never import the registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable


class RuntimeConfigError(ValueError):
    """Unknown runtime, or a runtime config that does not fit (the message names the field)."""


class RuntimeFailure(Exception):
    """A candidate's runtime failed in a way that rules out this candidate only (not installed, an export
    that does not support the model, non-finite logits): the run records the reason and goes on."""


class RuntimeUnavailable(RuntimeFailure, RuntimeError):
    """The runtime cannot run on this machine (not installed, failed to build); the message says why."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Base of every runtime config: a format version (bump when the exported artifact changes)."""
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise RuntimeConfigError naming the field on a bad value."""


@dataclass(frozen=True)
class Runtime:
    name: str
    config_cls: type
    available: Callable[[], str | None]
    export: Callable[..., dict[str, Any] | None]  # (source_dir, out_dir, config, base_model) -> artifact info
    scorer: Callable[..., Any]  # (ws, spec) -> HF-like causal LM for teacher-forced logits
    engine: Callable[..., Any]  # (ws, spec, *, eos_token_ids, max_batch, max_len, threads) -> Engine-like
    precision: Callable[[RuntimeConfig], str | None] = lambda cfg: None  # overrides the scheme's label
    weights_file: str = "model.safetensors"  # the file in the variant's folder that it runs from
    reads_torch_weights: bool = True  # False: export writes everything it runs from (no scheme needed)
    prefix_cache: bool = False  # True: engine(...) also takes prefix_cache=N (costopt.runtimes.slots)
    device: str = "cpu"  # where its engine runs: "cpu" (priced by cost.*) or "cuda" (priced by gpu.*)
    presets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
