"""Last phase, version: record the run's artifacts in `dvc.lock` and push them to the S3 remote.

Run it as `python -m tasks.version` (or `python -m tasks.version --pull` to fetch a versioned run
into a checkout). The Airflow DAG runs the same functions as the `dvc.yaml` stages, so after a DAG
run the outputs on disk are exactly what the stages would have produced; `dvc commit -f` writes their
hashes (and those of the code and params they came from) to `dvc.lock`, and `dvc push` stores them
in the remote. With `dvc.lock` committed to git, `git checkout <rev> && python -m tasks.version
--pull` brings back that run's artifacts bit for bit.

The remote is configured in `.dvc/config.local` (git-ignored) as the default remote `costopt`,
because a loopback endpoint's port belongs to one machine, not to the project. The endpoint is
checked before anything changes; a failing dvc command raises `DvcError` with dvc's own message and
leaves the artifacts as they were (`dvc commit --no-relink` never rewrites workspace files).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from costopt.layout import Workspace
from costopt.modelio import sha256_file
from costopt.params import Params, VersionParams
from costopt.s3 import check_endpoint, credentials_env, parse_s3_url

REMOTE = "costopt"  # the DVC remote's name in .dvc/config.local
_STDERR_TAIL = 2000  # characters of dvc's output quoted in an error


class DvcError(RuntimeError):
    """A dvc command failed, or the workspace is not a DVC project. The message quotes dvc's output."""


def dvc_executable() -> str:
    """The `dvc` next to this interpreter (the pipeline venv), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    found = str(here) if here.exists() else shutil.which("dvc")
    if not found:
        raise DvcError(f"dvc not found next to {sys.executable} or on PATH; expected the pipeline "
                       "environment (`make venv`) to provide it")
    return found


def require_dvc_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise DvcError(f"workspace {root}: expected a DVC project (a `.dvc/` folder and `dvc.yaml`); "
                       "version runs in the project folder, or in a clone of it after `dvc init`")


def dvc_env(endpoint_url: str) -> dict[str, str]:
    """The child's environment: ours, plus dummy S3 credentials for an unconfigured loopback endpoint."""
    return {**os.environ, **credentials_env(endpoint_url), "DVC_NO_ANALYTICS": "1"}  # no phoning home


def run_dvc(root: Path, args: list[str], env: dict[str, str]) -> str:
    """Run `dvc <args>` in `root` without a terminal; return its stdout, or raise DvcError with its tail."""
    cmd = [dvc_executable(), *args]
    proc = subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-_STDERR_TAIL:]
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def missing_paths(root: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Deps and outs of dvc.yaml's stages that are absent on disk: {path: [stage, ...]}."""
    status = json.loads(run_dvc(root, ["status", "--json"], env) or "{}")
    missing: dict[str, list[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # "changed command", "always changed": not about files
            for kind in ("changed deps", "changed outs"):
                for path, state in entry.get(kind, {}).items():
                    if state == "deleted":
                        missing.setdefault(path, []).append(stage)
    return missing


def configure_remote(root: Path, cfg: VersionParams, env: dict[str, str]) -> None:
    """Make `costopt` the default remote in .dvc/config.local (replacing any earlier one)."""
    run_dvc(root, ["remote", "add", "--local", "--default", "--force", REMOTE, cfg.remote], env)
    if cfg.endpoint_url:
        run_dvc(root, ["remote", "modify", "--local", REMOTE, "endpointurl", cfg.endpoint_url], env)


def _count(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0  # "Everything is up to date." prints no count


def _prepare(params: Params, ws: Workspace, create_bucket: bool) -> dict[str, str]:
    """Checks shared by push and pull; returns the dvc environment. Changes nothing but the bucket."""
    cfg = params.version
    require_dvc_repo(ws.root)
    bucket = parse_s3_url(cfg.remote).bucket
    check_endpoint(cfg.endpoint_url, bucket, create=create_bucket)
    return dvc_env(cfg.endpoint_url)


def version(params: Params, ws: Workspace) -> dict[str, Any]:
    """Record every stage output in dvc.lock and push it to `params.version.remote`; return the record."""
    env = _prepare(params, ws, create_bucket=True)
    missing = missing_paths(ws.root, env)
    if missing:
        listed = "; ".join(f"{path} (stage {', '.join(stages)})" for path, stages in sorted(missing.items()))
        raise DvcError(f"workspace {ws.root}: cannot version, these dvc.yaml deps/outs are missing: {listed}; "
                       "expected a complete run of the pipeline first")
    configure_remote(ws.root, params.version, env)
    run_dvc(ws.root, ["commit", "--force", "--no-relink"], env)
    out = run_dvc(ws.root, ["push", "--remote", REMOTE], env)
    lock = ws.root / "dvc.lock"
    return {"remote": params.version.remote, "endpoint": params.version.endpoint_url,
            "pushed": _count(r"(\d+) files? pushed", out), "lock": str(lock),
            "lock_sha256": sha256_file(lock)}


def pull(ws: Workspace, params: Params) -> dict[str, Any]:
    """Fetch the outputs recorded in ws.root's dvc.lock from the remote and check them out."""
    env = _prepare(params, ws, create_bucket=False)
    lock = ws.root / "dvc.lock"
    if not lock.is_file():
        raise DvcError(f"workspace {ws.root}: no dvc.lock, so nothing is versioned here; expected a "
                       "checkout of a commit that `python -m tasks.version` recorded")
    configure_remote(ws.root, params.version, env)
    out = run_dvc(ws.root, ["pull", "--remote", REMOTE], env)
    return {"remote": params.version.remote, "endpoint": params.version.endpoint_url,
            "fetched": _count(r"(\d+) files? fetched", out), "lock": str(lock),
            "lock_sha256": sha256_file(lock)}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import execute, parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pull", action="store_true",
                   help="fetch the artifacts recorded in dvc.lock from the remote instead of pushing")
    args = p.parse_args(argv)
    return execute((lambda params, ws: pull(ws, params)) if args.pull else version, args)


if __name__ == "__main__":
    raise SystemExit(main())
