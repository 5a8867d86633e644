"""The real server with tenant keys: identity from the key, priority capped at the tenant's ceiling (as
admission sees it: the metrics count it there), quotas under a noisy tenant beside a quiet one, and the
admin key on the routes that change what serves. Open mode's start-up warning and its refusal to listen
beyond loopback are checked here too."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import PROJECT, start_server

QUIET, NOISY = "quiet-" + "q" * 30, "noisy-" + "n" * 30
BODY = {"model": "fp32", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
        "temperature": 0}


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    keys = d / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {"quiet": {"keys": [QUIET], "max_priority": "high"},
                                            "noisy": {"keys": [NOISY], "max_priority": "normal",
                                                      "max_concurrent": 2, "rate": None}}}))
    keys.chmod(0o600)
    srv = start_server(workspace, d / "server.log", "--keys", str(keys), "--request_log", str(d / "requests.jsonl"),
                       variants=("fp32",))
    srv.request_log = d / "requests.jsonl"
    yield srv
    srv.stop()


def _chat(server, key: str | None, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/openai/v1/chat/completions", json=BODY, headers={**auth, **headers}, timeout=120)


def test_start_up_lists_tenants_and_is_not_open(server):
    log = server.logs(20000)
    assert "tenant noisy: priority up to normal, no rate limit, 2 in flight" in log, log[-3000:]
    assert "OPEN" not in log


def test_requests_need_a_key_and_are_logged_under_its_tenant(server):
    r = _chat(server, None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    r = _chat(server, NOISY, **{"x-costopt-tenant": "quiet"})
    assert r.status_code == 200, r.text
    rows = [json.loads(line) for line in server.request_log.read_text().splitlines()]
    assert rows[-1]["tenant"] == "noisy", f"the key names the tenant, not the header: {rows[-1]}"


def _ok_count(server, priority: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    fam = {f.name: f for f in text_string_to_metric_families(text)}["costopt_requests"]
    return sum(s.value for s in fam.samples if s.name.endswith("_total") and s.labels.get("priority") == priority
               and s.labels.get("outcome") == "ok" and s.labels.get("variant") == "fp32")


def test_a_claimed_high_priority_is_served_at_the_ceiling(server):
    high, normal = _ok_count(server, "high"), _ok_count(server, "normal")
    r = _chat(server, NOISY, **{"x-costopt-priority": "high"})
    assert r.status_code == 200 and r.headers["x-costopt-priority-granted"] == "normal", r.headers
    assert (_ok_count(server, "high"), _ok_count(server, "normal")) == (high, normal + 1), \
        "admission served it as normal, not high"
    r = _chat(server, QUIET, **{"x-costopt-priority": "high"})
    assert r.headers["x-costopt-priority-granted"] == "high" and _ok_count(server, "high") == high + 1


def test_a_noisy_tenant_is_held_to_its_quota_and_the_quiet_one_is_served(server):
    """Twelve noisy requests at once beside quiet ones: noisy never has more than its 2 in flight (the
    rest get 429 + Retry-After), every quiet request is answered."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        noisy = [pool.submit(_chat, server, NOISY) for _ in range(12)]
        quiet = [pool.submit(_chat, server, QUIET) for _ in range(3)]
        noisy, quiet = [f.result() for f in noisy], [f.result() for f in quiet]
    assert [r.status_code for r in quiet] == [200] * 3, [r.text for r in quiet if r.status_code != 200]
    refused = [r for r in noisy if r.status_code == 429]
    assert all(r.status_code in (200, 429) for r in noisy), [r.text for r in noisy]
    assert len(refused) >= 6, f"at most 2 noisy requests run at once; {len(refused)} of 12 refused"
    assert all(r.headers["retry-after"] == "1" and "2 requests in flight" in r.text for r in refused), refused[0].text
    assert _chat(server, NOISY).status_code == 200, "the slots came back"


def test_admin_routes_need_the_admin_key(server):
    url = f"{server.url}/v2/repository/models/fp32/load"
    assert httpx.post(url, timeout=30).status_code == 401
    r = httpx.post(url, headers={"Authorization": f"Bearer {QUIET}"}, timeout=30)
    assert r.status_code == 403 and "quiet" in r.text, r.text
    r = httpx.post(url, headers=server.admin_headers, timeout=300)
    assert r.status_code == 200, r.text
    assert _chat(server, QUIET).status_code == 200, "the reloaded variant serves"


def test_open_mode_refuses_to_listen_beyond_loopback(workspace):
    proc = subprocess.run([sys.executable, "-m", "serving", "--workspace", str(workspace), "--variants", "fp32",
                           "--host", "0.0.0.0"], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--allow_open" in proc.stderr, proc.stderr[-2000:]
