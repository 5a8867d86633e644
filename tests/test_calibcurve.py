"""The calibration curve reuses the quantize phase's fit only when it is exactly the curve's point."""
from __future__ import annotations

from pathlib import Path

import pytest

from costopt.models.variants import VariantSpec
from costopt.params import load_params
from costopt.quantization.schemes import PRESETS, config_from_dict
from costopt.storage.layout import Workspace, write_json

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
NAME = "int4_gptq_g64"


def _workspace(tmp_path: Path, **overrides) -> tuple[Workspace, object]:
    ws = Workspace(tmp_path)
    write_json(ws.model_dir / "fingerprint.json", {"fingerprint": "base123"})
    config = config_from_dict(PRESETS[NAME])
    conf = config.to_dict()
    conf.pop("scheme")
    spec = {"name": NAME, "base_model": "m", "base_fingerprint": "base123", "precision": "int4",
            "transforms": [{"scheme": config.scheme, "config": conf}], "calibration": {"source": "prompts",
                                                                                     "samples": 8}}
    spec.update(overrides)
    VariantSpec.from_dict(spec).save(ws.variant_dir(NAME))
    return ws, config


@pytest.mark.parametrize("overrides, samples, reused", [
    ({}, 8, True),                                                   # the same fit: read back
    ({}, 4, False),                                                  # another size: fitted
    ({"calibration": {"source": "logs", "samples": 8}}, 8, False),   # other rows
    ({"base_fingerprint": "other"}, 8, False),                       # other fp32 weights
    ({"transforms": [{"scheme": "int4_weight_only", "config": {"group_size": 32}}]}, 8, False),  # other config
])
def test_curve_reuses_only_the_identical_fit(tmp_path, monkeypatch, overrides, samples, reused):
    import costopt.models.variants as variants
    from tasks.calibcurve import _built_variant

    monkeypatch.setattr(variants, "load_torch_variant", lambda ws, spec: ("the built model", None))
    ws, config = _workspace(tmp_path, **overrides)
    params = load_params(PARAMS, profile="quick")
    got = _built_variant(params, ws, NAME, config, samples, "prompts")
    assert (got == "the built model") == reused, got
