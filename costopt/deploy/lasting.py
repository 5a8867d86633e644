"""The lasting deployment: a predictor and a gateway on loopback that outlive the DAG run.

The deploy phase load-tests the winners on servers of its own and stops them; then `promote()` hands
the search's pick to this deployment:
- none running for the workspace: start the predictor (the winners) and the gateway (`--deployment
  NAME`, current = the pick), each in a session of its own, so they keep serving after the DAG run,
  `make demo` or the shell that started them;
- one running: load the winners it does not serve yet onto its predictor (KServe's repository API),
  then set the pick as current when the deployment has none, or start a **canary** of the pick when
  another variant serves (`serving.gateway.rollout`: judged on answer quality, promoted or rolled back
  on its own as traffic flows). A canary already running is left to finish.
Nothing running is touched before every variant is loaded: a failed load (weights missing, S3 or DVC
unreachable before it) leaves the deployment serving as it was.

The machine state (process ids, ports, logs) lives in `WORKSPACE/.costopt/deployment/` (never
versioned); what serves, with each variant's fingerprint and the git/DVC revision, is the deploy
phase's record `artifacts/serving/deployment.json` (versioned with the run), so `dvc pull` at that
revision rebuilds exactly what serves. `make serve` / `make serve-stop` (`python -m tasks.serve`)
start and stop it by hand.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

import httpx

from costopt.deploy.processes import DeployError, read_admin_key, start_gateway, start_server
from costopt.storage.layout import read_json, write_json

STATE_VERSION = 1
LOAD_TIMEOUT_S = 600.0  # loading one variant onto a running predictor (fp32 with its calibration: ~30 s)


def state_dir(root: Path) -> Path:
    return Path(root) / ".costopt" / "deployment"


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def _ready(url: str) -> bool:
    try:
        with httpx.Client(timeout=3, trust_env=False) as http:
            return http.get(f"{url}/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def status(root: Path) -> dict[str, Any] | None:
    """The running deployment of workspace `root` ({..., "running": bool}), or None when none was started."""
    path = state_dir(root) / "deployment.json"
    if not path.is_file():
        return None
    try:
        state = read_json(path)
        procs = [state["predictor"], state["gateway"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    state["running"] = all(_alive(int(p["pid"])) and _ready(p["url"]) for p in procs)
    return state


def start(root: Path, variants: Sequence[str], current: str, name: str, predictor_port: int, gateway_port: int,
          predictor_flags: Sequence[str] = (), gateway_flags: Sequence[str] = (),
          fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the pair detached and record it; DeployError (with the server's log) when either fails."""
    root = Path(root).resolve()
    folder = state_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    pred = start_server(root, variants, folder / "predictor.log", predictor_flags, port=predictor_port or None,
                        detached=True)
    try:
        gw = start_gateway(root, pred.url, variants, folder / "gateway.log",
                           ["--deployment", name, "--current", current, "--rollout_state",
                            str(folder / "rollout.json"), *gateway_flags], port=gateway_port or None, detached=True)
    except DeployError:
        pred.stop()
        raise
    state = {"version": STATE_VERSION, "workspace": str(root), "deployment": name, "started_unix": time.time(),
             "predictor": {"pid": pred.proc.pid, "url": pred.url, "log": str(pred.log)},
             "gateway": {"pid": gw.proc.pid, "url": gw.url, "log": str(gw.log)},
             "fingerprints": dict(fingerprints or {})}  # what each served variant was loaded from
    write_json(folder / "deployment.json", state)
    return {**state, "running": True}


def stop(root: Path, timeout_s: float = 30.0) -> list[str]:
    """Stop the workspace's deployment (gateway first); returns what was stopped. Idempotent."""
    path = state_dir(root) / "deployment.json"
    if not path.is_file():
        return []
    try:
        state = read_json(path)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return []
    stopped = []
    for role in ("gateway", "predictor"):
        pid = int((state.get(role) or {}).get("pid", 0))
        if pid <= 0 or not _alive(pid):
            continue
        os.killpg(pid, signal.SIGTERM)  # its own session: the group holds the server and its children
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        stopped.append(role)
    path.unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    """Collect a child that exited (when this process started it), so it is not counted as alive."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _admin(root: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_admin_key(root)}"}


def promote(root: Path, variants: Sequence[str], picked: str, name: str, predictor_port: int, gateway_port: int,
            canary: dict[str, Any], predictor_flags: Sequence[str] = (), gateway_flags: Sequence[str] = (),
            fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Make `picked` serve deployment `name` (see the module docstring); returns what was done.

    `fingerprints` ({variant: fingerprint} of the workspace's weights): a served variant whose weights
    changed under the same name since it was loaded is loaded again (KServe's hot replace)."""
    root = Path(root).resolve()
    fingerprints = dict(fingerprints or {})
    state = status(root)
    if state is None or not state["running"]:
        if state is not None:
            stop(root)  # half of a pair, or a stale record: start clean
        state = start(root, variants, picked, name, predictor_port, gateway_port, predictor_flags, gateway_flags,
                      fingerprints)
        return {"action": "started", "current": picked, "canary": None, "loaded": list(variants), **_where(state)}
    if state.get("deployment") != name:
        raise DeployError(f"serve.deployment: the running deployment is {state.get('deployment')!r}, not {name!r}; "
                          f"stop it first (make serve-stop)")
    headers = _admin(root)
    with httpx.Client(timeout=LOAD_TIMEOUT_S, trust_env=False) as http:
        pred, gw = state["predictor"]["url"], state["gateway"]["url"]
        served = {m["id"] for m in http.get(f"{pred}/openai/v1/models").json().get("data", [])}
        loaded_from = dict(state.get("fingerprints") or {})
        loaded = []
        for v in variants:
            if v not in served or (v in fingerprints and loaded_from.get(v) != fingerprints[v]):
                r = http.post(f"{pred}/v2/repository/models/{v}/load", headers=headers)
                if r.status_code != 200:
                    raise DeployError(f"loading {v} onto the running deployment's predictor {pred} failed "
                                      f"({r.status_code}: {r.text[:300]}); the deployment serves as before")
                loaded.append(v)
                if v in fingerprints:
                    loaded_from[v] = fingerprints[v]
        if loaded:
            write_json(state_dir(root) / "deployment.json",
                       {k: v for k, v in {**state, "fingerprints": loaded_from}.items() if k != "running"})
        rollout = http.get(f"{gw}/v2/rollout", headers=headers).json()
        current, running = rollout.get("current"), rollout.get("canary")
        if current is None:
            _ok(http.post(f"{gw}/v2/rollout", json={"current": picked}, headers=headers), "setting the current variant")
            action = "set"
        elif current == picked:
            action = "unchanged"
        elif running is not None:
            action = f"left alone: a canary of {running['candidate']} is running"
        else:
            _ok(http.post(f"{gw}/v2/rollout/canary", json={"candidate": picked, **canary}, headers=headers),
                "starting the canary")
            action = "canary started"
        after = http.get(f"{gw}/v2/rollout", headers=headers).json()
    return {"action": action, "current": after.get("current"), "canary": (after.get("canary") or {}).get("candidate"),
            "loaded": loaded, **_where(state)}


def _ok(r: httpx.Response, what: str) -> None:
    if r.status_code != 200:
        raise DeployError(f"{what} on the running deployment failed ({r.status_code}: {r.text[:300]})")


def _where(state: dict[str, Any]) -> dict[str, Any]:
    return {"deployment": state["deployment"], "gateway_url": state["gateway"]["url"],
            "predictor_url": state["predictor"]["url"], "logs": [state["predictor"]["log"], state["gateway"]["log"]]}


def how_to_call(state: dict[str, Any]) -> str:
    """The lines `make demo` and `make serve` print: the model name, the URL and a curl command."""
    gw, name = state["gateway_url"] if "gateway_url" in state else state["gateway"]["url"], state["deployment"]
    return (f"The deployment {name!r} is serving at {gw} (OpenAI API at {gw}/openai/v1). Try:\n"
            f"  curl -s {gw}/openai/v1/chat/completions -H 'content-type: application/json' \\\n"
            f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
            f"\"max_tokens\": 32}}'\n"
            f"Stop it with `make serve-stop`.")
