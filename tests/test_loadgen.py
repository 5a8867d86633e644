"""The load generator against a real HTTP server on loopback: a tiny OpenAI-shaped Starlette app under uvicorn.

The fake server reads its behaviour from the user message (`sleep=0.1 status=429 tokens=5 ...`) and
records what it received, per tenant, so each test counts only its own requests.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from costopt.workload.trace import TraceItem, build_trace, trace_meta, write_trace
from tasks.loadtest import LoadResult, RequestRecord, main, run_load, serving_section, summarize

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "summary.schema.json"  # = ../shared/schemas
CONFIG = {"batching": False, "cache": False, "routing": False, "variants": ["fp32"]}


class FakeServer:
    """What the server saw, per tenant: requests (arrival time, headers, body) and peak in-flight count."""

    def __init__(self) -> None:
        self.seen: dict[str, list[dict]] = defaultdict(list)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)

    def enter(self, tenant: str) -> None:
        self.in_flight[tenant] += 1
        self.max_in_flight[tenant] = max(self.max_in_flight[tenant], self.in_flight[tenant])

    def leave(self, tenant: str) -> None:
        self.in_flight[tenant] -= 1

    async def chat(self, request: Request):
        body = await request.json()
        tenant = request.headers.get("x-costopt-tenant", "")
        self.seen[tenant].append({"t": time.perf_counter(), "headers": dict(request.headers), "body": body})
        d = dict(kv.split("=", 1) for kv in body["messages"][-1]["content"].split() if "=" in kv)
        self.enter(tenant)
        streaming = False
        try:
            await asyncio.sleep(float(d.get("sleep", 0.01)))
            status, tokens = int(d.get("status", 200)), int(d.get("tokens", 4))
            if status == 429:
                return JSONResponse({"error": {"message": "over capacity"}}, 429, headers={"Retry-After": "2"})
            if status != 200:
                return JSONResponse({"error": {"message": "engine failed"}}, status)
            if "malformed" in d:
                return PlainTextResponse("<html>not json</html>")
            if body.get("stream"):
                streaming = True
                return StreamingResponse(self.sse(body, d, tokens, tenant), media_type="text/event-stream")
            return JSONResponse({"id": "c1", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "w " * tokens},
                                              "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 5, "completion_tokens": tokens,
                                           "total_tokens": 5 + tokens}})
        finally:
            if not streaming:
                self.leave(tenant)

    async def sse(self, body: dict, d: dict, tokens: int, tenant: str):
        def chunk(delta: dict, **extra) -> str:
            return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}],
                                          **extra}) + "\n\n"
        try:
            yield chunk({"role": "assistant", "content": ""})  # OpenAI opens with an empty role chunk
            for _ in range(tokens):
                await asyncio.sleep(float(d.get("tok_sleep", 0.01)))
                yield chunk({"content": "w "})
            if "stream_error" in d:
                yield 'data: {"error": {"message": "engine died"}}\n\n'
                return
            if "cut" in d:
                return
            if (body.get("stream_options") or {}).get("include_usage") and "no_usage" not in d:
                usage = int(d.get("usage", tokens))
                yield ("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": usage}}) + "\n\n")
            yield "data: [DONE]\n\n"
        finally:
            self.leave(tenant)


@pytest.fixture(scope="module")
def server():
    fake = FakeServer()
    app = Starlette(routes=[Route("/openai/v1/chat/completions", fake.chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not uv.started:
        assert time.time() < deadline, "fake server did not start within 10 s"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def items(contents: list[str], tenant: str, gap_s: float = 1.0) -> list[TraceItem]:
    prios = ("high", "normal", "low")
    return [TraceItem(id=f"t{i:03d}", kind="fresh", source_id=None, messages=({"role": "user", "content": c},),
                      max_tokens=16, priority=prios[i % 3], tenant=tenant, deadline_ms=10_000,
                      offset_s=round(i * gap_s, 6)) for i, c in enumerate(contents)]


def serving_validator() -> jsonschema.Draft202012Validator:
    full = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator({"$defs": full["$defs"], **full["properties"]["serving"]})


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_keeps_the_set_number_of_requests_in_flight(server, concurrency):
    fake, url = server
    tenant = f"closed{concurrency}"
    result = run_load(url, "m", items(["sleep=0.08"] * 9, tenant), concurrency=concurrency)
    assert fake.max_in_flight[tenant] == concurrency, \
        f"server saw {fake.max_in_flight[tenant]} requests at once, expected exactly {concurrency}"
    assert result.max_in_flight == concurrency, f"client in-flight peak {result.max_in_flight} != {concurrency}"
    assert [r.outcome for r in result.records] == ["ok"] * 9, f"outcomes: {[r.outcome for r in result.records]}"
    assert result.duration_s >= 9 / concurrency * 0.08 * 0.95, \
        f"{9} requests of 80 ms at concurrency {concurrency} finished in {result.duration_s:.3f} s: too fast"


def test_closed_loop_walks_the_trace_in_order_and_cycles_it(server):
    fake, url = server
    trace = items([f"n={i}" for i in range(4)], "cycle")
    result = run_load(url, "m", trace, concurrency=1, requests=10)
    got = [s["body"]["messages"][-1]["content"] for s in fake.seen["cycle"]]
    assert got == [f"n={i % 4}" for i in range(10)], f"server saw {got}"
    assert [r.id for r in result.records] == [trace[i % 4].id for i in range(10)], "records follow the cycled trace"


def test_counts_rejections_errors_and_sends_the_contract_headers(server):
    fake, url = server
    contents = ["tokens=3"] * 6 + ["status=429"] * 2 + ["status=500", "malformed=1"]
    trace = items(contents, "mixed")
    result = summarize(run_load(url, "smol", trace, concurrency=2), 1.0, CONFIG)
    assert (result["ok"], result["rejected"], result["errors"], result["lost"]) == (6, 2, 2, 0), \
        f"ok/rejected/errors/lost = {result['ok'], result['rejected'], result['errors'], result['lost']}"
    assert result["retry_after_p50_s"] == 2.0, f"Retry-After not recorded: {result['retry_after_p50_s']}"
    assert result["rejected_p99_ms"] < 1000, f"429s took {result['rejected_p99_ms']} ms to come back"
    assert any("HTTP 500" in e for e in result["error_examples"]), f"errors: {result['error_examples']}"
    assert any("malformed" in e for e in result["error_examples"]), f"errors: {result['error_examples']}"
    assert result["throughput_tok_s"] > 0 and result["by_priority"]["high"]["requests"] == 4, \
        f"tok/s {result['throughput_tok_s']}, by_priority {result['by_priority']}"
    seen = fake.seen["mixed"]  # at concurrency 2 the arrival order of neighbours is a race: compare as multisets
    sent = sorted((s["headers"]["x-costopt-priority"], s["headers"]["x-costopt-deadline-ms"]) for s in seen)
    assert sent == sorted((t.priority, "10000") for t in trace), f"priority/deadline headers sent: {sent}"
    first = seen[0]
    assert {k: first["body"][k] for k in ("model", "max_tokens", "temperature", "stream")} == \
        {"model": "smol", "max_tokens": 16, "temperature": 0, "stream": False}, f"body sent: {first['body']}"


def test_without_deadlines_no_deadline_header_is_sent(server):
    fake, url = server
    run_load(url, "smol", items(["tokens=2"] * 2, "nodeadline"), concurrency=1, deadlines=False)
    sent = fake.seen["nodeadline"][0]["headers"]
    assert "x-costopt-deadline-ms" not in sent and sent["x-costopt-priority"] == "high", f"headers sent: {sent}"


def test_streaming_records_ttft_and_prefers_the_usage_chunk(server):
    _, url = server
    trace = items(["tokens=5 tok_sleep=0.03 usage=7", "tokens=5 no_usage=1", "tokens=3 stream_error=1",
                   "tokens=3 cut=1"], "stream")
    recs = run_load(url, "m", trace, concurrency=1, stream=True).records
    assert recs[0].outcome == "ok" and recs[0].completion_tokens == 7, f"usage chunk ignored: {recs[0]}"
    assert 25 <= recs[0].ttft_ms < recs[0].latency_ms, f"ttft {recs[0].ttft_ms} ms, latency {recs[0].latency_ms} ms"
    assert recs[1].outcome == "ok" and recs[1].completion_tokens == 5, f"content chunks not counted: {recs[1]}"
    assert recs[2].outcome == "error" and "engine died" in recs[2].error, f"stream error: {recs[2]}"
    assert recs[3].outcome == "error" and "[DONE]" in recs[3].error, f"cut stream: {recs[3]}"


def test_timeouts_are_errors_and_the_cut_off_leaves_requests_lost(server):
    _, url = server
    timed = run_load(url, "m", items(["sleep=1"], "slow1"), concurrency=1, timeout_s=0.2).records
    assert timed[0].outcome == "error" and "timeout" in timed[0].error, f"timeout record: {timed[0]}"
    cut = summarize(run_load(url, "m", items(["sleep=1"] * 5, "slow2"), concurrency=2, max_duration_s=0.3), 1.0, CONFIG)
    assert (cut["requests"], cut["lost"], cut["ok"], cut["cut_off"]) == (2, 2, 0, True), \
        f"sent {cut['requests']}, lost {cut['lost']}, ok {cut['ok']}: expected the 2 in flight lost"
    assert cut["cost_per_1m_requests_usd"] is None and cut["p50_ms"] is None, "no success, so no cost or latency"


def test_open_loop_sends_on_the_trace_offsets_whatever_the_answers(server):
    fake, url = server
    trace = items(["sleep=0.5"] * 6, "open", gap_s=0.3)  # rescaled to 0.15 s apart at rate 2
    result = run_load(url, "m", trace, rate=2.0)
    late = [round(r.sent_s - i * 0.15, 3) for i, r in enumerate(result.records)]
    assert all(-0.005 <= d < 0.06 for d in late), f"send time minus offset/rate, s: {late}"
    arrivals = [s["t"] - fake.seen["open"][0]["t"] for s in fake.seen["open"]]
    assert abs(arrivals[-1] - 0.75) < 0.08, \
        f"server saw the last request {arrivals[-1]:.3f} s after the first, not 0.75"
    assert fake.max_in_flight["open"] >= 3, \
        f"peak in flight {fake.max_in_flight['open']}: open loop must not wait for the 0.5 s answers"
    run = summarize(result, 1.0, CONFIG)
    assert (run["mode"], run["rate_req_s"], run["concurrency"]) == ("open", 2.0, result.max_in_flight), \
        f"open-loop run fields: {run['mode'], run['rate_req_s'], run['concurrency']}"


def _record(seq: int, outcome: str, latency_ms: float, priority: str = "normal") -> RequestRecord:
    return RequestRecord(seq=seq, id=f"r{seq}", priority=priority, tenant="a", kind="fresh", deadline_ms=50,
                         sent_s=0.0, outcome=outcome, status=200, latency_ms=latency_ms, completion_tokens=2)


def test_summary_percentiles_count_successes_only_and_cost_follows_the_formula():
    recs = [_record(i, "ok", float(i + 1), "high" if i < 10 else "normal") for i in range(100)]
    recs += [_record(100, "rejected", 9_000.0), _record(101, "error", 20_000.0)]
    run = summarize(LoadResult("closed", 4, None, False, 10.0, 4, recs), 3.6, CONFIG)
    assert (run["p50_ms"], run["p95_ms"], run["p99_ms"]) == (50.5, 95.05, 99.01), \
        f"percentiles over the 100 successes (1..100 ms): {run['p50_ms'], run['p95_ms'], run['p99_ms']}"
    assert run["cost_per_1m_requests_usd"] == pytest.approx(100.0), \
        f"3.6 USD/h x 10 s / 100 ok = 100 USD per 1M, got {run['cost_per_1m_requests_usd']}"
    assert (run["throughput_req_s"], run["throughput_tok_s"]) == (10.0, 20.0), \
        f"req/s and tok/s: {run['throughput_req_s'], run['throughput_tok_s']}"
    assert run["deadline_met"] == round(50 / 102, 4), f"deadline 50 ms met by 50 of 102: {run['deadline_met']}"
    assert run["by_priority"]["high"] == {"requests": 10, "ok": 10, "p50_ms": 5.5, "p99_ms": 9.91, "deadline_met": 1.0,
                                          "rejected": 0, "errors": 0}, f"high: {run['by_priority']['high']}"
    with pytest.raises(ValueError, match="variants"):
        summarize(LoadResult("closed", 4, None, False, 10.0, 4, recs), 3.6, {"batching": 1, "cache": 0, "routing": 0})


def test_serving_section_validates_against_the_summary_schema(server):
    _, url = server
    trace = items(["tokens=2"] * 4 + ["status=429"], "schema", gap_s=0.05)
    runs = [summarize(run_load(url, "m", trace, concurrency=2), 0.1, CONFIG),
            summarize(run_load(url, "m", trace, rate=20.0, stream=True), 0.1, CONFIG)]
    section = serving_section(trace_meta(trace), runs, naive_cost_per_1m_requests_usd=2.0)
    validator = serving_validator()
    errors = [e.message for e in validator.iter_errors(section)]
    assert not errors, f"serving section breaks the schema: {errors}"
    broken = {**section, "runs": [{k: v for k, v in runs[0].items() if k != "rejected"}]}
    assert not validator.is_valid(broken), "the schema check must reject a run without `rejected`"


def test_cli_prints_a_table_and_writes_a_valid_section(server, tmp_path, capsys):
    _, url = server
    path = write_trace(tmp_path / "trace.jsonl", build_trace(6, seed=3), seed=3)
    out = tmp_path / "serving.json"
    code = main(["--url", url, "--model", "m", "--concurrency", "1", "2", "--trace", str(path),
                 "--price-per-hour", "1.5", "--cache", "--json", str(out)])
    table = capsys.readouterr().out.strip().splitlines()
    assert code == 0, f"exit code {code}"
    assert table[0].startswith("| mode | conc |") and len(table) == 4, f"table:\n{chr(10).join(table)}"
    section = json.loads(out.read_text())
    assert [r["concurrency"] for r in section["runs"]] == [1, 2] and section["runs"][0]["config"]["cache"] is True, \
        f"runs: {section['runs']}"
    assert section["trace"]["requests"] == 6 and serving_validator().is_valid(section), f"trace: {section['trace']}"


@pytest.mark.parametrize("argv, flag", [
    (["--url", "127.0.0.1:8080", "--concurrency", "1"], "--url"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "two"], "--concurrency"),
    (["--rate", "-1"], "--rate"),
    (["--concurrency", "1", "--rate", "2"], "not allowed with"),
    ([], "one of the arguments --concurrency --rate is required"),
])
def test_cli_rejects_bad_flags_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:9", "--model", "m", "--price-per-hour", "1", *argv])  # last --url wins
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err, f"exit {exc.value.code}, stderr: {err}"


def test_cli_fails_when_nothing_succeeds(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        code = main(["--url", f"http://127.0.0.1:{sock.getsockname()[1]}", "--model", "m", "--concurrency", "1",
                     "--requests", "2", "--price-per-hour", "1", "--no-progress"])
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert code == 1 and "no request succeeded" in err and "ConnectError" in err, f"exit {code}, stderr: {err}"


def test_cache_outcome_judges_hits_against_the_trace():
    """Sequential replay: a hit on a fresh request is false; a repeat or paraphrase served an answer the
    model gave its meaning is right, another answer is false; misses are not judged; a later cycle of
    the trace is a repeat."""
    from tasks.loadtest import cache_outcome

    items = build_trace(60, seed=1234)
    src = {it.id: it for it in items}
    records, answers = [], {}
    for seq, it in enumerate(items):
        group = it.source_id or it.id
        rec = RequestRecord(seq=seq, id=it.id, priority=it.priority, tenant="t", kind=it.kind,
                            deadline_ms=it.deadline_ms, sent_s=float(seq), outcome="ok", latency_ms=100.0)
        if it.kind == "fresh":
            rec.cache, rec.answer_sha = "miss", f"answer-{group}"
            answers[group] = rec.answer_sha
        else:
            rec.cache, rec.answer_sha = "hit-l1", answers[group]
        records.append(rec)
    clean = cache_outcome(items, records)
    hits = sum(it.kind != "fresh" for it in items)
    assert clean["hits"] == hits and clean["false_hits"] == 0 and clean["unchecked_hits"] == 0, clean
    assert clean["false_hit_upper95"] < 0.2 and clean["hit_rate"] == pytest.approx(hits / len(items))
    wrong = next(r for r in records if r.cache == "hit-l1")
    wrong.answer_sha = "another answer"
    fresh = next(r for r in records if src[r.id].kind == "fresh" and r.seq > 0
                 and not any(it.source_id == r.id for it in items))  # nothing else means the same
    fresh.cache = "hit-l2"
    judged = cache_outcome(items, records)
    assert judged["false_hits"] == 2 and judged["unsourced_hits"] == 1, judged
    cycled = RequestRecord(seq=len(items), id=items[0].id, priority="normal", tenant="t", kind="fresh",
                           deadline_ms=1, sent_s=float(len(items)), outcome="ok", latency_ms=100.0, cache="hit-l1",
                           answer_sha=answers[items[0].id])
    assert cache_outcome(items, records + [cycled])["false_hits"] == 2, "a second cycle repeats the first"


def test_cache_outcome_follows_arrival_order_and_tenants():
    """Concurrent replay: a repeat sent with its source may generate first and the source be coalesced
    onto it (a hit with the group's own answer: right); a hit whose only same-meaning request belongs to
    another tenant of a keyed gateway, or was sent after the hit was answered, had no possible source
    (false). An open gateway is one tenant: there another tenant's request is a source."""
    from tasks.loadtest import cache_outcome

    items = build_trace(60, seed=1234)
    rep = next(it for it in items if it.kind == "repeat")
    source = next(i for i, it in enumerate(items) if it.id == rep.source_id)
    r_seq = items.index(rep)

    def rec(seq: int, tenant: str, sent: float, cache: str, answer: str) -> RequestRecord:
        it = items[seq]
        return RequestRecord(seq=seq, id=it.id, priority=it.priority, tenant=tenant, kind=it.kind,
                             deadline_ms=it.deadline_ms, sent_s=sent, outcome="ok", latency_ms=500.0,
                             cache=cache, answer_sha=answer)

    coalesced = [rec(source, "a", 1.0, "hit-l1", "A"), rec(r_seq, "a", 1.0, "miss", "A")]
    out = cache_outcome(items, coalesced)
    assert out["hits"] == 1 and out["false_hits"] == 0, f"the source coalesced onto its repeat is right: {out}"
    other_tenant = [rec(source, "a", 1.0, "miss", "A"), rec(r_seq, "b", 2.0, "hit-l1", "A")]
    out = cache_outcome(items, other_tenant, keyed_tenants=True)
    assert out["false_hits"] == 1 and out["unsourced_hits"] == 1, f"another tenant's request is no source: {out}"
    out = cache_outcome(items, other_tenant, keyed_tenants=False)
    assert out["false_hits"] == 0, f"an open gateway serves every label as one tenant: {out}"
    later = [rec(r_seq, "a", 1.0, "hit-l1", "A"), rec(source, "a", 3.0, "miss", "A")]
    out = cache_outcome(items, later)
    assert out["unsourced_hits"] == 1, f"a source sent after the hit was answered is no source: {out}"
    unchecked = [rec(source, "a", 1.0, "hit-l2", "A"), rec(r_seq, "a", 2.0, "hit-l1", "A")]
    out = cache_outcome(items, unchecked)
    assert out["unchecked_hits"] == 1 and out["false_hits"] == 1, f"nothing generated to check against: {out}"


