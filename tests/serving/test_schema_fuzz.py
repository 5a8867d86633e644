"""Schemathesis against the server's own OpenAPI schema (quick profile): every generated request,
valid or not, gets an answer that is not a 5xx, and the server keeps serving.

Two runs: one where the fuzzer invents model names (mostly 404s, but every body parser and header check
is reached), and one pinned to the served variant's name so the generated bodies reach the model itself
(OIP v2 infer, v1 predict/explain). The repository routes are left out of the pinned run: they would load
and unload the variant under test. The seed is fixed so that CI is reproducible; set COSTOPT_FUZZ_SEED
to explore others (`make test-full` also raises the example count).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from servers import VARIANT, start_server

MAX_EXAMPLES = {"quick": 12, "full": 40}  # per operation; the model's answers bound the time
SEED = os.environ.get("COSTOPT_FUZZ_SEED", "20261126")


@pytest.fixture(scope="module")
def fuzz_server(workspace, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    srv = start_server(workspace, log, "--max_tokens_limit", "4", "--max_prompt_tokens", "256",
                       "--max_body_bytes", "65536", variants=(VARIANT,))
    yield srv
    srv.stop()


def _schemathesis(server, tmp_path: Path, request, *extra: str) -> None:
    st = Path(sys.executable).with_name("st")
    profile = "quick" if "not slow" in (request.config.getoption("-m") or "") else "full"
    proc = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                           "--max-examples", str(MAX_EXAMPLES[profile]), "--seed", SEED, "--no-color",
                           "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"), *extra],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, (f"schemathesis (seed {SEED}) found server errors:\n{proc.stdout[-6000:]}\n"
                                  f"{proc.stderr[-2000:]}\nserver log:\n{server.logs()[-3000:]}")
    ok = httpx.get(f"{server.url}/v2/health/ready", timeout=30)
    assert ok.status_code == 200, "the server is still ready after fuzzing"


def test_no_server_errors_under_schemathesis(fuzz_server, tmp_path, request):
    _schemathesis(fuzz_server, tmp_path, request)


def test_no_server_errors_on_the_served_model(fuzz_server, tmp_path, request):
    (tmp_path / "schemathesis.toml").write_text(f'[parameters]\n"model_name" = "{VARIANT}"\n')
    _schemathesis(fuzz_server, tmp_path, request, "--exclude-path-regex", "repository")
