"""The variant spec: one JSON record per candidate model, and loading a variant from it.

A spec names the variant, its base model and fingerprint, the chain of transforms (each a scheme and
its versioned config), the artifact folder, its size and fingerprint. Every metric and report row
refers to a variant by this name, so any deployed variant can be traced to exactly how it was made.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace, read_json, write_json

SPEC = "spec.json"


@dataclass(frozen=True)
class VariantSpec:
    name: str
    base_model: str
    base_fingerprint: str
    precision: str
    transforms: list[dict[str, Any]] = field(default_factory=list)  # [{"scheme", "config"}]
    artifact: str = ""  # folder, relative to the workspace
    size_bytes: int = 0
    fingerprint: str = ""
    fast_kernel: bool = True  # False: quality-only, no kernel here makes it faster
    calibration: dict[str, Any] | None = None  # {"source": "prompts"|"logs", "samples": n} if calibrated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VariantSpec":
        return cls(**data)

    def save(self, folder: Path) -> Path:
        return write_json(folder / SPEC, self.to_dict())


def read_spec(ws: Workspace, name: str) -> VariantSpec:
    path = ws.variant_dir(name) / SPEC
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no variant spec for {name!r}; run the quantize phase first")
    return VariantSpec.from_dict(read_json(path))


def load_variant_model(ws: Workspace, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a quantized variant, rebuilt from its artifact and spec."""
    from transformers import AutoTokenizer

    from costopt.quantization.schemes import config_from_dict, load_variant

    spec = read_spec(ws, name)
    if len(spec.transforms) != 1:
        raise ValueError(f"{ws.variant_dir(name) / SPEC}: transforms: expected one step, got "
                         f"{len(spec.transforms)} (chains are not supported yet)")
    step = spec.transforms[0]
    config = config_from_dict({"scheme": step["scheme"], **step["config"]})
    model = load_variant(ws.variant_dir(name), ws.model_dir, config)
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    return model, tok
