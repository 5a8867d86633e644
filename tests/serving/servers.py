"""Helpers for the serving tests: build a workspace with the pipeline's own phases, start real servers
(through the deploy phase's `start_server`, with this environment's Python)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from costopt.deploy.processes import ServerProcess
from costopt.deploy.processes import start_server as _start

PROJECT = Path(__file__).resolve().parents[2]
PIPELINE_PY = PROJECT / ".venv" / "bin" / "python"
VARIANT = "int8_weight_only"
GGUF_VARIANT = "gguf_q8_0"  # the llama.cpp runtime's variant


def phase(ws: Path, *args: str) -> None:
    proc = subprocess.run([str(PIPELINE_PY), "-m", *args, "--workspace", str(ws), "--profile", "quick"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def start_server(ws: Path, log: Path, *flags: str, variants: tuple[str, ...] = ("fp32", VARIANT)) -> ServerProcess:
    return _start(ws, variants, log, flags, python=Path(sys.executable), timeout_s=240)
