"""Load generator: replay the serving trace against the OpenAI-compatible chat API and summarize it.

Each trace item becomes `POST {url}/openai/v1/chat/completions` with `temperature: 0`, its
`max_tokens`, and the headers `x-costopt-priority`, `x-costopt-tenant` and `x-costopt-deadline-ms`
(plus `Authorization: Bearer` for a server with tenant keys: `--api-key`, or `api_keys` per tenant).
Two modes:
- closed loop (`concurrency=N`): N workers walk the trace in order (cycling it if the run is longer),
  each sending its next request when its previous answer completes; this measures capacity;
- open loop (`rate=R` req/s): request k goes out at `offset_s * BASE_RATE_REQ_S / R` whatever the
  server does, so an overloaded server builds a queue or sheds load (the "2x sustainable" test).

Every request ends as `ok` (2xx with a well-formed body), `rejected` (429; its Retry-After and how fast
it came back are kept), `error` (another status, a transport error, a timeout or a malformed body) or
`lost` (sent, but the run ended at `max_duration_s` before an answer). Nothing is retried. `summarize`
turns a run into one `serving.runs[]` entry of the run summary (DESIGN.md, "Contracts"; percentiles over
`ok` requests only) and `serving_section` assembles the `serving` block.

    python -m tasks.loadtest --url http://127.0.0.1:8080 --model smollm2 --concurrency 1 4 16
    python -m tasks.loadtest --url http://127.0.0.1:8080 --model smollm2 --rate 2 --stream --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
import numpy as np
from tqdm import tqdm

from costopt.evaluation.cost import cost_per_1m_requests
from costopt.workload.trace import BASE_RATE_REQ_S, PRIORITIES, TraceError, TraceItem, build_trace, read_trace, trace_meta

CHAT_PATH = "/openai/v1/chat/completions"
CONFIG_KEYS = ("batching", "cache", "routing", "variants")  # what a run's `config` must say
ERROR_TEXT_CHARS = 300  # error text kept per failed request


class MalformedResponse(ValueError):
    """A 2xx answer that is not an OpenAI chat completion (or stream of chunks)."""


@dataclass
class RequestRecord:
    seq: int  # position in the run; the trace item is items[seq % len(items)]
    id: str
    priority: str
    tenant: str
    kind: str
    deadline_ms: int
    sent_s: float  # send time, seconds from the run start
    outcome: str = "lost"  # "ok" | "rejected" | "error" | "lost"
    status: int | None = None  # HTTP status; None for transport errors, timeouts and lost requests
    latency_ms: float | None = None  # send to last byte (to the 429 for rejections)
    ttft_ms: float | None = None  # send to the first content chunk, streaming only
    completion_tokens: int = 0
    retry_after_s: float | None = None  # the 429's Retry-After, seconds
    error: str | None = None
    cache: str | None = None  # the gateway's x-costopt-cache (hit-l1|hit-l2|hit-l3|miss|bypass); None direct
    answer_sha: str | None = None  # sha256 of the answer text (plain responses), to check cached answers
    variant: str | None = None  # x-costopt-variant: the variant, or the routed tiers that answered, in order
    escalations: int | None = None  # x-costopt-escalations: times a routed request moved up a tier

    @property
    def deadline_met(self) -> bool:
        return self.outcome == "ok" and self.latency_ms is not None and self.latency_ms <= self.deadline_ms


@dataclass
class LoadResult:
    mode: str  # "closed" | "open"
    concurrency: int | None  # closed loop: workers
    rate_req_s: float | None  # open loop: mean send rate
    stream: bool
    duration_s: float  # wall time from the first send to the last answer (or the cut-off)
    max_in_flight: int  # most requests awaiting an answer at once, as the client saw it
    records: list[RequestRecord]
    cut_off: bool = False  # max_duration_s ended the run before every request was sent and answered


# ---------------------------------------------------------------- one request

def _body(item: TraceItem, model: str, stream: bool) -> dict[str, Any]:
    body = {"model": model, "messages": [dict(m) for m in item.messages], "max_tokens": item.max_tokens,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}  # OpenAI's way to ask for a final usage chunk
    return body


def _headers(item: TraceItem, deadline: bool = True, api_keys: Mapping[str, str] | None = None) -> dict[str, str]:
    """Priority and tenant; the deadline too unless `deadline` is False (the server's default applies).
    With `api_keys` (tenant -> key) the item's tenant sends its key: a keyed server takes the tenant from
    it; an open server keeps the tenant header as a log label."""
    headers = {"x-costopt-priority": item.priority, "x-costopt-tenant": item.tenant}
    if deadline:
        headers["x-costopt-deadline-ms"] = str(item.deadline_ms)
    if api_keys is not None:
        if item.tenant not in api_keys:
            raise ValueError(f"loadtest: api_keys has no key for tenant {item.tenant!r} (trace item {item.id})")
        headers["Authorization"] = f"Bearer {api_keys[item.tenant]}"
    return headers


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: kept out of the seconds statistics


def _completion_tokens(body: Any) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise MalformedResponse("expected a chat completion with a non-empty `choices` list")
    message = body["choices"][0].get("message") if isinstance(body["choices"][0], dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise MalformedResponse("choices[0].message.content is missing or not a string")
    tokens = (body.get("usage") or {}).get("completion_tokens")
    if not isinstance(tokens, int) or tokens < 0:
        raise MalformedResponse("usage.completion_tokens is missing or not a non-negative integer")
    return tokens


async def _read_sse(resp: httpx.Response, start: float) -> tuple[int, float | None]:
    """(completion tokens, ttft ms) from an SSE stream: the usage chunk if sent, else content chunks."""
    chunks, usage_tokens, ttft_ms = 0, None, None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` and `id:` fields
        data = line[5:].strip()
        if data == "[DONE]":
            return (usage_tokens if usage_tokens is not None else chunks), ttft_ms
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise MalformedResponse(f"stream chunk is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict) or "error" in chunk:
            raise MalformedResponse(f"stream carried an error: {str(chunk)[:ERROR_TEXT_CHARS]}")
        if isinstance(chunk.get("usage"), dict) and isinstance(chunk["usage"].get("completion_tokens"), int):
            usage_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - start) * 1e3
    raise MalformedResponse("stream ended without `data: [DONE]`")


async def _exchange(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
                    rec: RequestRecord, start: float) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        rec.status, rec.cache = resp.status_code, resp.headers.get("x-costopt-cache")
        rec.variant = resp.headers.get("x-costopt-variant")
        esc = resp.headers.get("x-costopt-escalations")
        rec.escalations = int(esc) if esc is not None and esc.isdigit() else None
        if not resp.is_success:
            text = (await resp.aread()).decode(errors="replace")[:ERROR_TEXT_CHARS]
            rec.outcome = "rejected" if resp.status_code == 429 else "error"
            rec.error = f"HTTP {resp.status_code}: {text}"
            rec.retry_after_s = _retry_after(resp.headers.get("retry-after"))
        elif body["stream"]:
            rec.completion_tokens, rec.ttft_ms = await _read_sse(resp, start)
            rec.outcome = "ok"
        else:
            try:
                payload = json.loads(await resp.aread())
            except ValueError:  # not JSON, or not UTF-8
                raise MalformedResponse("body is not JSON") from None
            rec.completion_tokens, rec.outcome = _completion_tokens(payload), "ok"
            text = ((payload.get("choices") or [{}])[0].get("message") or {}).get("content")
            rec.answer_sha = hashlib.sha256(text.encode()).hexdigest() if isinstance(text, str) else None
    rec.latency_ms = (time.perf_counter() - start) * 1e3


class _Replay:
    """Shared state of one run: client, clock, records and in-flight count (one event loop, no locks)."""

    def __init__(self, client: httpx.AsyncClient, url: str, model: str, items: Sequence[TraceItem],
                 stream: bool, timeout_s: float, bar: tqdm, deadlines: bool = True,
                 api_keys: Mapping[str, str] | None = None) -> None:
        self.client, self.url, self.model, self.items = client, url + CHAT_PATH, model, items
        self.deadlines, self.api_keys = deadlines, api_keys
        self.stream, self.timeout_s, self.bar = stream, timeout_s, bar
        self.t0 = time.perf_counter()
        self.records: list[RequestRecord] = []
        self.in_flight = self.max_in_flight = 0

    async def send(self, seq: int) -> None:
        item = self.items[seq % len(self.items)]
        start = time.perf_counter()
        rec = RequestRecord(seq=seq, id=item.id, priority=item.priority, tenant=item.tenant, kind=item.kind,
                            deadline_ms=item.deadline_ms, sent_s=start - self.t0)
        self.records.append(rec)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with asyncio.timeout(self.timeout_s):
                await _exchange(self.client, self.url, _body(item, self.model, self.stream),
                                _headers(item, self.deadlines, self.api_keys), rec, start)
        except TimeoutError:
            rec.outcome, rec.error = "error", f"timeout: no complete answer within {self.timeout_s:g} s"
        except httpx.HTTPError as exc:
            rec.outcome, rec.error = "error", f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
        except MalformedResponse as exc:
            rec.outcome, rec.error = "error", f"malformed response: {exc}"
        finally:
            self.in_flight -= 1  # a cancelled (lost) request leaves its record as "lost"
        if rec.latency_ms is None:  # a transport error, timeout or malformed body: time to the failure
            rec.latency_ms = (time.perf_counter() - start) * 1e3
        self.bar.update(1)

    async def closed(self, concurrency: int, total: int) -> None:
        seqs = iter(range(total))  # shared: each worker pulls the next position when it is free

        async def worker() -> None:
            for seq in seqs:
                await self.send(seq)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open(self, rate: float, total: int) -> None:
        span = self.items[-1].offset_s + 1.0 / BASE_RATE_REQ_S  # one pass of the trace, at the base rate
        tasks = []
        try:
            for seq in range(total):
                cycle, k = divmod(seq, len(self.items))
                at = (cycle * span + self.items[k].offset_s) * BASE_RATE_REQ_S / rate
                delay = self.t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.send(seq)))
            await asyncio.gather(*tasks)
        finally:  # at the cut-off: stop what is still in flight (its records stay "lost")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _check_args(url: str, items: Sequence[TraceItem], concurrency: int | None, rate: float | None,
                timeout_s: float, requests: int | None, max_duration_s: float | None) -> None:
    if (concurrency is None) == (rate is None):
        raise ValueError("loadtest: give exactly one of concurrency (closed loop) or rate (open loop)")
    if concurrency is not None and (type(concurrency) is not int or concurrency < 1):
        raise ValueError(f"loadtest: concurrency must be an integer >= 1, got {concurrency!r}")
    if rate is not None and not rate > 0:
        raise ValueError(f"loadtest: rate must be > 0 requests per second, got {rate!r}")
    if not items:
        raise ValueError("loadtest: the trace is empty")
    if requests is not None and requests < 1:
        raise ValueError(f"loadtest: requests must be >= 1, got {requests!r}")
    if not timeout_s > 0 or (max_duration_s is not None and not max_duration_s > 0):
        raise ValueError(f"loadtest: timeout_s and max_duration_s must be > 0, got {timeout_s!r} and "
                         f"{max_duration_s!r}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"loadtest: url must start with http:// or https://, got {url!r}")


async def run_load_async(url: str, model: str, items: Sequence[TraceItem], concurrency: int | None = None,
                         rate: float | None = None, stream: bool = False, timeout_s: float = 300.0,
                         requests: int | None = None, max_duration_s: float | None = None,
                         progress: bool = False, deadlines: bool = True,
                         api_keys: Mapping[str, str] | None = None) -> LoadResult:
    """`run_load` for callers already inside an event loop."""
    _check_args(url, items, concurrency, rate, timeout_s, requests, max_duration_s)
    if api_keys is not None:
        for item in items:
            _headers(item, api_keys=api_keys)  # a tenant without a key fails before anything is sent
    total = requests or len(items)
    # closed loop: exactly N connections; open loop: no pool cap, so the client never queues requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency or 64)
    # trust_env=False: no proxy from the environment between the generator and a loopback server
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        with tqdm(total=total, desc="loadtest", unit="req", disable=not progress, file=sys.stderr) as bar:
            replay = _Replay(client, url.rstrip("/"), model, items, stream, timeout_s, bar, deadlines, api_keys)
            cut_off = False
            try:
                async with asyncio.timeout(max_duration_s):
                    await (replay.closed(concurrency, total) if concurrency else replay.open(rate, total))
            except TimeoutError:
                cut_off = True  # requests still awaiting an answer stay "lost"; unsent ones are not counted
            duration = time.perf_counter() - replay.t0
    return LoadResult(mode="closed" if concurrency else "open", concurrency=concurrency, rate_req_s=rate,
                      stream=stream, duration_s=duration, max_in_flight=replay.max_in_flight,
                      records=sorted(replay.records, key=lambda r: r.seq), cut_off=cut_off)


def run_load(url: str, model: str, items: Sequence[TraceItem], concurrency: int | None = None,
             rate: float | None = None, stream: bool = False, timeout_s: float = 300.0,
             requests: int | None = None, max_duration_s: float | None = None,
             progress: bool = False, deadlines: bool = True,
             api_keys: Mapping[str, str] | None = None) -> LoadResult:
    """Replay `items` against `url` (the server root) in closed loop at `concurrency` or open loop at `rate`.

    `requests` (default: the trace length) requests are sent, cycling the trace; `timeout_s` bounds each
    request from send to last byte (an error), `max_duration_s` the whole run (answers still missing
    then are `lost`). `deadlines=False` leaves out the items' deadline header (the server's default
    deadline applies), to compare serving setups on the same requests without any refused.
    """
    return asyncio.run(run_load_async(url, model, items, concurrency, rate, stream, timeout_s, requests,
                                      max_duration_s, progress, deadlines, api_keys))


# ---------------------------------------------------------------- summary

def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _priority_block(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r.latency_ms for r in records if r.outcome == "ok"]
    return {"requests": len(records), "ok": len(ok), "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99),
            "deadline_met": round(sum(r.deadline_met for r in records) / len(records), 4),
            "rejected": sum(r.outcome == "rejected" for r in records),
            "errors": sum(r.outcome == "error" for r in records)}


def summarize(result: LoadResult, price_per_hour_usd: float, config: dict[str, Any]) -> dict[str, Any]:
    """One `serving.runs[]` entry.

    Latency percentiles (`p50_ms`...), `ttft_p50_ms` and throughput count successful (`ok`) requests
    only; rejections, errors and lost requests are counted apart. `rejected_p99_ms` is how fast 429s
    came back. `deadline_met` shares are over every request sent (a rejection misses its deadline).
    Cost per 1M requests = price per hour / 3600 x machine-seconds per request, with machine-seconds
    per request = wall duration / successful requests on one machine; None when nothing succeeded.
    An open-loop run reports the peak number of requests in flight as its `concurrency`.
    """
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"loadtest.summarize: config lacks {missing}; expected keys {list(CONFIG_KEYS)}")
    recs = result.records
    ok = [r for r in recs if r.outcome == "ok"]
    latencies = [r.latency_ms for r in ok]
    rejected = [r for r in recs if r.outcome == "rejected"]
    retry_after = [r.retry_after_s for r in rejected if r.retry_after_s is not None]
    errors = [r.error for r in recs if r.outcome == "error"]
    duration = max(result.duration_s, 1e-9)
    run: dict[str, Any] = {
        "config": dict(config),
        "mode": result.mode,
        "concurrency": result.concurrency if result.mode == "closed" else max(1, result.max_in_flight),
        "stream": result.stream,
        "requests": len(recs),
        "ok": len(ok),
        "duration_s": round(result.duration_s, 3),
        "throughput_req_s": round(len(ok) / duration, 4),
        "throughput_tok_s": round(sum(r.completion_tokens for r in ok) / duration, 2),
        "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95), "p99_ms": _pct(latencies, 99),
        "ttft_p50_ms": _pct([r.ttft_ms for r in ok if r.ttft_ms is not None], 50),
        "errors": len(errors),
        "rejected": len(rejected),
        "lost": sum(r.outcome == "lost" for r in recs),
        "rejected_p99_ms": _pct([r.latency_ms for r in rejected if r.latency_ms is not None], 99),
        "retry_after_p50_s": _pct(retry_after, 50),
        "deadline_met": round(sum(r.deadline_met for r in recs) / len(recs), 4) if recs else None,
        "by_priority": {p: _priority_block([r for r in recs if r.priority == p])
                        for p in PRIORITIES if any(r.priority == p for r in recs)},
        "error_examples": sorted(set(errors))[:3],
        "max_in_flight": result.max_in_flight,
        "cut_off": result.cut_off,
        "cost_per_1m_requests_usd": (round(cost_per_1m_requests(price_per_hour_usd, result.duration_s / len(ok)), 4)
                                     if ok else None),
    }
    if result.mode == "open":
        run["rate_req_s"] = result.rate_req_s
    return run


def cache_outcome(items: Sequence[TraceItem], records: Sequence[RequestRecord], *,
                  keyed_tenants: bool = False) -> dict[str, Any]:
    """The gateway's cache on one replay, judged against the trace's own truth, in the order requests
    really arrived rather than trace order (at 16 in flight a repeat can reach the gateway before its
    source, generate, and have the source coalesced onto it).

    A request's meaning group is its source's id (its own when fresh). A hit is false when
    - it has no possible source: no other request of its group (and tenant, when the gateway keeps
      tenants apart: `keyed_tenants`, its keyed mode; in open mode every request is one tenant) was sent
      before the hit was answered, so the cache could only have served another meaning's answer
      (`unsourced_hits`), or
    - its answer (by digest) is none of the answers the model generated for its group in this replay.
    A hit whose group generated nothing in this replay (every member was a hit, e.g. from an earlier
    replay's entries) cannot be checked: it counts as a hit, not as false, and is reported as
    `unchecked_hits`. Rates with exact (Clopper-Pearson) bounds."""
    from costopt.cache.calibrate import clopper_pearson, upper_bound

    def group(rec: RequestRecord) -> str:
        it = items[rec.seq % len(items)]
        return it.source_id or it.id

    def end_s(rec: RequestRecord) -> float:
        return rec.sent_s + (rec.latency_ms or 0.0) / 1000.0

    generated: dict[str, set[str]] = defaultdict(set)
    sent: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for rec in records:
        sent[(group(rec), rec.tenant if keyed_tenants else "")].append((rec.sent_s, rec.seq))
        if rec.outcome == "ok" and rec.answer_sha and not (rec.cache or "").startswith("hit"):
            generated[group(rec)].add(rec.answer_sha)
    hits = wrong = unsourced = unchecked = ok = 0
    for rec in records:
        if rec.outcome != "ok":
            continue
        ok += 1
        if not (rec.cache or "").startswith("hit"):
            continue
        hits += 1
        g = group(rec)
        if not any(seq != rec.seq and t <= end_s(rec) for t, seq in sent[(g, rec.tenant if keyed_tenants else "")]):
            unsourced += 1
            wrong += 1
        elif not generated[g]:
            unchecked += 1
        elif rec.answer_sha not in generated[g]:
            wrong += 1
    return {"hit_rate": hits / ok if ok else 0.0, "hits": hits, "false_hits": wrong, "unsourced_hits": unsourced,
            "unchecked_hits": unchecked, "false_hit_rate": wrong / hits if hits else 0.0,
            "false_hit_upper95": upper_bound(wrong, hits), "false_hit_ci95": list(clopper_pearson(wrong, hits))}


def serving_section(trace: dict[str, Any], runs: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The summary's `serving` block: `trace` (from `costopt.workload.trace.trace_meta`), `runs`, and any of
    `cache`, `routing`, `naive_cost_per_1m_requests_usd`, `optimized_cost_per_1m_requests_usd`."""
    missing = [k for k in ("name", "requests", "fingerprint") if k not in trace]
    if missing:
        raise ValueError(f"loadtest.serving_section: trace lacks {missing}; pass costopt.workload.trace.trace_meta(items)")
    allowed = {"cache", "routing", "naive_cost_per_1m_requests_usd", "optimized_cost_per_1m_requests_usd"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"loadtest.serving_section: unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    return {"trace": dict(trace), "runs": list(runs), **{k: v for k, v in extra.items() if v is not None}}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    cols = [("mode", "mode"), ("concurrency", "conc"), ("rate_req_s", "rate"), ("requests", "sent"),
            ("ok", "ok"), ("errors", "err"), ("rejected", "429"), ("lost", "lost"),
            ("throughput_req_s", "req/s"), ("throughput_tok_s", "tok/s"), ("p50_ms", "p50 ms"),
            ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("ttft_p50_ms", "ttft p50 ms"),
            ("cost_per_1m_requests_usd", "USD/1M req")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(run.get(k)) for k, _ in cols) + " |" for run in runs]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def _positive(kind: type) -> Any:
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if kind is int else '> 0'}, got {text!r}")
        return value
    return parse


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT or https://..., got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--url", type=_url, required=True, help="server root, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", required=True, help="the `model` field of each request")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=_positive(int), nargs="+", help="closed loop: one run per worker count")
    load.add_argument("--rate", type=_positive(float), nargs="+", help="open loop: one run per rate, requests/s")
    p.add_argument("--trace", type=Path, help="trace file from costopt.workload.trace.write_trace (default: build one)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the built trace (default: 1234)")
    p.add_argument("--requests", type=_positive(int), help="requests per run (default: the trace length, or 64 "
                   "for a built trace); the trace is cycled when shorter")
    p.add_argument("--stream", action="store_true", help="stream answers (SSE) and measure time to first token")
    p.add_argument("--timeout-s", type=_positive(float), default=300.0, help="per-request limit, s (default: 300)")
    p.add_argument("--max-duration-s", type=_positive(float), help="cut each run off after this long, s")
    p.add_argument("--no-deadlines", action="store_true", help="send no x-costopt-deadline-ms header (the "
                   "server's default deadline applies)")
    p.add_argument("--api-key", default=os.environ.get("COSTOPT_API_KEY"),
                   help="send `Authorization: Bearer KEY` with every request, for a server with tenant keys "
                        "(default: $COSTOPT_API_KEY; none: no header)")
    p.add_argument("--price-per-hour", type=_positive(float), help="USD per machine-hour (default: "
                   "cost.price_per_hour_usd from --params)")
    p.add_argument("--params", default="params.yaml", help="settings file for the price (default: params.yaml)")
    for flag in ("batching", "cache", "routing"):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=False,
                       help=f"label: the server runs with {flag} on (default: off)")
    p.add_argument("--variants", nargs="*", default=[], help="label: the variants the server serves")
    p.add_argument("--json", type=Path, help="also write the serving section here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _price(p: argparse.ArgumentParser, args: argparse.Namespace) -> float:
    if args.price_per_hour is not None:
        return args.price_per_hour
    from costopt.params import ParamsError, load_params
    try:
        return load_params(args.params).cost.price_per_hour_usd
    except (OSError, ParamsError) as exc:
        p.error(f"--price-per-hour not given and the price could not be read from --params {args.params}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    price = _price(p, args)
    try:
        items = read_trace(args.trace) if args.trace else build_trace(args.requests or 64, args.seed)
    except (OSError, TraceError) as exc:
        p.error(f"--trace: {exc}")
    config = {"batching": args.batching, "cache": args.cache, "routing": args.routing, "variants": args.variants}
    api_keys = None if not args.api_key else {it.tenant: args.api_key for it in items}
    runs = []
    for level in args.concurrency or args.rate:
        key = {"concurrency": level} if args.concurrency else {"rate": level}
        result = run_load(args.url, args.model, items, stream=args.stream, timeout_s=args.timeout_s,
                          requests=args.requests, max_duration_s=args.max_duration_s,
                          progress=not args.no_progress, deadlines=not args.no_deadlines, api_keys=api_keys,
                          **key)
        runs.append(summarize(result, price, config))
    print(markdown_table(runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(serving_section(trace_meta(items), runs), indent=2) + "\n")
    if not any(run["ok"] for run in runs):
        first = next((e for run in runs for e in run["error_examples"]), "every request was rejected or lost")
        print(f"error: no request succeeded; first error: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
