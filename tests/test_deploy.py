"""The deploy phase's choice of variants: fp32 plus the requested ones that passed their gates."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from costopt.storage.layout import Workspace
from costopt.params import Params, ServeParams
from tasks.deploy import DeployError, choose_variants, serving_python


def _ws(root: Path, picked: str | None, verdicts: dict[str, bool]) -> Workspace:
    ws = Workspace(root)
    ws.search_dir.mkdir(parents=True)
    (ws.search_dir / "search.json").write_text(json.dumps({"picked": picked}))
    (ws.search_dir / "gates.json").write_text(json.dumps({"variants": {
        n: {"passed": ok, "reasons": [] if ok else ["kl_mean = 0.3 > kl_mean_max = 0.02"]} for n, ok in verdicts.items()}}))
    return ws


def _params(*variants: str) -> Params:
    return dataclasses.replace(Params(), serve=ServeParams(variants=variants))


def test_serves_fp32_the_pick_and_passing_variants(tmp_path):
    ws = _ws(tmp_path, "mixed_x", {"mixed_x": True, "int8_weight_only": True, "int4_rtn_g64": False})
    chosen, left = choose_variants(_params("picked", "int8_weight_only", "int4_rtn_g64", "int8_static"), ws)
    assert chosen == ["fp32", "mixed_x", "int8_weight_only"], f"fp32 first, then passing ones in order: {chosen}"
    assert "failed its gates" in left["int4_rtn_g64"] and "kl_mean" in left["int4_rtn_g64"], left
    assert "not built" in left["int8_static"], left


def test_no_pick_serves_fp32_and_says_why(tmp_path):
    ws = _ws(tmp_path, None, {"int8_weight_only": False})
    chosen, left = choose_variants(_params("picked", "int8_weight_only"), ws)
    assert chosen == ["fp32"], chosen
    assert "picked nothing" in left["picked"], left


def test_missing_serving_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COSTOPT_SERVING_PYTHON", str(tmp_path / "nope" / "python"))
    try:
        serving_python()
    except DeployError as exc:
        assert "make venv" in str(exc), str(exc)
    else:
        raise AssertionError("a missing serving environment must raise DeployError")
