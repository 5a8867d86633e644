"""Turn the Airflow form (DAG params) into validated settings and a workspace, for every task.

The form shows the fields a platform engineer changes per run (model, variants, gate thresholds,
distillation on or off, price, profile); everything else comes from `params.yaml`. The merge goes through the same
validation as the file, so a bad form value fails with the field's name before any work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from costopt.storage.layout import Workspace
from costopt.params import FROZEN, Params, ParamsError, load_frozen, load_params

PROJECT = Path(__file__).resolve().parents[1]
FORM_GATES = ("kl_mean_max", "kl_p99_max", "top1_agreement_min", "ppl_ratio_max", "task_retention_min")


def overrides_from_form(form: dict[str, Any]) -> dict[str, Any]:
    """Map form fields onto params.yaml sections; empty or absent fields keep the file's values."""
    over: dict[str, Any] = {}
    if form.get("model"):
        over["ingest"] = {"model": form["model"]}
    if form.get("variants"):
        over["quantize"] = {"variants": list(form["variants"])}
    gates = {k: v for k, v in (form.get("gates") or {}).items() if v is not None}
    if gates:
        over["validate"] = {"gates": gates}
    if form.get("distill") is not None:
        over["distill"] = {"enabled": bool(form["distill"])}
    if form.get("mixed_precision_search") is not None:
        over["search"] = {"enabled": bool(form["mixed_precision_search"])}
    if form.get("price_per_hour_usd") is not None:
        over["cost"] = {"price_per_hour_usd": form["price_per_hour_usd"]}
    return over


def _workspace(form: dict[str, Any]) -> Workspace:
    return Workspace.from_env(form.get("workspace") or PROJECT)


def resolve_run(form: dict[str, Any] | None, run_id: str, first: bool) -> tuple[Params, Workspace]:
    """The settings one task of DAG run `run_id` uses: the first task (preflight) resolves them from
    params.yaml and the form and freezes them; every other task reads that frozen copy."""
    if first:
        return resolve(form)
    ws = _workspace(dict(form or {}))
    return load_frozen(ws.root / FROZEN, run_id), ws


def resolve(form: dict[str, Any] | None) -> tuple[Params, Workspace]:
    """(validated Params, Workspace) for one DAG run's form."""
    form = dict(form or {})
    ws = _workspace(form)
    params_file = ws.root / "params.yaml"
    if not params_file.is_file():
        params_file = PROJECT / "params.yaml"
    profile = form.get("profile") or "full"
    if profile not in ("quick", "full"):
        raise ParamsError(f"DAG param 'profile': expected 'quick' or 'full', got {profile!r}")
    return load_params(params_file, profile=profile, overrides=overrides_from_form(form)), ws
