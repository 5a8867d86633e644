"""The quality-judged canary on loopback, as an operator meets it: a real predictor, a real gateway with a
deployment name, the admin routes; a worse canary (the seed paper's one-line quantization) rolled back
with zero failed client requests, a canary whose variant disappears rolled back on its errors, and the
predictor's shadow judgement route."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from servers import VARIANT, phase, start_server
from costopt.deploy.processes import start_gateway

WORSE = "dynamic_qint8_naive"  # the seed paper's quantize_dynamic one-liner: KL ~1.7 nats/token against fp32
DEPLOYMENT = "assistant"
QUESTIONS = ["Name a river in Europe.", "What is the capital of Japan?", "Give one tip for sleeping well.",
             "Write a short greeting for a colleague.", "What is 12 plus 30?", "Name two kinds of trees.",
             "Say something kind about cats.", "What colour is the sky on a clear day?"]


@pytest.fixture(scope="module")
def predictor(workspace, tmp_path_factory):
    phase(workspace, "tasks.quantize", "--variant", WORSE)
    srv = start_server(workspace, tmp_path_factory.mktemp("pred") / "server.log", "--max_tokens_limit", "64",
                       variants=(VARIANT, WORSE, "fp32"))
    srv.http = httpx.Client(base_url=srv.url, timeout=120, trust_env=False)
    yield srv
    srv.http.close()
    srv.stop()


@pytest.fixture()
def gateway(workspace, predictor, tmp_path):
    gw = start_gateway(workspace, predictor.url, (VARIANT, WORSE, "fp32"), tmp_path / "gateway.log",
                       ["--no_cache", "--deployment", DEPLOYMENT, "--current", VARIANT,
                        "--rollout_state", str(tmp_path / "rollout.json"), "--rollout_seed", "7"])
    gw.http = httpx.Client(base_url=gw.url, timeout=120, trust_env=False)
    gw.state = tmp_path / "rollout.json"
    yield gw
    gw.http.close()
    gw.stop()


def ask(gw, i: int, stream: bool = False) -> httpx.Response:
    return gw.http.post("/openai/v1/chat/completions", json={
        "model": DEPLOYMENT, "temperature": 0, "max_tokens": 16, "stream": stream,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})


def rollout(gw) -> dict:
    r = gw.http.get("/v2/rollout", headers=gw.admin_headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_compare_route_judges_answers_and_is_admin_only(predictor):
    body = {"reference": VARIANT, "candidate": VARIANT, "messages": [{"role": "user", "content": "Hello!"}],
            "answer": "Hello! How can I help you today?"}
    assert predictor.http.post("/v2/compare", json=body).status_code == 401, "shadow judgements need the admin key"
    r = predictor.http.post("/v2/compare", json=body, headers=predictor.admin_headers)
    assert r.status_code == 200, r.text
    same = r.json()
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0, same
    worse = predictor.http.post("/v2/compare", json={**body, "candidate": WORSE}, headers=predictor.admin_headers).json()
    assert worse["kl_mean"] > 0.1 and worse["tokens"] == same["tokens"] > 3, worse
    bad = predictor.http.post("/v2/compare", json={**body, "candidate": "nope"}, headers=predictor.admin_headers)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "candidate", bad.text
    bad = predictor.http.post("/v2/compare", json={**body, "answer": 3}, headers=predictor.admin_headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "answer", bad.text


def test_a_worse_canary_is_rolled_back_with_zero_failed_requests(gateway):
    gw = gateway
    assert gw.http.get("/v2/rollout").status_code == 401, "the rollout is the admin's"
    r = gw.http.post("/v2/rollout/canary", headers=gw.admin_headers,
                     json={"candidate": WORSE, "share": 0.5, "shadow_sample": 1.0, "min_judged": 5})
    assert r.status_code == 200, r.text
    again = gw.http.post("/v2/rollout/canary", headers=gw.admin_headers, json={"candidate": "fp32"})
    assert again.status_code == 409, again.text
    answered_by, failed = [], []
    for i in range(60):
        resp = ask(gw, i, stream=i % 3 == 0)
        if resp.status_code != 200 or '"error"' in resp.text:
            failed.append((resp.status_code, resp.text[:200]))
        answered_by.append(resp.headers.get("x-costopt-variant"))
        state = rollout(gw)
        if state["canary"] is None:
            break
    assert not failed, f"client requests failed during the canary: {failed}"
    assert state["canary"] is None and state["current"] == VARIANT, state
    last = state["history"][-1]
    assert last["verdict"] == "rollback" and last["candidate"] == WORSE, last
    assert "gate failed" in last["reason"] and ("kl" in last["reason"] or "top1" in last["reason"]), last["reason"]
    assert WORSE in answered_by, "the canary never took a request"
    assert last["evidence"]["judged"] >= 1
    after = [ask(gw, i).headers.get("x-costopt-variant") for i in range(4)]
    assert after == [VARIANT] * 4, f"after the rollback the current variant serves everything: {after}"
    assert json.loads(gw.state.read_text())["current"] == VARIANT


def test_a_canary_whose_variant_goes_away_is_rolled_back_without_failing_clients(gateway, predictor):
    gw = gateway
    r = gw.http.post("/v2/rollout/canary", headers=gw.admin_headers,
                     json={"candidate": "fp32", "share": 0.6, "shadow_sample": 1.0, "error_rate_max": 0.05})
    assert r.status_code == 200, r.text
    unloaded = predictor.http.post("/v2/repository/models/fp32/unload", headers=predictor.admin_headers)
    assert unloaded.status_code == 200, unloaded.text
    try:
        results: list[httpx.Response] = []

        def client(k: int) -> None:
            for i in range(k, 40, 2):
                results.append(ask(gw, i, stream=i % 4 == 0))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = [(x.status_code, x.text[:200]) for x in results if x.status_code != 200 or '"error"' in x.text]
        assert not bad, f"clients saw failures while the canary's variant was gone: {bad}"
        state = rollout(gw)
        assert state["canary"] is None and state["history"][-1]["verdict"] == "rollback", state
        assert "errors" in state["history"][-1]["reason"], state["history"][-1]["reason"]
        assert state["current"] == VARIANT
    finally:
        predictor.http.post("/v2/repository/models/fp32/load", headers=predictor.admin_headers, timeout=300)


def test_the_deployment_survives_a_gateway_restart(workspace, predictor, tmp_path):
    state = tmp_path / "rollout.json"
    flags = ["--no_cache", "--deployment", DEPLOYMENT, "--current", VARIANT, "--rollout_state", str(state)]
    gw = start_gateway(workspace, predictor.url, (VARIANT, "fp32"), tmp_path / "g1.log", flags)
    try:
        with httpx.Client(base_url=gw.url, timeout=120, trust_env=False) as http:
            r = http.post("/v2/rollout", json={"current": "fp32"}, headers=gw.admin_headers)
            assert r.status_code == 200 and r.json()["current"] == "fp32", r.text
            bad = http.post("/v2/rollout", json={"current": "missing"}, headers=gw.admin_headers)
            assert bad.status_code == 404 and bad.json()["error"]["param"] == "current", bad.text
    finally:
        gw.stop()
    gw = start_gateway(workspace, predictor.url, (VARIANT, "fp32"), tmp_path / "g2.log", flags)
    try:
        with httpx.Client(base_url=gw.url, timeout=120, trust_env=False) as http:
            r = http.post("/openai/v1/chat/completions", json={
                "model": DEPLOYMENT, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.headers["x-costopt-variant"] == "fp32", (r.status_code, r.headers)
            models = [m["id"] for m in http.get("/openai/v1/models").json()["data"]]
            assert DEPLOYMENT in models, models
    finally:
        gw.stop()
