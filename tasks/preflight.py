"""Phase 0, preflight: fail in seconds, not hours. Checks settings, the model source, the eval-set sizes
and the S3 remote, then freezes the run's effective settings.

Run it as `python -m tasks.preflight` (DVC's `settings` stage). A bad setting, an unknown model or an
unreachable artifact store stops the run before anything is written. Once every check passes, the
settings this run uses (params.yaml with the profile and the DAG form's overrides resolved) are written
to `artifacts/run/params.yaml`; every later task of the DAG run reads that copy, not params.yaml, so
editing params.yaml during a run changes nothing in it, and dvc.lock records these values.
"""
from __future__ import annotations

from typing import Any

from costopt.storage.layout import Workspace
from costopt.models.source import linear_widths, resolve_source
from costopt.params import FROZEN, Params, ParamsError, freeze


def check_group_sizes(params: Params, widths: dict[str, int]) -> None:
    """Every INT4 group size (named variants, the mixed search) must divide the model's Linear widths."""
    from costopt.quantization.schemes import config_from_dict
    from costopt.runtimes.registry import variant_definition

    sizes = sorted(set(widths.values()))
    where = {}
    for i, name in enumerate(params.quantize.variants):
        scheme = variant_definition(params.quantize.config(name)).scheme
        if scheme is None:
            continue  # a runtime's own export (llama.cpp types): no group size of ours
        cfg = config_from_dict(scheme)
        if hasattr(cfg, "group_size"):
            field = (f"quantize.definitions.{name}.group_size" if name in params.quantize.definitions
                     else f"quantize.variants[{i}] ({name}): group_size")
            where[field] = cfg.group_size
    if params.search.enabled:
        where["search.group_size"] = params.search.group_size
    for field, g in where.items():
        bad = [w for w in sizes if w % g]
        if bad:
            fits = [c for c in (16, 32, 64, 96, 128, 192, 256) if all(w % c == 0 for w in sizes)]
            raise ParamsError(f"{field}: {g} does not divide the layer width(s) {bad} of "
                              f"{params.ingest.model} ({widths}); group sizes that fit: {fits}")


def check_calibration(params: Params, ws: Workspace) -> None:
    """The calibration set can hold what calibrate.* asks of it (the log source is checked when read)."""
    cfg = params.calibrate
    logs = ws.root / cfg.logs if cfg.logs else None
    if cfg.source == "logs" and (logs is None or not logs.is_file()):
        raise ParamsError(f"calibrate.source: 'logs' but calibrate.logs {logs} does not exist")
    from_prompts = cfg.source == "prompts" or logs is None or not logs.is_file()
    if from_prompts:
        need = {"calibrate.samples": cfg.samples,
                "calibrate.curve": max(cfg.curve) if cfg.curve_variant and cfg.curve else 0}
        for field, n in need.items():
            if n > params.evaldata.calibration:
                raise ParamsError(f"{field}: needs {n} calibration prompts but evaldata.calibration is "
                                  f"{params.evaldata.calibration}; raise evaldata.calibration or lower {field}")


def preflight(params: Params, ws: Workspace, run_id: str | None = None) -> dict[str, Any]:
    from costopt.evaluation.evaldata import build_sets
    from costopt.storage.s3 import check_endpoint, parse_s3_url

    src = resolve_source(params.ingest.model)
    build_sets(params.evaldata)  # pure Python, milliseconds: set sizes the generators cannot meet fail here
    check_group_sizes(params, linear_widths(src))
    check_calibration(params, ws)
    remote = {"remote": params.version.remote, "checked": False}
    if params.version.remote.startswith("s3://"):
        bucket, _ = parse_s3_url(params.version.remote)
        check_endpoint(params.version.endpoint_url, bucket, create=True)
        remote["checked"] = True
    frozen = freeze(params, ws.root / FROZEN, run_id)
    return {"model": params.ingest.model, "source": src.kind, "profile": params.profile,
            "workspace": str(ws.root), "variants": list(params.quantize.variants), **remote,
            "settings": str(frozen)}


def variant_names(params: Params, ws: Workspace) -> list[str]:
    """The variants this run builds, in order (the DAG maps quantize/benchmark/validate over them)."""
    return list(params.quantize.variants)


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], preflight, argv)


if __name__ == "__main__":
    raise SystemExit(main())
