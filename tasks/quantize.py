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

import json
from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace, read_json, replace_dir, staging_dir
from costopt.models.source import fingerprint_dir, load_model_dir
from costopt.params import Params, ParamsError
from costopt.quantization.schemes import SCHEMES, Calibration, SchemeConfig, config_from_dict, quantize, save_variant
from costopt.models.variants import VariantSpec, clear_failure, record_failure, require_base
from costopt.runtimes.registry import RuntimeFailure, RuntimeUnavailable, VariantDefinition, variant_definition


def _log_rows(path: Path) -> list[dict[str, Any]]:
    """Prompts from a serving request log: JSONL rows with a "prompt" text or chat "messages"."""
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParamsError(f"calibrate.logs: {path} line {n}: not JSON ({exc.msg})") from exc
            if isinstance(rec.get("messages"), list):
                rows.append({"id": f"log{n}", "messages": rec["messages"]})
            elif isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                rows.append({"id": f"log{n}", "messages": [{"role": "user", "content": rec["prompt"]}]})
    return rows


def calibration_rows(params: Params, ws: Workspace, samples: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """(calibration conversations, source): the first `samples` (default calibrate.samples), checked
    non-empty and disjoint from both held-out prompt sets."""
    from costopt.evaluation.evaldata import check_disjoint
    from costopt.evaluation.reference import read_jsonl

    cfg = params.calibrate
    logs = (ws.root / cfg.logs) if cfg.logs else None
    rows, source = [], "prompts"
    if cfg.source in ("auto", "logs") and logs is not None and logs.is_file():
        rows, source = _log_rows(logs), "logs"
    if cfg.source == "logs" and not rows:
        raise ParamsError(f"calibrate.source: 'logs' but {logs} is missing or holds no prompt text "
                          "(serving writes prompts only where configured)")
    if not rows:
        rows, source = read_jsonl(ws.data_dir / "calibration.jsonl"), "prompts"
    want = samples or cfg.samples
    rows = rows[-want:] if source == "logs" else rows[:want]  # logs: the latest traffic
    if not rows:
        raise ParamsError(f"calibrate: the calibration set from {source} is empty; expected at least one prompt")
    held = read_jsonl(ws.data_dir / "prompts.jsonl")
    if (ws.data_dir / "crosscheck.jsonl").is_file():  # the second held-out set (evaldata generator 3 on)
        held += read_jsonl(ws.data_dir / "crosscheck.jsonl")
    try:
        check_disjoint(held, rows)
    except ValueError as exc:
        raise ParamsError(f"calibrate ({source}): {exc}") from exc
    return rows, source


def calibration_set(params: Params, ws: Workspace, tok: Any, samples: int | None = None) -> Calibration:
    """The tokenized calibration set (first `samples` rows, default calibrate.samples)."""
    from costopt.quantization.capture import encode
    from costopt.evaluation.reference import prompt_texts

    rows, source = calibration_rows(params, ws, samples)
    texts = prompt_texts(tok, rows)  # chat template + the fp32 answer where evaldata made one
    # Every position counts, the system block every request shares included: its first tokens carry
    # the model's massive activations (attention sinks), and leaving them out of the statistics made
    # GPTQ's KL 4x worse on the built-in model (measured: 0.58 vs 0.15 nats/token).
    return Calibration(encode(tok, texts, params.calibrate.max_seq_len, batch=16), source)


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
