"""Serving tests run in the serving environment (.venv-serving): `make test` runs them with its pytest.

`workspace` builds, once per session, what the pipeline would leave behind: the ingested built-in
model, an INT8 weight-only variant and a llama.cpp GGUF Q8_0 variant, made by the pipeline environment's own phases (subprocesses,
as a deployment would find them on disk). `server` is a real `python -m serving` process on a free
loopback port (see servers.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from servers import GGUF_VARIANT, PIPELINE_PY, VARIANT, phase, start_server


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    if not PIPELINE_PY.is_file():
        pytest.fail(f"{PIPELINE_PY} is missing: run `make test`, which creates both environments")
    ws = tmp_path_factory.mktemp("ws")
    phase(ws, "tasks.ingest")
    phase(ws, "tasks.quantize", "--variant", VARIANT)
    phase(ws, "tasks.quantize", "--variant", GGUF_VARIANT)  # exported by llama.cpp's own quantizer
    return ws


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    """fp32 and INT8 behind one server; small limits so bad-input tests are cheap."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    reqlog = log.with_name("requests.jsonl")
    srv = start_server(workspace, log, "--max_tokens_limit", "64", "--max_prompt_tokens", "512",
                       "--max_body_bytes", "65536", "--request_log", str(reqlog), "--log_prompts")
    srv.request_log = reqlog
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def embedder():
    from costopt.cache.embed import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def calibration_file(embedder, tmp_path_factory) -> Path:
    """The gateway's calibration (`serving.gateway.__main__.calibration`) made once per session: the
    decision tests read it, every gateway the tests start reuses it instead of calibrating again."""
    from serving.gateway.__main__ import calibration

    return_path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    calibration(return_path, embedder, 0.01)
    return return_path
