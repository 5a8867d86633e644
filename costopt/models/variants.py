"""The variant spec: one JSON record per candidate model, and loading a variant from it.

A spec names the variant, its base (`teacher`: the ingested model; `student`: the distilled student of
`tasks.distill`) with its model name and fingerprint, the chain of transforms (each a scheme and
its versioned config), the runtime that executes it (`costopt.runtimes.registry`; torch when absent),
the artifact folder, its size and fingerprint. Every metric and report row
refers to a variant by this name, so any deployed variant can be traced to exactly how it was made.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace, read_json, write_json

SPEC = "spec.json"
BASES = ("teacher", "student")  # the weights a variant is made from: the ingested model, the distilled student


# Presets made from the student: `student` itself (fp32, on the torch engine) and `student_<preset>` for
# these teacher presets (any other: a quantize.definitions entry with `base: student`).
STUDENT_OF = ("int8_weight_only", "int4_gptq_g64", "gguf_q8_0", "gguf_q8_0_fa", "gguf_q4_k_m")


def student_presets(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The student's presets, from the teacher's `presets` (name -> definition)."""
    out = {"student": {"base": "student", "scheme": "fp32"}}
    out.update({f"student_{name}": {"base": "student", **presets[name]} for name in STUDENT_OF if name in presets})
    return out


def base_dir(ws: Workspace, base: str) -> Path:
    """The model folder a variant's weights are made from (its config, tokenizer and fp32 weights)."""
    if base == "teacher":
        return ws.model_dir
    if base == "student":
        return ws.distill_dir / "student"
    raise ValueError(f"base: expected one of {list(BASES)}, got {base!r}")


def require_base(ws: Workspace, base: str) -> Path:
    """`base_dir`, checked to hold a model; a missing student names the phase that makes it."""
    from costopt.storage.layout import MissingArtifactError

    folder = base_dir(ws, base)
    if not (folder / "config.json").is_file():
        phase = "ingest" if base == "teacher" else "distill (python -m tasks.distill; distill.enabled)"
        raise MissingArtifactError(f"{folder}: no {base} model (config.json); run the {phase} phase first")
    return folder


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
    runtime: dict[str, Any] | None = None  # {"name", "config"} (costopt.runtimes.registry); None = torch, eager
    base: str = "teacher"  # BASES: what the transforms start from

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


def load_torch_variant(ws: Workspace, spec: VariantSpec) -> tuple[Any, Any]:
    """(model, tokenizer) of a variant whose weights are costopt's torch modules, rebuilt from its artifact."""
    from transformers import AutoTokenizer

    from costopt.quantization.schemes import config_from_dict, load_variant

    if len(spec.transforms) != 1:
        raise ValueError(f"{ws.variant_dir(spec.name) / SPEC}: transforms: expected one step, got "
                         f"{len(spec.transforms)} (chains are not supported yet)")
    step = spec.transforms[0]
    config = config_from_dict({"scheme": step["scheme"], **step["config"]})
    base = require_base(ws, spec.base)
    model = load_variant(ws.variant_dir(spec.name), base, config)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    return model, tok


def failure_file(ws: Workspace, name: str) -> Path:
    """Where a variant that could not be built, timed or scored records why (beside its folder)."""
    return ws.variant_dir(name).with_name(f"{name}.failed.json")


def record_failure(ws: Workspace, name: str, phase: str, exc: BaseException) -> dict[str, Any]:
    """Mark `name` as ruled out of this run by `phase`, with the reason; later phases skip it."""
    record = {"name": name, "phase": phase, "error": type(exc).__name__, "reason": str(exc)}
    write_json(failure_file(ws, name), record)
    return record


def read_failure(ws: Workspace, name: str) -> dict[str, Any] | None:
    path = failure_file(ws, name)
    return read_json(path) if path.is_file() else None


def clear_failure(ws: Workspace, name: str) -> None:
    failure_file(ws, name).unlink(missing_ok=True)
