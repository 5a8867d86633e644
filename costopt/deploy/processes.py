"""Loopback KServe servers as processes: the predictor (`python -m serving`) and the gateway
(`python -m serving.gateway`), started in the serving environment and stopped again.

The pipeline and the server live in different Python environments (DESIGN.md), so a server is a
process: `.venv-serving/bin/python -m serving --workspace WS --variants ...`. `start_server` waits for
KServe's `/v2/health/ready` and fails with the server's own log when it exits or never gets ready; the
returned `ServerProcess` stops it (a context manager too). The deploy phase, the benchmarks and the
tests start servers through here; `costopt.deploy.lasting` keeps a pair running after the DAG run.

    with start_server(ws.root, ["fp32", "int8_weight_only"], log=Path("server.log")) as srv:
        httpx.post(f"{srv.url}/openai/v1/chat/completions", json=...)
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx

PROJECT = Path(__file__).resolve().parents[2]
SERVING_PYTHON = PROJECT / ".venv-serving" / "bin" / "python"


class DeployError(RuntimeError):
    """The server did not start: the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: Path
    variants: tuple[str, ...]
    admin_key: str = ""  # what the admin routes (/v2/repository/...) need; read once the server is ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def logs(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def first_traceback(log: str) -> str | None:
    """The first Python traceback in a server log, up to and including its exception line; None if none."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines) - 1)
    return "\n".join(lines[start:end + 1])


def serving_python() -> Path:
    py = Path(os.environ.get("COSTOPT_SERVING_PYTHON") or SERVING_PYTHON)
    if not py.is_file():
        raise DeployError(f"{py}: the serving environment is missing; `make venv` (or `make demo`) creates it")
    return py


def read_admin_key(workspace: Path) -> str:
    """The server's admin key: COSTOPT_ADMIN_KEY, else the file the server wrote at its first start."""
    from costopt.storage.layout import Workspace

    if os.environ.get("COSTOPT_ADMIN_KEY", "").strip():
        return os.environ["COSTOPT_ADMIN_KEY"].strip()
    path = Workspace(Path(workspace).resolve()).admin_key_file
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise DeployError(f"{path}: cannot read the server's admin key ({exc.strerror})") from None


def start_server(workspace: Path, variants: Sequence[str], log: Path, flags: Sequence[str] = (),
                 port: int | None = None, python: Path | None = None, timeout_s: float = 300,
                 detached: bool = False) -> ServerProcess:
    """Start `python -m serving` for `variants` of `workspace` and wait until KServe reports ready.
    `detached`: in a session of its own, so it outlives the process that started it (and its Ctrl-C)."""
    port = port or free_port()
    cmd = [str(python or serving_python()), "-m", "serving", "--workspace", str(workspace),
           "--variants", *variants, "--http_port", str(port), "--enable_grpc", "false", *flags]
    return _launch(cmd, workspace, variants, log, port, timeout_s, "the model server", detached)


def start_gateway(workspace: Path, predictor_url: str, variants: Sequence[str], log: Path, flags: Sequence[str] = (),
                  port: int | None = None, python: Path | None = None, timeout_s: float = 300,
                  detached: bool = False) -> ServerProcess:
    """Start `python -m serving.gateway` (the semantic cache) in front of `predictor_url`; wait until ready."""
    port = port or free_port()
    cmd = [str(python or serving_python()), "-m", "serving.gateway", "--workspace", str(workspace),
           "--predictor_url", predictor_url, "--variants", *variants, "--http_port", str(port),
           "--enable_grpc", "false", *flags]
    return _launch(cmd, workspace, variants, log, port, timeout_s, "the gateway", detached)


def _launch(cmd: list[str], workspace: Path, variants: Sequence[str], log: Path, port: int, timeout_s: float,
            what: str, detached: bool = False) -> ServerProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "a" if detached else "w") as fh:
        proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=detached)
    server = ServerProcess(proc, port, log, tuple(variants))
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"{what} exited with code {proc.returncode}:\n{server.logs()}")
            try:
                if http.get(f"{server.url}/v2/health/ready").status_code == 200:
                    server.admin_key = read_admin_key(workspace)
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    server.stop()
    raise DeployError(f"{what} was not ready after {timeout_s:.0f} s:\n{server.logs()}")
