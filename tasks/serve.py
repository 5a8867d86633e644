"""`make serve` / `make serve-stop` / `python -m tasks.serve status`: the lasting deployment by hand.

`start` brings up the workspace's deployment (`costopt.deploy.lasting`) when it is not running: the
variants and current variant the last deploy recorded (`artifacts/serving/deployment.json`), or else
fp32 and the search's pick; ports and the deployment's name from `params.yaml`'s `serve` section. A
running deployment is left as it is. `stop` stops it; `status` prints it. Each prints how to call it.

    python -m tasks.serve start [--workspace .]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from costopt.deploy import lasting
from costopt.deploy.processes import DeployError


def _plan(root: Path, params) -> tuple[list[str], str]:
    """(variants to serve, the current one) from the last deploy's record, else from the search."""
    from costopt.storage.layout import read_json

    record = root / "artifacts" / "serving" / "deployment.json"
    if record.is_file():
        rec = read_json(record)
        return [v["name"] for v in rec["variants"]], rec["current"]
    search = root / "artifacts" / "search" / "search.json"
    picked = read_json(search).get("picked") if search.is_file() else None
    if (root / "artifacts" / "model" / "model.safetensors").is_file():
        return (["fp32", picked] if picked else ["fp32"]), picked or "fp32"
    raise DeployError(f"{root}: nothing to serve yet; run the pipeline first (make demo)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--workspace", type=Path, default=Path("."))
    p.add_argument("--settings", type=Path, default=Path("params.yaml"), help="params file (its serve section)")
    args = p.parse_args(argv)
    root = args.workspace.resolve()
    if args.action == "stop":
        stopped = lasting.stop(root)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no deployment was running")
        return 0
    state = lasting.status(root)
    if args.action == "status":
        if state is None:
            print("no deployment started in this workspace (make serve, or make demo)")
            return 1
        print(json.dumps(state, indent=2))
        return 0 if state["running"] else 1
    if state is not None and state["running"]:
        print(lasting.how_to_call(state))
        return 0
    from costopt.params import load_params
    from costopt.storage.layout import Workspace
    from tasks.deploy import gw_flags_for, predictor_flags

    params = load_params(root / args.settings if not args.settings.is_absolute() else args.settings)
    ws = Workspace(root)
    try:
        variants, current = _plan(root, params)
        print(f"starting deployment {params.serve.deployment!r}: {', '.join(variants)} (current {current}) ...",
              flush=True)
        state = lasting.start(root, variants, current, params.serve.deployment, params.serve.predictor_port,
                              params.serve.gateway_port, predictor_flags(params, ws), gw_flags_for(params, ws))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(lasting.how_to_call(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
