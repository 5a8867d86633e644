"""The deploy phase's choice of variants: fp32 plus the requested ones that passed their gates."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from costopt.storage.layout import Workspace
from costopt.params import Params, ServeParams
from costopt.deploy.processes import first_traceback, serving_python
from tasks.deploy import DeployError, check_load_test, choose_variants


def _ws(root: Path, picked: str | None, verdicts: dict[str, bool]) -> Workspace:
    ws = Workspace(root)
    ws.search_dir.mkdir(parents=True)
    (ws.search_dir / "search.json").write_text(json.dumps({"picked": picked}))
    (ws.search_dir / "gates.json").write_text(json.dumps({"variants": {
        n: {"passed": ok, "reasons": [] if ok else ["kl_mean = 0.3 > kl_mean_max = 0.02"]} for n, ok in verdicts.items()}}))
    return ws


def _params(*variants: str) -> Params:
    return dataclasses.replace(Params(), serve=ServeParams(variants=variants))


def test_serves_fp32_the_pick_and_passing_variants(tmp_path):
    ws = _ws(tmp_path, "mixed_x", {"mixed_x": True, "int8_weight_only": True, "int4_rtn_g64": False})
    chosen, left = choose_variants(_params("picked", "int8_weight_only", "int4_rtn_g64", "int8_static"), ws)
    assert chosen == ["fp32", "mixed_x", "int8_weight_only"], f"fp32 first, then passing ones in order: {chosen}"
    assert "failed its gates" in left["int4_rtn_g64"] and "kl_mean" in left["int4_rtn_g64"], left
    assert "not built" in left["int8_static"], left


def test_no_pick_serves_fp32_and_says_why(tmp_path):
    ws = _ws(tmp_path, None, {"int8_weight_only": False})
    chosen, left = choose_variants(_params("picked", "int8_weight_only"), ws)
    assert chosen == ["fp32"], chosen
    assert "picked nothing" in left["picked"], left


def test_missing_serving_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COSTOPT_SERVING_PYTHON", str(tmp_path / "nope" / "python"))
    try:
        serving_python()
    except DeployError as exc:
        assert "make venv" in str(exc), str(exc)
    else:
        raise AssertionError("a missing serving environment must raise DeployError")


SERVER_LOG = """2026-12-04 09:37:27 INFO: 127.0.0.1 - "POST /openai/v1/chat/completions HTTP/1.1" 200 OK
Traceback (most recent call last):
  File "serving/driver.py", line 204, in _step
    events = await asyncio.get_running_loop().run_in_executor(self._pool, self._work)
  File "costopt/runtimes/slots.py", line 120, in resume
    raise ValueError(f"resume: {seq_id!r} is not paused")
ValueError: resume: 21 is not paused
2026-12-04 09:37:28 INFO: 127.0.0.1 - "POST /openai/v1/chat/completions HTTP/1.1" 500 Internal Server Error
Traceback (most recent call last):
ValueError: a second one
"""


def _run(variant: str, errors: int = 0, lost: int = 0, rejected: int = 0) -> dict:
    return {"variant": variant, "concurrency": 16, "requests": 32, "errors": errors, "lost": lost,
            "rejected": rejected, "error_examples": ["HTTP 500: internal error"] if errors else []}


def test_first_traceback_is_the_first_one_up_to_its_exception_line():
    trace = first_traceback(SERVER_LOG)
    assert trace.startswith("Traceback (most recent call last):")
    assert trace.endswith("ValueError: resume: 21 is not paused") and "a second one" not in trace
    assert first_traceback("all fine\n") is None


def test_a_load_test_with_server_errors_fails_the_deploy_with_the_traceback():
    check_load_test([_run("fp32", rejected=5), _run("gguf_q8_0")], SERVER_LOG)  # 429s are not errors
    try:
        check_load_test([_run("fp32"), _run("gguf_q8_0", errors=5)], SERVER_LOG)
    except DeployError as exc:
        msg = str(exc)
    else:
        raise AssertionError("5 server errors must fail the deploy")
    assert "gguf_q8_0 at concurrency 16: 5 errors, 0 lost of 32" in msg and "HTTP 500" in msg, msg
    assert "ValueError: resume: 21 is not paused" in msg, msg
    try:
        check_load_test([_run("fp32", lost=1)], "no traceback here")
    except DeployError as exc:
        assert "1 lost" in str(exc) and "no traceback" in str(exc), str(exc)
    else:
        raise AssertionError("a lost request must fail the deploy")
