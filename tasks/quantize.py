"""Phase 2, quantize: make every configured variant from the fp32 model, through `costopt.quant.quantize`.

Run it as `python -m tasks.quantize`. Each variant is written as safetensors plus a `spec.json` (the
variant spec: scheme chain, configs, size, fingerprint). All variants are staged and swapped in
together, so a failure leaves the earlier set intact.
"""
from __future__ import annotations

from typing import Any

from tqdm import tqdm

from costopt.layout import Workspace, read_json, replace_dir, staging_dir
from costopt.modelio import fingerprint_dir, load_model_dir
from costopt.params import Params
from costopt.quant import SCHEMES, config_from_dict, quantize, save_variant
from costopt.variants import VariantSpec


def make_variant(name: str, params: Params, ws: Workspace, folder) -> VariantSpec:
    base_record = read_json(ws.model_dir / "fingerprint.json")
    config = config_from_dict({"scheme": name})
    model, _ = load_model_dir(ws.model_dir)
    model = quantize(model, config)
    size = save_variant(model, config, folder)
    conf = config.to_dict()
    conf.pop("scheme")
    spec = VariantSpec(
        name=name, base_model=params.ingest.model, base_fingerprint=base_record["fingerprint"],
        precision=SCHEMES[name].precision, transforms=[{"scheme": name, "config": conf}],
        artifact=str(ws.variant_dir(name).relative_to(ws.root)), size_bytes=size,
        fingerprint=fingerprint_dir(folder, ("*.safetensors",)), fast_kernel=SCHEMES[name].fast_kernel)
    spec.save(folder)
    return spec


def quantize_variants(params: Params, ws: Workspace) -> dict[str, Any]:
    """Build every variant in params.quantize.variants; return their specs (small, JSON-able)."""
    stage = staging_dir(ws.variants_dir)
    specs = []
    for name in tqdm(params.quantize.variants, desc="quantize", unit="variant"):
        specs.append(make_variant(name, params, ws, stage / name).to_dict())
    replace_dir(stage, ws.variants_dir)
    return {"variants": [{k: s[k] for k in ("name", "precision", "size_bytes", "fingerprint")}
                         for s in specs]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], quantize_variants, argv)


if __name__ == "__main__":
    raise SystemExit(main())
