"""Precision routing through the gateway, as users meet it: a real predictor serving INT8 and fp32, a
real gateway with a router file, answers checked token for token against the tiers asked directly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from servers import VARIANT, start_server
from costopt.deploy.processes import start_gateway

PROMPT = "Name three rivers in Europe and say which country each flows through."


@pytest.fixture(scope="module")
def predictor(workspace, tmp_path_factory):
    srv = start_server(workspace, tmp_path_factory.mktemp("pred") / "server.log", "--max_tokens_limit", "64",
                       variants=("fp32", VARIANT))
    srv.http = httpx.Client(base_url=srv.url, timeout=120, trust_env=False)
    yield srv
    srv.http.close()
    srv.stop()


@pytest.fixture(scope="module")
def tok(workspace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(workspace / "artifacts" / "model"), local_files_only=True)


def prompt_ids(tok) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def direct(predictor, model: str, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """A tier's own greedy continuation of `ids`, with each token's probability."""
    r = predictor.http.post("/openai/v1/completions", json={
        "model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], [math.exp(lp) for lp in choice["logprobs"]["token_logprobs"]]


def gateway(workspace, predictor, tmp_path: Path, tiers: list[tuple[str, float | None]] | None,
            variants=("fp32", VARIANT), fallback: str | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    flags = ["--no_cache"]
    if tiers is not None:
        router = tmp_path / "router.json"
        router.write_text(json.dumps({"format": 1, "model": "routed", "tiers": [
            {"name": n, "cost_per_1m_requests_usd": float(i), "threshold": t} for i, (n, t) in enumerate(tiers)]}))
        flags += ["--router", str(router)]
    if fallback:
        flags += ["--router", str(tmp_path / "missing.json"), "--router_fallback", fallback]
    gw = start_gateway(workspace, predictor.url, variants, tmp_path / "gateway.log", flags)
    gw.http = httpx.Client(base_url=gw.url, timeout=120, trust_env=False)
    return gw


def ask(gw, n: int = 24, **kw) -> httpx.Response:
    return gw.http.post("/openai/v1/chat/completions", json={
        "model": "routed", "temperature": 0, "max_tokens": n, "messages": [{"role": "user", "content": PROMPT}], **kw})


def streamed_text(r: httpx.Response) -> tuple[str, dict]:
    text, route = "", {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            for c in event.get("choices", []):
                text += c["delta"].get("content") or ""
            route = event.get("costopt_route") or route
    return text, route


def test_an_escalated_answer_is_the_cheap_prefix_then_the_reference_continuation(workspace, predictor, tok, tmp_path):
    n = 24
    ids = prompt_ids(tok)
    cheap, probs = direct(predictor, VARIANT, ids, n)
    # a threshold that escalates exactly at the first token less likely than every token before it
    k = next(i for i in range(1, len(probs)) if probs[i] < min(probs[:i]))
    threshold = (probs[k] + min(probs[:k])) / 2
    rest, _ = direct(predictor, "fp32", ids + cheap[:k], n - k)
    expected = tok.decode(cheap[:k] + rest, skip_special_tokens=True)
    gw = gateway(workspace, predictor, tmp_path, [(VARIANT, threshold), ("fp32", None)])
    try:
        r = ask(gw, n)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected, "cheap prefix + fp32's continuation"
        assert r.headers["x-costopt-variant"] == f"{VARIANT},fp32" and r.headers["x-costopt-escalations"] == "1"
        s = ask(gw, n, stream=True)
        text, route = streamed_text(s)
        assert text == expected and route == {"tiers": [VARIANT, "fp32"], "escalations": 1}, (text, route)
        models = gw.http.get("/openai/v1/models").json()
        assert any(m["id"] == "routed" for m in models["data"]), models
    finally:
        gw.stop()


def test_a_confident_tier_answers_alone_and_an_unsure_one_hands_over_at_once(workspace, predictor, tok, tmp_path):
    n = 16
    ids = prompt_ids(tok)
    cheap, _ = direct(predictor, VARIANT, ids, n)
    best, _ = direct(predictor, "fp32", ids, n)
    for threshold, want, tiers, escalations in ((0.0, cheap, VARIANT, "0"), (1.0, best, "fp32", "1")):
        gw = gateway(workspace, predictor, tmp_path / str(threshold), [(VARIANT, threshold), ("fp32", None)])
        try:
            r = ask(gw, n)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
            assert (r.headers["x-costopt-variant"], r.headers["x-costopt-escalations"]) == (tiers, escalations)
        finally:
            gw.stop()


def test_a_tier_that_is_down_is_skipped_never_failing_the_request(workspace, predictor, tok, tmp_path):
    """`ghost` is in the router but not served (404): skipped, counted, the next tier answers."""
    n = 12
    ids = prompt_ids(tok)
    cheap, _ = direct(predictor, VARIANT, ids, n)
    gw = gateway(workspace, predictor, tmp_path, [("ghost", 0.0), (VARIANT, 0.0), ("fp32", None)],
                 variants=("fp32", VARIANT, "ghost"))
    try:
        r = ask(gw, n)
        assert r.status_code == 200 and r.headers["x-costopt-variant"] == VARIANT, (r.status_code, r.headers)
        assert r.json()["choices"][0]["message"]["content"] == tok.decode(cheap, skip_special_tokens=True)
        metrics = gw.http.get("/metrics").text
        assert 'costopt_gateway_router_skips_total{tier="ghost"} 1.0' in metrics, "the skip is counted"
    finally:
        gw.stop()


def test_without_thresholds_everything_goes_to_the_fallback_and_the_log_says_so(workspace, predictor, tok, tmp_path):
    gw = gateway(workspace, predictor, tmp_path, None, fallback="fp32")
    try:
        r = ask(gw, 8)
        assert r.status_code == 200 and r.headers["x-costopt-variant"] == "fp32", r.headers
        assert "routing everything to fp32" in gw.logs(10**7), gw.logs()
    finally:
        gw.stop()


def test_what_routing_cannot_honour_is_refused_naming_the_field(workspace, predictor, tmp_path):
    gw = gateway(workspace, predictor, tmp_path, [(VARIANT, 0.5), ("fp32", None)])
    try:
        for extra, field in (({"stop": ["\n"]}, "stop"), ({"logprobs": True}, "logprobs")):
            r = ask(gw, 8, **extra)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    finally:
        gw.stop()
