"""The served cost: the serving trace replayed on a real continuous-batching engine (tiny random Llama)."""
import pytest
import torch

from costopt.evaluation.served import chat_ids, replay, serving_requests
from costopt.runtimes.engine import Engine


class _Template:
    """A tokenizer stand-in with a chat template: characters -> ids in the tiny model's vocabulary."""
    eos_token_id = 2

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [3 + ord(c) % 90 for c in text[:40]]


def test_replay_serves_every_request_and_counts_its_tokens(tiny_llama):
    requests = [([5 + i, 6, 7, 8][: 2 + i % 3], 3 + i % 4) for i in range(10)]
    engine = Engine(tiny_llama, eos_token_ids=[], max_batch=4, max_len=32)
    with torch.inference_mode():
        out = replay(engine, requests, concurrency=3, stop_ids=[])
    assert out["requests"] == 10 and out["concurrency"] == 3, f"replay record {out}"
    want_tokens = sum(n for _, n in requests)  # no stop ids: every request runs to max_tokens
    assert out["generated_tokens"] == want_tokens, f"{out['generated_tokens']} tokens, expected {want_tokens}"
    assert out["throughput_req_s"] * out["machine_seconds_per_request"] == pytest.approx(1, rel=0.01), \
        "machine-seconds per request is wall / requests, the inverse of requests/s"
    assert 0 < out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"] <= out["seconds"] * 1000, f"latencies {out}"
    assert not engine.has_work() and engine.running == 0, "the replay leaves the engine empty"


def test_replay_stops_at_the_stop_ids_and_checks_concurrency(tiny_llama):
    engine = Engine(tiny_llama, eos_token_ids=[], max_batch=2, max_len=32)
    with pytest.raises(ValueError, match=r"concurrency: 3; must be in \[1, 2\]"):
        replay(engine, [([5], 4)], concurrency=3, stop_ids=[])
    with pytest.raises(ValueError, match="no requests"):
        replay(engine, [], concurrency=1, stop_ids=[])
    every_token = list(range(96))  # any token stops: one token per request
    out = replay(engine, [([5, 6], 8)] * 4, concurrency=2, stop_ids=every_token)
    assert out["generated_tokens"] == 4, f"4 requests x 1 token (each stops at its first): {out}"


def test_serving_requests_come_from_the_versioned_trace():
    reqs, meta = serving_requests(_Template(), 6, seed=11)
    again, _ = serving_requests(_Template(), 8, seed=11)
    assert meta["name"] == "serving-v1" and meta["requests"] == 6, f"trace metadata {meta}"
    assert reqs == again[:6], "a shorter replay is a prefix of a longer one (same seed)"
    assert all(ids and 1 <= n <= 96 for ids, n in reqs), f"(prompt ids, max_tokens) pairs {reqs}"
    assert chat_ids(_Template(), [{"role": "user", "content": "hi"}]) == reqs[0][0][:0] + \
        _Template().apply_chat_template([{"role": "user", "content": "hi"}], True, True), "ids as the template gives"
