"""Log-probabilities, token ids and token-id prompts through the real server on loopback, real model.

One server serves fp32 (the torch engine) and the GGUF Q8_0 variant (the llama.cpp engine); every test
runs against both. The engine-level arithmetic (log-probs equal log_softmax of a direct forward) is
tests/serving/test_logprobs.py; here: the OpenAI shapes (chat and legacy completions, plain and streamed),
the costopt extensions (`costopt_entropy`, `return_token_ids`), token-id prompts, bad input (400 naming
the field) and requests that ask for none of it (answered as before).
"""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from servers import GGUF_VARIANT, start_server

MODELS = pytest.mark.parametrize("model", ["fp32", GGUF_VARIANT], ids=["torch", "llamacpp"])
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    """Without the llama.cpp prefix cache: a hit computes a prompt's last token in a one-token step,
    whose rounding differs from a whole prefill's, and these tests compare log-probs across requests
    exactly. One thread and a long default deadline: correctness only, on a box other jobs may share
    (two llama.cpp threads stall on each other when one is descheduled; engine docstrings)."""
    log = tmp_path_factory.mktemp("server-logprobs") / "server.log"
    srv = start_server(workspace, log, "--max_tokens_limit", "64", "--max_prompt_tokens", "512",
                       "--prefix_cache", "0", "--threads", "1", "--default_deadline_s", "600",
                       variants=("fp32", GGUF_VARIANT))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(workspace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(workspace / "artifacts" / "model"), local_files_only=True)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/openai/v1/{path}", json=body, timeout=180)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, f"{path} {body}: {r.status_code} {r.text}"
    return r.json()


def stream(server, path: str, body: dict) -> list[dict]:
    """The chunks of a streamed answer (the usage chunk left out)."""
    chunks = []
    with httpx.stream("POST", f"{server.url}/openai/v1/{path}", json={**body, "stream": True}, timeout=180) as r:
        assert r.status_code == 200, f"{path}: {r.status_code} {r.read()}"
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, f"the stream failed: {chunk}"
                if chunk["choices"]:
                    chunks.append(chunk)
    return chunks


def close(a: list[float], b: list[float], tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


@MODELS
def test_chat_logprobs_describe_the_answer_tokens(server, tokenizer, model):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "return_token_ids": True}
    out = ok(server, "chat/completions", body)
    choice = out["choices"][0]
    content, ids = choice["logprobs"]["content"], choice["token_ids"]
    assert len(content) == len(ids) == out["usage"]["completion_tokens"], \
        f"{len(content)} entries, {len(ids)} ids, usage {out['usage']}: one entry per generated token"
    want_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want_prompt = list(want_prompt["input_ids"] if hasattr(want_prompt, "keys") else want_prompt)
    assert choice["prompt_token_ids"] == want_prompt, "prompt_token_ids are the chat-templated prompt"
    assert tokenizer.decode(ids, skip_special_tokens=True) == choice["message"]["content"], "ids decode to the text"
    special = set(tokenizer.all_special_ids)
    text = b"".join(bytes(e["bytes"]) for e, i in zip(content, ids) if i not in special).decode("utf-8")
    assert text == choice["message"]["content"], f"the entries' bytes spell the answer: {text!r}"
    for n, e in enumerate(content):
        top = e["top_logprobs"]
        assert len(top) == 3, f"entry {n}: {len(top)} alternatives, asked for 3"
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True), \
            f"entry {n}: top_logprobs are not most likely first: {top}"
        assert (top[0]["token"], top[0]["logprob"], top[0]["bytes"]) == (e["token"], e["logprob"], e["bytes"]), \
            f"entry {n}: at temperature 0 the chosen token is the most likely one: {e}"
        assert e["logprob"] <= 0 and e["costopt_entropy"] >= 0, f"entry {n}: {e}"
        assert e["costopt_entropy"] >= -e["logprob"] * math.exp(e["logprob"]) - 1e-6, \
            f"entry {n}: the entropy is less than the chosen token's own share of it: {e}"


@MODELS
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_streamed_logprobs_and_token_ids_equal_the_plain_answer(server, model, path):
    chat = path.startswith("chat")
    body = {"model": model, "max_tokens": 20, "temperature": 0, "return_token_ids": True,
            **({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2} if chat else
               {"prompt": PROMPT, "logprobs": 2})}
    plain = ok(server, path, body)["choices"][0]
    chunks = [c["choices"][0] for c in stream(server, path, body)]
    assert chunks[0]["prompt_token_ids"] == plain["prompt_token_ids"], "the first chunk has the prompt's ids"
    assert all("prompt_token_ids" not in c for c in chunks[1:]), "only the first chunk has prompt_token_ids"
    assert [i for c in chunks for i in c["token_ids"]] == plain["token_ids"], "the chunks' ids are the answer's"
    if chat:
        got = [e for c in chunks for e in c["logprobs"]["content"]]
        want = plain["logprobs"]["content"]
        assert [e["token"] for e in got] == [e["token"] for e in want], "the chunks' tokens are the answer's"
        assert close([e["logprob"] for e in got], [e["logprob"] for e in want]), "streamed log-probs differ"
        assert [[t["token"] for t in e["top_logprobs"]] for e in got] == \
               [[t["token"] for t in e["top_logprobs"]] for e in want], "streamed alternatives differ"
        for c in chunks:
            n_text = len(c["delta"].get("content") or "")
            assert c["logprobs"]["content"] or not n_text, f"a chunk with text but no tokens: {c}"
    else:
        want = plain["logprobs"]
        for key in ("tokens", "text_offset"):
            got = [x for c in chunks for x in c["logprobs"][key]]
            assert got == want[key], f"streamed {key} {got} != plain {want[key]}"
        for key in ("token_logprobs", "costopt_entropy"):
            got = [x for c in chunks for x in c["logprobs"][key]]
            assert close(got, want[key]), f"streamed {key} {got} != plain {want[key]}"


@MODELS
def test_completion_logprobs_in_the_legacy_shape(server, model):
    out = ok(server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                     "logprobs": 2})
    choice = out["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    n = out["usage"]["completion_tokens"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset", "costopt_entropy"):
        assert len(lp[key]) == n, f"{key}: {len(lp[key])} values for {n} tokens"
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"]), lp["text_offset"]
    for tok, logprob, top, offset in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]):
        assert tok in top and top[tok] == logprob and len(top) <= 3, f"the chosen token is among {top}"
        assert max(top.values()) == logprob, f"greedy {tok!r} ({logprob}) is the most likely of {top}"
        if "\\x" not in tok and offset < len(text):
            assert text[offset:offset + len(tok)] == tok, f"text_offset {offset} does not point at {tok!r}"


@MODELS
def test_token_id_prompt_gives_the_text_prompts_continuation(server, tokenizer, model):
    body = {"model": model, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    by_text = ok(server, "completions", {**body, "prompt": PROMPT})["choices"][0]
    ids = by_text["prompt_token_ids"]
    assert ids == tokenizer(PROMPT, add_special_tokens=False)["input_ids"], "the text prompt's ids, no BOS"
    for prompt in (ids, [ids]):
        by_ids = ok(server, "completions", {**body, "prompt": prompt})["choices"][0]
        assert by_ids["prompt_token_ids"] == ids, "token ids are used as they are"
        assert (by_ids["text"], by_ids["token_ids"]) == (by_text["text"], by_text["token_ids"]), \
            f"prompt={str(prompt)[:40]}: the ids' continuation differs from the text's"


def test_generation_continues_from_its_own_tokens(server):
    """A router's use: the prompt's ids plus the first answer tokens as a new prompt give the rest of
    the same answer. On fp32 only: there a prefill and a decode step agree to float rounding, while a
    quantized llama.cpp variant's one-token steps round differently from a prefill (test_logprobs.py),
    which may flip a near tie."""
    body = {"model": "fp32", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    whole = ok(server, "completions", {**body, "prompt": PROMPT})["choices"][0]
    assert whole["finish_reason"] == "length", f"the answer stopped early: {whole}"
    head, rest = whole["token_ids"][:4], whole["token_ids"][4:]
    tail = ok(server, "completions", {**body, "max_tokens": 8, "prompt": whole["prompt_token_ids"] + head})
    assert tail["choices"][0]["token_ids"] == rest, "continuing from the answer's own tokens changed the rest"


@pytest.mark.parametrize("path, extra, field, named", [
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs", "5"),
    ("chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "0"),
    ("chat/completions", {"logprobs": 3}, "logprobs", "boolean"),
    ("chat/completions", {"return_token_ids": "maybe"}, "return_token_ids", "boolean"),
    ("completions", {"logprobs": 6}, "logprobs", "5"),
    ("completions", {"logprobs": True}, "logprobs", "integer"),
    ("completions", {"prompt": [1, 49152]}, "prompt", "[0, 49152)"),
    ("completions", {"prompt": [-1]}, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": []}, "prompt", "empty"),
    ("completions", {"prompt": [[]]}, "prompt", "empty"),
    ("completions", {"prompt": [1, 2.5]}, "prompt", "integers"),
    ("completions", {"prompt": [1, True]}, "prompt", "integers"),
    ("completions", {"prompt": [[1], [2]]}, "prompt", "one prompt"),
    ("completions", {"prompt": [5] * 600}, "prompt", "512"),
])
@MODELS
def test_bad_logprobs_and_token_ids_are_400_naming_the_field(server, model, path, extra, field, named):
    base = {"model": model, "max_tokens": 4, **({"messages": MESSAGES} if path.startswith("chat") else {"prompt": "Hi"})}
    r = post(server, path, {**base, **extra})
    assert r.status_code == 400, f"{extra}: expected 400, got {r.status_code}: {r.text}"
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:"), f"the error names {field}: {err}"
    assert named in err["message"], f"the error says {named!r}: {err}"


@MODELS
def test_requests_without_the_new_fields_are_answered_as_before(server, model):
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    done = ok(server, "chat/completions", chat)
    assert list(done["choices"][0]) == ["index", "message", "finish_reason", "logprobs"], done["choices"][0]
    assert done["choices"][0]["logprobs"] is None, "no log-probs unless asked for"
    for c in stream(server, "chat/completions", chat):
        assert list(c["choices"][0]) == ["index", "delta", "finish_reason", "logprobs"], c
        assert c["choices"][0]["logprobs"] is None, c
    text = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    done_text = ok(server, "completions", text)
    assert list(done_text["choices"][0]) == ["index", "text", "finish_reason", "logprobs"], done_text["choices"][0]
    for c in stream(server, "completions", text):
        assert list(c["choices"][0]) == ["index", "text", "finish_reason", "logprobs"], c
    asked = ok(server, "chat/completions", {**chat, "logprobs": True, "top_logprobs": 5})
    assert asked["choices"][0]["message"] == done["choices"][0]["message"], "asking for log-probs changed the answer"


@MODELS
def test_the_openai_client_reads_both_logprobs_shapes(server, model):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0, timeout=180)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    entry = chat.choices[0].logprobs.content[0]
    assert entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 2, entry
    text = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=4, temperature=0, logprobs=1)
    assert len(text.choices[0].logprobs.tokens) == text.usage.completion_tokens, text.choices[0].logprobs
    assert text.usage.prompt_tokens == 3, f"a token-id prompt is its own length: {text.usage}"
