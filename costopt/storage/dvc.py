"""DVC from Python: run the `dvc` command line in a workspace and turn its failures into `DvcError`.

The version phase (commit + push) and the deploy phase (pull a variant's weights back) share this.
We drive the CLI rather than DVC's Python API: the CLI is DVC's stable interface, and its exit code
and stderr are what a user would see.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from costopt.params import VersionParams
from costopt.storage.s3 import TransientStorageError, credentials_env, is_transient

REMOTE = "costopt"  # the DVC remote's name in .dvc/config.local
_STDERR_TAIL = 2000  # characters of dvc's output quoted in an error


class DvcError(RuntimeError):
    """A dvc command failed, or the workspace is not a DVC project. The message quotes dvc's output."""


class DvcTransientError(DvcError, TransientStorageError):
    """A dvc command failed on a fault that may pass (its output reads as a timeout, a 5xx or a lost
    connection), or ran past its time limit; Airflow retries the task."""


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


def run_dvc(root: Path, args: list[str], env: dict[str, str], timeout_s: float | None = None) -> str:
    """Run `dvc <args>` in `root` without a terminal; return its stdout, or raise DvcError with its tail
    (DvcTransientError when the failure reads as transient, or when it ran past `timeout_s`: then dvc and
    its children are killed)."""
    cmd = [dvc_executable(), *args]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        tail = (stderr.strip() or stdout.strip())[-_STDERR_TAIL:]
        raise DvcTransientError(f"`dvc {' '.join(args)}` in {root} ran past its {timeout_s:g} s limit "
                                f"(version.timeout_s) and was stopped; the S3 endpoint stopped answering?"
                                f"{chr(10) + tail if tail else ''}") from None
    if proc.returncode != 0:
        tail = (stderr.strip() or stdout.strip())[-_STDERR_TAIL:]
        kind = DvcTransientError if is_transient(tail) else DvcError
        raise kind(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{tail}")
    return stdout


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
    for option in ("connect_timeout", "read_timeout"):  # each S3 request; dvc's own default is 60 s
        run_dvc(root, ["remote", "modify", "--local", REMOTE, option, str(int(cfg.request_timeout_s))], env)
