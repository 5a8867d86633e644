"""Schemathesis against the server's own OpenAPI schema (quick profile): every generated request,
valid or not, gets an answer that is not a 5xx, and the server keeps serving."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from servers import VARIANT, start_server

MAX_EXAMPLES = 12  # per operation; `make test-full` is no bigger: the model's answers bound the time


@pytest.fixture(scope="module")
def fuzz_server(workspace, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    srv = start_server(workspace, log, "--max_tokens_limit", "4", "--max_prompt_tokens", "256",
                       "--max_body_bytes", "65536", variants=(VARIANT,))
    yield srv
    srv.stop()


def test_no_server_errors_under_schemathesis(fuzz_server, tmp_path):
    st = Path(sys.executable).with_name("st")
    report = tmp_path / "junit.xml"
    proc = subprocess.run([str(st), "run", f"{fuzz_server.url}/openapi.json", "--checks", "not_a_server_error",
                           "--max-examples", str(MAX_EXAMPLES), "--report", "junit",
                           "--report-junit-path", str(report), "--no-color"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"schemathesis found server errors:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    ok = httpx.get(f"{fuzz_server.url}/v2/health/ready", timeout=30)
    assert ok.status_code == 200, "the server is still ready after fuzzing"
