"""Phase 3b, calibration_curve: how a calibrated variant's KL changes with the calibration-set size.

Run it as `python -m tasks.calibcurve`. Re-fits `calibrate.curve_variant` (a GPTQ, AWQ or static INT8
variant) on the first n calibration samples for each n in `calibrate.curve` (16/32/64 by default) and
measures its KL mean (95% CI) on the first `calibrate.curve_prompts` held-out prompts against the
stored fp32 reference. For INT4 schemes the same config with round-to-nearest (no calibration) is
measured too, as the floor the calibration has to beat. Writes artifacts/calibration/curve.json;
an "enabled": false record when no curve is configured.

It runs after the quantize phase: the point at n = calibrate.samples is the curve variant that phase
built (same config, same calibration rows; its spec says so), read back rather than fitted again
(`"reused"` in the point). In the full-profile demo that fit is the dearest one (GPTQ on 128 samples
was 83 s of the phase's 340 s when every size was fitted here); a size the variant was not built with is
fitted as before.
"""
from __future__ import annotations

from typing import Any

from tqdm import tqdm

from costopt.storage.layout import Workspace, write_json
from costopt.evaluation.metrics import mean_over_units
from costopt.models.source import load_model_dir
from costopt.params import Params, ParamsError
from costopt.quantization.schemes import SCHEMES, config_from_dict, quantize


def _kl(model: Any, ref: Any, prompts: int, resamples: int) -> dict[str, Any]:
    from costopt.evaluation.quality import Tally, compare_prompts

    tally = Tally()
    compare_prompts(model, ref, tally, limit=prompts)
    return mean_over_units(tally.kl_sum, tally.count, resamples).to_dict()


def calibration_curve(params: Params, ws: Workspace) -> dict[str, Any]:
    from costopt.quantization.calibset import calibration_rows, calibration_set
    from costopt.evaluation.reference import load_reference

    cfg = params.calibrate
    out = ws.calibration_dir / "curve.json"
    if not cfg.curve_variant or not cfg.curve:
        write_json(out, {"enabled": False})
        return {"enabled": False}
    known = {*params.quantize.variants, *params.quantize.definitions}
    if cfg.curve_variant not in known | set(params.quantize.presets()):
        raise ParamsError(f"calibrate.curve_variant: unknown variant {cfg.curve_variant!r}; expected a preset "
                          f"or a quantize.definitions name")
    from costopt.runtimes.registry import variant_definition

    scheme = variant_definition(params.quantize.config(cfg.curve_variant)).scheme
    if scheme is None:
        raise ParamsError(f"calibrate.curve_variant: {cfg.curve_variant!r} is a runtime's own export with no "
                          "calibration; expected a GPTQ, AWQ or static INT8 variant")
    config = config_from_dict(scheme)
    if not SCHEMES[config.scheme].calibrated(config):
        raise ParamsError(f"calibrate.curve_variant: {cfg.curve_variant!r} reads no calibration data; "
                          "expected a GPTQ, AWQ or static INT8 variant")
    rows, source = calibration_rows(params, ws, max(cfg.curve))
    sizes = [n for n in cfg.curve if n <= len(rows)]
    if not sizes:
        raise ParamsError(f"calibrate.curve: sizes {list(cfg.curve)} all exceed the {len(rows)} calibration "
                          f"samples available from {source}")
    ref = load_reference(params, ws)
    prompts = min(cfg.curve_prompts, len(ref.texts))
    points = []
    for n in tqdm(sizes, desc="calibration curve", unit="size"):
        model, reused = _built_variant(params, ws, cfg.curve_variant, config, n, source), True
        if model is None:
            model, tok = load_model_dir(ws.model_dir)
            model, reused = quantize(model, config, calibration_set(params, ws, tok, n)), False
        points.append({"samples": n, "source": source, "reused": reused,
                       "kl_mean": _kl(model, ref, prompts, params.validate.bootstrap)})
    rtn = None
    if config.scheme == "int4_weight_only":
        model, _ = load_model_dir(ws.model_dir)
        rtn_cfg = config_from_dict({**config.to_dict(), "method": "rtn"})
        rtn = _kl(quantize(model, rtn_cfg), ref, prompts, params.validate.bootstrap)["value"]
    record = {"enabled": True, "variant": cfg.curve_variant, "config": config.to_dict(), "prompts": prompts,
              "points": points, "rtn_kl_mean": rtn, "skipped_sizes": [n for n in cfg.curve if n not in sizes]}
    write_json(out, record)
    return {"variant": cfg.curve_variant, "kl_mean": {p["samples"]: p["kl_mean"]["value"] for p in points},
            "rtn_kl_mean": rtn}


def _built_variant(params: Params, ws: Workspace, name: str, config: Any, samples: int, source: str) -> Any:
    """The quantize phase's `name` when it is exactly this curve point (same scheme config, fitted on
    the same first `samples` rows of the same source, from the same fp32 weights), else None."""
    from costopt.models.variants import load_torch_variant, read_failure, read_spec
    from costopt.storage.layout import read_json

    folder = ws.variant_dir(name)
    if name not in params.quantize.variants or read_failure(ws, name) or not (folder / "spec.json").is_file():
        return None
    spec = read_spec(ws, name)
    conf = config.to_dict()
    conf.pop("scheme")
    base = read_json(ws.model_dir / "fingerprint.json")["fingerprint"]
    if (spec.transforms != [{"scheme": config.scheme, "config": conf}] or spec.base_fingerprint != base
            or spec.calibration != {"source": source, "samples": samples}):
        return None
    return load_torch_variant(ws, spec)[0]


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], calibration_curve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
