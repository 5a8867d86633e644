"""The real model server on loopback with the real built-in model: OpenAI client (plain and streamed),
Open Inference Protocol v2, Prometheus metrics, the request log, and bad input (4xx naming the field,
never a 5xx, and the server keeps serving).

Every test runs twice: against a torch variant (INT8 weight-only in costopt's engine) and against a
llama.cpp variant (GGUF Q8_0 in the llama.cpp engine), each served next to fp32."""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import GGUF_VARIANT, VARIANT, start_server  # both made by the session fixture `workspace`

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module", params=[VARIANT, GGUF_VARIANT], ids=["torch", "llamacpp"])
def server(request, workspace, tmp_path_factory):
    """fp32 and one variant behind one server; small limits so bad-input tests are cheap."""
    log = tmp_path_factory.mktemp(f"server-{request.param}") / "server.log"
    reqlog = log.with_name("requests.jsonl")
    srv = start_server(workspace, log, "--max_tokens_limit", "64", "--max_prompt_tokens", "512",
                       "--max_body_bytes", "65536", "--request_log", str(reqlog), "--log_prompts",
                       variants=("fp32", request.param))
    srv.request_log, srv.variant = reqlog, request.param
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def variant(server) -> str:
    return server.variant


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_chat_round_trip(client, variant):
    out = client.chat.completions.create(model=variant, messages=MESSAGES, max_tokens=12, temperature=0)
    assert out.choices[0].message.content.strip(), "the answer has text"
    assert out.choices[0].finish_reason in ("stop", "length"), out.choices[0].finish_reason
    assert 1 <= out.usage.completion_tokens <= 12, f"usage counts the answer: {out.usage}"
    assert out.usage.prompt_tokens > 5, f"usage counts the prompt: {out.usage}"


def test_stream_equals_plain_answer_and_reports_usage(client):
    plain = client.chat.completions.create(model="fp32", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="fp32", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content, "greedy streamed text equals the plain answer"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens, \
        "the last chunk carries usage"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason], f"one finish reason at the end: {finishes}"


def test_completions_endpoint_and_model_list(client, variant):
    out = client.completions.create(model=variant, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert out.choices[0].text, "a completion has text"
    names = {m.id for m in client.models.list().data}
    assert names == {"fp32", variant}, f"/v1/models lists the served variants: {names}"


def test_stop_string_ends_the_answer(client):
    out = client.chat.completions.create(model="fp32", messages=[{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6"}],
                                         max_tokens=40, temperature=0)
    full = out.choices[0].message.content
    assert len(full) > 4, f"the unstopped answer is long enough to cut: {full!r}"
    stop = full[2:4]
    cut = client.chat.completions.create(model="fp32", messages=[{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6"}],
                                         max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)], "the answer ends before the stop string"
    assert cut.choices[0].finish_reason == "stop"


def test_open_inference_protocol_v2(server, variant):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get(f"/v2/models/{variant}/ready").status_code == 200
        body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Say hello."]}],
                "parameters": {"max_tokens": 8}}
        r = http.post(f"/v2/models/{variant}/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "text_output" and out["datatype"] == "BYTES" and out["data"][0], out
        bad = http.post(f"/v2/models/{variant}/infer", json={"inputs": [{"name": "x", "shape": [1],
                                                                          "datatype": "INT32", "data": [1]}]})
        assert bad.status_code == 400 and "text_input" in bad.text, f"a wrong input is named: {bad.text}"


def test_metrics_parse_and_count_requests(server, client, variant):
    client.chat.completions.create(model=variant, messages=MESSAGES, max_tokens=4, temperature=0,
                                   extra_headers={"x-costopt-priority": "high"})
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("costopt_requests", "costopt_request_latency_seconds", "costopt_queue_depth",
                 "costopt_batch_size", "costopt_generated_tokens", "costopt_rejections"):
        assert name in families, f"/metrics has {name}"
    ok_high = [s for s in families["costopt_requests"].samples
               if s.labels.get("variant") == variant and s.labels.get("priority") == "high"
               and s.labels.get("outcome") == "ok" and s.name.endswith("_total")]
    assert ok_high and ok_high[0].value >= 1, "the high-priority request is counted by variant and priority"


def test_the_server_listens_on_loopback_only_by_default(server):
    """KServe binds 0.0.0.0; costopt's server binds 127.0.0.1 unless --host says otherwise."""
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
                    listening.append(addr)
    assert listening == ["0100007F"], f"listening on {listening} (hex, little-endian): expected 127.0.0.1 only"


def test_open_mode_is_announced_and_admin_routes_still_need_the_key(server, variant):
    """No tenant keys: inference is open (loopback only), the start-up log says so, and loading or
    unloading a variant still needs the admin key the server wrote into the workspace."""
    assert "the inference routes are OPEN" in server.logs(50000)
    r = httpx.post(f"{server.url}/v2/repository/models/{variant}/unload", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    assert variant in {m["id"] for m in httpx.get(f"{server.url}/openai/v1/models", timeout=30).json()["data"]}


def test_queue_and_running_gauges_move_under_load_and_settle(server, variant):
    """costopt_running_sequences and costopt_queue_depth follow the engine: above zero while eight requests
    are in flight, back to zero once they are answered."""
    import concurrent.futures

    def gauges():
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=30).text)}
        value = lambda name: sum(x.value for x in fams[name].samples if x.labels.get("variant") == variant)  # noqa: E731
        return value("costopt_running_sequences"), value("costopt_queue_depth")

    def ask(i):
        body = {"model": variant, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}."}]}
        return httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=120).status_code

    seen = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        while not all(f.done() for f in futures):
            seen.append(gauges())
    assert [f.result() for f in futures] == [200] * 8
    assert max(r for r, _ in seen) >= 2, f"running never rose above 1 with eight requests in flight: {seen[:20]}"
    assert gauges() == (0, 0), "both gauges settle at zero once every request is answered"


def test_a_repeated_prompt_reuses_its_cached_prefix_on_llamacpp(server, client, variant):
    """The llama.cpp engine keeps recent prompts' KV (--prefix_cache, default 8): asking the same chat
    twice computes only the second one's last prompt token; the torch engine keeps none. Same answer."""
    def reused():
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(x.value for x in fams["costopt_prefix_cache_reused_tokens"].samples
                   if x.labels.get("variant") == variant and x.name.endswith("_total"))

    messages = [{"role": "system", "content": "You answer in one short sentence, about gardens only."},
                {"role": "user", "content": "Which flower likes shade and moist soil?"}]
    ask = lambda: client.chat.completions.create(model=variant, messages=messages, max_tokens=8, temperature=0)  # noqa: E731
    first, before = ask(), reused()
    second = ask()
    gained = reused() - before
    assert second.choices[0].message.content == first.choices[0].message.content, "a cache hit changed the answer"
    if variant == GGUF_VARIANT:
        assert gained == second.usage.prompt_tokens - 1, \
            f"reused {gained} tokens; expected all but the last of {second.usage.prompt_tokens}"
    else:
        assert gained == 0, f"the torch engine keeps no prefix cache, yet {gained} tokens were reused"


def test_request_log_lines(server, client, variant):
    client.chat.completions.create(model=variant, messages=MESSAGES, max_tokens=4, temperature=0,
                                   extra_headers={"x-costopt-tenant": "team-a"})
    rows = [json.loads(line) for line in server.request_log.read_text().splitlines()]
    mine = [r for r in rows if r["tenant"] == "team-a"]
    assert mine, "the request is logged with its tenant"
    row = mine[-1]
    for key in ("time", "variant", "prompt_sha256", "prompt_tokens", "completion_tokens", "latency_ms"):
        assert key in row, f"log line has {key}: {row}"
    assert row["messages"] == MESSAGES, "with --log_prompts the chat messages are kept for calibration"


def _post(server, path: str, body: bytes | dict, **headers: str) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, timeout=60,
                      headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("body, headers, status, named", [
    (b"{not json", {}, 400, "JSON"),
    ({"model": VARIANT}, {}, 400, "messages"),
    ({"model": VARIANT, "messages": "hi"}, {}, 400, "messages"),
    ({"model": VARIANT, "messages": MESSAGES, "max_tokens": "many"}, {}, 400, "max_tokens"),
    ({"model": VARIANT, "messages": MESSAGES, "max_tokens": 65}, {}, 400, "64"),
    ({"model": VARIANT, "messages": MESSAGES, "temperature": 9}, {}, 400, "temperature"),
    ({"model": "int3_magic", "messages": MESSAGES}, {}, 404, "int3_magic"),
    ({"model": VARIANT, "messages": [{"role": "user", "content": "word " * 600}]}, {}, 400, "512"),
    ({"model": VARIANT, "messages": MESSAGES}, {"x-costopt-priority": "urgent"}, 400, "x-costopt-priority"),
    ({"model": VARIANT, "messages": MESSAGES}, {"x-costopt-deadline-ms": "soon"}, 400, "x-costopt-deadline-ms"),
    ({"model": VARIANT, "messages": MESSAGES}, {"x-costopt-deadline-ms": b"\xb2"}, 400, "x-costopt-deadline-ms"),
    ({"model": VARIANT, "messages": MESSAGES}, {"x-costopt-deadline-ms": "9" * 5000}, 400, "x-costopt-deadline-ms"),
    (b"[1, 2]", {}, 400, "JSON object"),
    (b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\udc80"}]}' % VARIANT.encode(), {}, 400,
     "messages.0.content: not valid Unicode"),
    (b'{"model": "%s", "prompt\\ud800": 1, "messages": []}' % VARIANT.encode(), {}, 400, "not valid Unicode"),
    (b"[" * 5000 + b"]" * 5000, {}, 400, "nested too deeply"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, body, headers, status, named):
    if isinstance(body, dict) and body.get("model") == VARIANT:
        body = {**body, "model": server.variant}  # the table names the torch variant; serve whichever runs
    elif isinstance(body, bytes):
        body = body.replace(VARIANT.encode(), server.variant.encode())
    r = _post(server, "/openai/v1/chat/completions", body, **headers)
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert named in r.json()["error"]["message"], f"the error names {named!r}: {r.text}"


def test_unserved_model_names_never_become_metrics_labels(server):
    r = _post(server, "/openai/v1/chat/completions", {"model": "no_such_variant_x7", "messages": MESSAGES})
    assert r.status_code == 404, r.text
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "no_such_variant_x7" not in text, "a client-chosen name would make metrics labels unbounded"


@pytest.mark.parametrize("extra", [{"temperature": 1.5, "top_p": 5.76e-156, "seed": 10584},
                                   {"temperature": 1e-300, "seed": 3}])
def test_extreme_sampling_values_are_answered(server, extra, variant):
    body = {"model": variant, "messages": MESSAGES, "max_tokens": 3, **extra}
    r = _post(server, "/openai/v1/chat/completions", body)
    assert r.status_code == 200, f"{extra}: {r.status_code} {r.text}"
    greedy = _post(server, "/openai/v1/chat/completions", {**body, "temperature": 0}).json()
    assert r.json()["choices"][0]["message"] == greedy["choices"][0]["message"], "both are the greedy answer"


def test_oip_v2_bad_text_and_headers_are_400(server, variant):
    ok = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Say hello."]}
    cases = [(b'{"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["a\\udc80"]}]}',
              {}, "text_input[0]"),
             (json.dumps({"inputs": [ok], "parameters": {"max_tokens": 1}}).encode().replace(b": 1}", b": 1e400}"),
              {}, "parameters"),
             (json.dumps({"inputs": [ok]}).encode(), {"x-costopt-priority": "bogus"}, "x-costopt-priority")]
    for body, headers, named in cases:
        r = _post(server, f"/v2/models/{variant}/infer", body, **headers)
        assert r.status_code == 400 and named in r.text, f"{body[:80]!r}: {r.status_code} {r.text}"


def test_oversized_body_is_413_and_server_keeps_serving(server, client, variant):
    big = {"model": variant, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = _post(server, "/openai/v1/chat/completions", big)
    assert r.status_code == 413 and "65536" in r.text, f"413 names the limit: {r.status_code} {r.text}"
    assert client.chat.completions.create(model=variant, messages=MESSAGES, max_tokens=2).choices, "still serving"


def test_client_disconnect_mid_stream_leaves_server_serving(server, client):
    body = json.dumps({"model": "fp32", "messages": MESSAGES, "max_tokens": 60, "stream": True,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data:" not in got:
            chunk = s.recv(4096)
            assert chunk, f"the stream started before the server closed it: {got[-300:]!r}"
            got += chunk
    out = client.chat.completions.create(model="fp32", messages=MESSAGES, max_tokens=4)
    assert out.choices[0].message.content is not None, "the server still answers after a client hung up"
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "costopt_requests_total" in text and 'outcome="error"' not in text, "no request ended in error"


def test_model_versions_are_a_client_error(server, variant):
    r = httpx.get(f"{server.url}/v2/models/{variant}/versions/2/ready", timeout=30)
    assert r.status_code == 400 and "model_version" in r.text, f"{r.status_code} {r.text}"
