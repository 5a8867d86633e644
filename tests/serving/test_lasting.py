"""The lasting deployment (`costopt.deploy.lasting`) on loopback: started detached, updated by a later
promote (a canary of the new pick), untouched by a failed one, stopped by `stop`."""
from __future__ import annotations

import os

import httpx
import pytest

from costopt.deploy import lasting
from costopt.deploy.processes import DeployError
from servers import GGUF_VARIANT, VARIANT

CANARY = {"share": 0.5, "shadow_sample": 1.0, "min_judged": 5}


def _ask(url: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
        return http.post("/openai/v1/chat/completions", json={
            "model": "assistant", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})


def test_promote_starts_updates_and_stops_the_deployment(workspace):
    lasting.stop(workspace)
    try:
        first = lasting.promote(workspace, ["fp32", VARIANT], VARIANT, "assistant", 0, 0, CANARY,
                                gateway_flags=["--no_cache"], fingerprints={VARIANT: "a"})
        assert first["action"] == "started" and first["current"] == VARIANT, first
        state = lasting.status(workspace)
        assert state["running"], state
        pids = [state["predictor"]["pid"], state["gateway"]["pid"]]
        assert all(os.getpgid(p) == p for p in pids), "each server runs in a session of its own: it outlives its parent"
        r = _ask(first["gateway_url"])
        assert r.status_code == 200 and r.headers["x-costopt-variant"] == VARIANT, r.text

        same = lasting.promote(workspace, ["fp32", VARIANT], VARIANT, "assistant", 0, 0, CANARY,
                               fingerprints={VARIANT: "a"})
        assert same["action"] == "unchanged" and same["loaded"] == [], same

        with pytest.raises(DeployError, match="serves as before"):
            lasting.promote(workspace, ["fp32", VARIANT, "no_such_variant"], "no_such_variant", "assistant", 0, 0,
                            CANARY)
        assert _ask(first["gateway_url"]).headers["x-costopt-variant"] == VARIANT, "a failed deploy changed nothing"

        second = lasting.promote(workspace, ["fp32", VARIANT, GGUF_VARIANT], GGUF_VARIANT, "assistant", 0, 0, CANARY)
        assert second["action"] == "canary started" and second["canary"] == GGUF_VARIANT, second
        assert second["current"] == VARIANT and second["loaded"] == [GGUF_VARIANT], second
        seen = {_ask(first["gateway_url"]).headers["x-costopt-variant"] for _ in range(12)}
        assert GGUF_VARIANT in seen, f"the canary takes its share of the deployment's requests: {seen}"
    finally:
        stopped = lasting.stop(workspace)
    assert stopped == ["gateway", "predictor"], stopped
    assert lasting.status(workspace) is None
    assert not any(lasting._alive(p) for p in pids), "both servers exited"
