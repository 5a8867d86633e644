"""The gateway (semantic cache) as users meet it: a real `python -m serving.gateway` in front of a real
`python -m serving` on loopback, with the real embedder, a calibration made once for the module."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from servers import VARIANT, start_server
from costopt.deploy.processes import start_gateway

ALPHA, BETA = "key-alpha-0123456789abcdef", "key-beta-0123456789abcdef0"


def chat(content: str, **kw) -> dict:
    return {"model": "fp32", "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": content}],
            **kw}


def sse_text(raw: str) -> tuple[str, str | None, bool]:
    """(text, finish reason, saw [DONE]) of an SSE body."""
    text, finish, done = "", None, False
    for line in raw.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: {"):
            for c in json.loads(line[6:]).get("choices", []):
                text += c["delta"].get("content") or ""
                finish = c.get("finish_reason") or finish
    return text, finish, done


@pytest.fixture(scope="module")
def predictor(workspace, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"tenants:\n  alpha:\n    keys: [{ALPHA}]\n  beta:\n    keys: [{BETA}]\n")
    keys.chmod(0o600)
    srv = start_server(workspace, tmp_path_factory.mktemp("pred") / "server.log", "--keys", str(keys),
                       "--max_tokens_limit", "64", variants=("fp32", VARIANT))
    srv.keys_file = keys
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def calibration(calibration_file) -> Path:
    return calibration_file


@pytest.fixture(scope="module")
def gateway(workspace, predictor, calibration, tmp_path_factory):
    d = tmp_path_factory.mktemp("gw")
    gw = start_gateway(workspace, predictor.url, ("fp32", VARIANT), d / "gateway.log",
                       ("--keys", str(predictor.keys_file), "--calibration", str(calibration),
                        "--cache_dir", str(d / "l2")))
    gw.http = httpx.Client(base_url=gw.url, timeout=120, trust_env=False)
    yield gw
    gw.http.close()
    gw.stop()


def post(gw, body: dict, key: str = ALPHA, **kw) -> httpx.Response:
    return gw.http.post("/openai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, **kw)


def test_repeat_and_paraphrase_hit_near_miss_does_not(gateway):
    first = post(gateway, chat("What is the capital of France?"))
    assert first.status_code == 200 and first.headers["x-costopt-cache"] == "miss", first.headers
    assert first.headers["x-costopt-variant"] == "fp32"
    again = post(gateway, chat("What is the capital of France?"))
    assert again.headers["x-costopt-cache"] == "hit-l1", again.headers
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert again.json()["usage"] == first.json()["usage"], "the cached answer reports the original usage"
    para = post(gateway, chat("Could you tell me the capital of France?"))
    assert para.headers["x-costopt-cache"] == "hit-l1", "a politeness wrapper is the same question"
    near = post(gateway, chat("What is the capital of Spain?"))
    assert near.headers["x-costopt-cache"] == "miss", "another country must never be served France's answer"
    other = post(gateway, chat("What is the capital of France?", max_tokens=13))
    assert other.headers["x-costopt-cache"] == "miss", "max_tokens is part of the key"


def test_sampled_requests_bypass_the_cache(gateway):
    r = post(gateway, chat("Name a fruit.", temperature=0.7, seed=1))
    assert r.status_code == 200 and r.headers["x-costopt-cache"] == "bypass"


def test_tenants_never_share_answers_and_purge_their_own(gateway):
    q = chat("Give one tip for sleeping well.")
    assert post(gateway, q, ALPHA).headers["x-costopt-cache"] == "miss"
    assert post(gateway, q, ALPHA).headers["x-costopt-cache"] == "hit-l1"
    assert post(gateway, q, BETA).headers["x-costopt-cache"] == "miss", "beta must not see alpha's entry"
    r = gateway.http.post("/v2/cache/purge", headers={"Authorization": f"Bearer {ALPHA}"})
    assert r.status_code == 200 and r.json()["tenant"] == "alpha" and r.json()["removed"]["l1"] >= 1, r.text
    assert post(gateway, q, ALPHA).headers["x-costopt-cache"] == "miss", "purged"
    assert post(gateway, q, BETA).headers["x-costopt-cache"] == "hit-l1", "beta's entry survives alpha's purge"
    r = gateway.http.post("/v2/cache/purge?tenant=beta", headers={"Authorization": f"Bearer {ALPHA}"})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"], r.text
    r = gateway.http.post("/v2/cache/purge?tenant=beta", headers={"Authorization": f"Bearer {gateway.admin_key}"})
    assert r.status_code == 200 and r.json()["removed"]["l1"] >= 1, r.text
    assert gateway.http.post("/openai/v1/chat/completions", json=q).status_code == 401, "no key, no answer"


def test_streamed_replay_equals_the_original_stream(gateway):
    body = chat("Name a color.", stream=True, stream_options={"include_usage": True})
    first = post(gateway, body)
    assert first.headers["x-costopt-cache"] == "miss"
    second = post(gateway, body)
    assert second.headers["x-costopt-cache"] == "hit-l1", second.headers
    a, b = sse_text(first.text), sse_text(second.text)
    assert a == b and a[2], f"replay {b} differs from the original {a}"
    assert '"usage"' in second.text, "the replay sends the usage chunk the client asked for"
    plain = post(gateway, chat("Name a color."))
    assert plain.headers["x-costopt-cache"] == "hit-l1" and plain.json()["choices"][0]["message"]["content"] == a[0]
    no_usage = post(gateway, chat("Name an animal.", stream=True))
    assert '"usage"' not in no_usage.text, "usage is sent only to a client that asked for it"


def test_a_cut_off_stream_is_never_stored(gateway):
    body = chat("Write a long story about a dragon.", stream=True, max_tokens=48)
    with gateway.http.stream("POST", "/openai/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {ALPHA}"}) as r:
        assert r.headers["x-costopt-cache"] == "miss"
        next(r.iter_bytes())  # one chunk, then the client goes away
    again = post(gateway, chat("Write a long story about a dragon.", stream=True, max_tokens=48))
    assert again.headers["x-costopt-cache"] == "miss", "a cancelled generation must not be served later"
    assert post(gateway, chat("Write a long story about a dragon.", max_tokens=48)).headers["x-costopt-cache"] == "hit-l1"
    bad = post(gateway, chat("Name a planet.", max_tokens=10_000))
    assert bad.status_code == 400 and bad.headers["x-costopt-cache"] == "miss", bad.text
    assert post(gateway, chat("Name a planet.", max_tokens=10_000)).status_code == 400, "an error is never cached"


def test_ready_details_and_v2_pass_through(gateway):
    r = gateway.http.get("/v2/health/ready")
    details = r.json()["details"]
    assert r.status_code == 200 and details["cache"]["enabled"] and details["predictor"]["ready"], r.text
    assert details["cache"]["stats"]["hit_l1"] >= 1
    r = gateway.http.get(f"/v2/models/{VARIANT}/ready")
    assert r.status_code == 200, r.text
    models = gateway.http.get("/openai/v1/models", headers={"Authorization": f"Bearer {ALPHA}"})
    assert models.status_code == 200 and {m["id"] for m in models.json()["data"]} >= {"fp32", VARIANT}


def test_a_broken_embedder_means_no_cache_not_no_service(workspace, predictor, tmp_path):
    empty = tmp_path / "no-model"
    empty.mkdir()
    gw = start_gateway(workspace, predictor.url, ("fp32",), tmp_path / "gw.log",
                       ("--keys", str(predictor.keys_file), "--embedder_dir", str(empty),
                        "--cache_dir", str(tmp_path / "l2")))
    try:
        with httpx.Client(base_url=gw.url, timeout=120, trust_env=False) as http:
            ready = http.get("/v2/health/ready").json()
            cache = ready["details"]["cache"]
            assert cache["enabled"] is False and "embedding model unavailable" in cache["reason"], ready
            r = http.post("/openai/v1/chat/completions", json=chat("Name a river."),
                          headers={"Authorization": f"Bearer {ALPHA}"})
            assert r.status_code == 200 and r.headers["x-costopt-cache"] == "bypass", r.headers
        assert "WITHOUT the semantic cache" in gw.logs(), "the log says the cache is off"
    finally:
        gw.stop()


def test_an_unreachable_l3_is_counted_and_never_fails_a_request(workspace, predictor, calibration, tmp_path):
    from costopt.deploy.processes import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(workspace, predictor.url, ("fp32",), tmp_path / "gw.log",
                       ("--keys", str(predictor.keys_file), "--calibration", str(calibration),
                        "--cache_dir", str(tmp_path / "l2"), "--l3", "s3://cache/entries", "--s3_endpoint", dead))
    try:
        with httpx.Client(base_url=gw.url, timeout=120, trust_env=False) as http:
            for want in ("miss", "hit-l1"):
                r = http.post("/openai/v1/chat/completions", json=chat("Name a mountain."),
                              headers={"Authorization": f"Bearer {ALPHA}"})
                assert r.status_code == 200 and r.headers["x-costopt-cache"] == want, (want, r.headers)
            stats = http.get("/v2/health/ready").json()["details"]["cache"]["stats"]
            assert stats.get("l3_errors", 0) >= 1, f"the S3 failures are counted: {stats}"
    finally:
        gw.stop()


def test_identical_requests_in_flight_are_generated_once(gateway):
    """Exact repeats that arrive while the first is generating wait for it and are served its answer."""
    from concurrent.futures import ThreadPoolExecutor

    body = chat("List three rivers in Europe.", max_tokens=24)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(gateway, body), range(4)))
    outcomes = sorted(r.headers["x-costopt-cache"] for r in replies)
    assert outcomes == ["hit-l1", "hit-l1", "hit-l1", "miss"], outcomes
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1, f"every waiting request got the one generated answer: {texts}"


def test_token_id_prompts_and_log_probs_bypass_the_cache(gateway, workspace):
    """The cache matches text and replays no log-probs: such requests go to the predictor, uncached."""
    ids = gateway.http.post("/openai/v1/completions", headers={"Authorization": f"Bearer {ALPHA}"}, json={
        "model": "fp32", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
        "return_token_ids": True})
    assert ids.status_code == 200 and ids.headers["x-costopt-cache"] == "bypass", (ids.status_code, ids.text)
    prompt = ids.json()["choices"][0]["prompt_token_ids"]
    for body in ({"prompt": prompt}, {"prompt": "The capital of France is", "logprobs": 0}):
        r = gateway.http.post("/openai/v1/completions", headers={"Authorization": f"Bearer {ALPHA}"},
                              json={"model": "fp32", "max_tokens": 4, "temperature": 0, **body})
        assert r.status_code == 200 and r.headers["x-costopt-cache"] == "bypass", (body, r.status_code, r.text)
