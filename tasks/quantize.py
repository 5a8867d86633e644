"""Phase 2, quantize: make one variant (or all) from its fp32 base, through `costopt.quantization.schemes.quantize`.

A variant's base is the ingested model (`teacher`) or, for `student` and `student_<preset>` (or a
definition with `base: student`), the distilled student of `tasks.distill`.

Run it as `python -m tasks.quantize [--variant NAME]`; the DAG maps it over quantize.variants. Each
variant is written as safetensors plus a `spec.json` (the variant spec: scheme, config, calibration
source and size, artifact size and fingerprint) into artifacts/variants/<name>/, through a staging
folder, so a failure leaves the earlier artifact intact.

Calibrated schemes (GPTQ, AWQ, static INT8) read the calibration set (`calibration_set`): the serving
request log when `calibrate.source` allows it and the log holds prompt text, otherwise the project's
calibration prompts. Either way it must be non-empty and disjoint from the held-out prompts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace, read_json, replace_dir, staging_dir
from costopt.models.source import fingerprint_dir, load_model_dir
from costopt.params import Params, ParamsError
from costopt.quantization.calibset import calibration_set
from costopt.quantization.schemes import SCHEMES, SchemeConfig, config_from_dict, quantize, save_variant
from costopt.models.variants import VariantSpec, clear_failure, record_failure, require_base
from costopt.runtimes.registry import RuntimeFailure, RuntimeUnavailable, VariantDefinition, variant_definition


def _base_fingerprint(folder: Path) -> str:
    record = folder / "fingerprint.json"
    return read_json(record)["fingerprint"] if record.is_file() else fingerprint_dir(folder, ("*.safetensors",))


def build_variant(name: str, config: SchemeConfig, params: Params, ws: Workspace, folder: Path,
                  samples: int | None = None, runtime: dict[str, Any] | None = None,
                  base: str = "teacher") -> VariantSpec:
    """Quantize the fp32 `base` (teacher or student) with `config`, save it into `folder`, return its spec."""
    base_folder = require_base(ws, base)
    model, tok = load_model_dir(base_folder)
    calib = None
    if SCHEMES[config.scheme].calibrated(config):
        calib = calibration_set(params, ws, tok, samples)
    model = quantize(model, config, calib)
    size = save_variant(model, config, folder)
    conf = config.to_dict()
    conf.pop("scheme")
    spec = VariantSpec(
        name=name, base_model=params.ingest.model, base_fingerprint=_base_fingerprint(base_folder),
        precision=SCHEMES[config.scheme].precision, transforms=[{"scheme": config.scheme, "config": conf}],
        artifact=str(ws.variant_dir(name).relative_to(ws.root)), size_bytes=size,
        fingerprint=fingerprint_dir(folder, ("*.safetensors",)), fast_kernel=SCHEMES[config.scheme].fast_kernel,
        calibration={"source": calib.source, "samples": calib.samples} if calib else None, runtime=runtime,
        base=base)
    spec.save(folder)
    return spec


def export_variant(name: str, definition: VariantDefinition, params: Params, ws: Workspace,
                   folder: Path) -> VariantSpec:
    """A variant a runtime builds itself from the fp32 weights of its base (llama.cpp's own quant types)."""
    runtime, cfg = definition.runtime, definition.runtime_config
    reason = runtime.available()
    if reason:
        raise RuntimeUnavailable(f"variant {name!r}: runtime {runtime.name!r} cannot run here: {reason}")
    base_folder = require_base(ws, definition.base)
    folder.mkdir(parents=True, exist_ok=True)
    # the original model's source (its GGUF's metadata) only for its own weights: a student has other hparams
    info = runtime.export(base_folder, folder, cfg, params.ingest.model if definition.base == "teacher" else None)
    spec = VariantSpec(
        name=name, base_model=params.ingest.model, base_fingerprint=_base_fingerprint(base_folder),
        precision=runtime.precision(cfg) or runtime.name,
        transforms=[{"scheme": f"{runtime.name}_export", "config": cfg.to_dict()}],
        artifact=str(ws.variant_dir(name).relative_to(ws.root)), size_bytes=int(info["size_bytes"]),
        fingerprint=fingerprint_dir(folder, (info["file"],)), fast_kernel=True,
        runtime=definition.runtime_record(), base=definition.base)
    spec.save(folder)
    return spec


def quantize_variant(params: Params, ws: Workspace, name: str) -> dict[str, Any]:
    """Build one named variant (a preset or a quantize.definitions entry, listed in quantize.variants or
    not: a variant can be built by hand) into artifacts/variants/<name>/."""
    known = {**params.quantize.presets(), **params.quantize.definitions}
    if name not in known:
        raise ParamsError(f"variant {name!r}: not a preset or a quantize.definitions entry; expected one of "
                          f"{sorted(known)}")
    definition = variant_definition(params.quantize.config(name))
    final = ws.variant_dir(name)
    stage = staging_dir(final)
    try:
        if definition.scheme is None:
            spec = export_variant(name, definition, params, ws, stage)
        else:
            spec = build_variant(name, config_from_dict(definition.scheme), params, ws, stage,
                                 runtime=definition.runtime_record(), base=definition.base)
    except RuntimeFailure as exc:  # this candidate only: recorded with its reason, the run goes on
        import shutil

        shutil.rmtree(stage, ignore_errors=True)  # an earlier artifact in `final` stays as it was
        return record_failure(ws, name, "quantize", exc)
    replace_dir(stage, final)
    clear_failure(ws, name)
    return {k: spec.to_dict()[k] for k in ("name", "precision", "size_bytes", "fingerprint")}


def quantize_variants(params: Params, ws: Workspace) -> dict[str, Any]:
    """Build every variant in quantize.variants (the DVC stage and the CLI without --variant)."""
    return {"variants": [quantize_variant(params, ws, name) for name in params.quantize.variants]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_variant_phase
    return run_variant_phase(__doc__.splitlines()[0], quantize_variant, quantize_variants, argv)


if __name__ == "__main__":
    raise SystemExit(main())
