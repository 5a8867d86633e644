"""Admission over HTTP on a server with a tiny batch and queue: a full queue answers 429 with
Retry-After at once, high priority still gets in, an expired deadline is refused before compute, and
no admitted request is lost."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from servers import start_server

BODY = {"model": "fp32", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
        "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def small(workspace, tmp_path_factory):
    log = tmp_path_factory.mktemp("small") / "server.log"
    srv = start_server(workspace, log, "--max_batch", "2", "--reserved_high", "1", "--max_queue", "4",
                       "--high_queue_reserve", "1", "--fixed_batching", "--default_deadline_s", "600",
                       variants=("fp32",))
    yield srv
    srv.stop()


async def _one(http: httpx.AsyncClient, **headers: str) -> tuple[int, float, httpx.Headers, str]:
    t0 = time.monotonic()
    r = await http.post("/openai/v1/chat/completions", json=BODY, headers=headers)
    return r.status_code, time.monotonic() - t0, r.headers, r.text


async def _flood(url: str) -> tuple[list, tuple]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        normal = [asyncio.create_task(_one(http)) for _ in range(10)]
        await asyncio.sleep(0.3)
        high = asyncio.create_task(_one(http, **{"x-costopt-priority": "high"}))
        await asyncio.sleep(1.0)  # `high` holds the reserved slot by now: this one must queue, and expires
        late = asyncio.create_task(_one(http, **{"x-costopt-priority": "high", "x-costopt-deadline-ms": "50"}))
        return await asyncio.gather(*normal), (await high, await late)


def test_flood_rejects_fast_admits_high_and_loses_nothing(small):
    normal, (high, late) = asyncio.run(_flood(small.url))
    codes = [c for c, *_ in normal]
    assert set(codes) <= {200, 429}, f"only answers and 429s, never a 5xx: {codes}"
    assert codes.count(200) in (3, 4) and codes.count(429) == 10 - codes.count(200), \
        f"the three queue places (and the one normal slot) are served, the rest refused: {codes}"
    for code, seconds, headers, text in normal:
        if code == 429:
            assert int(headers["retry-after"]) >= 1, "429 carries Retry-After"
            assert seconds < 2.0, f"a 429 comes back at once, not after queueing ({seconds:.2f} s)"
            assert "queue" in text, text
    assert high[0] == 200, f"high priority is admitted under load (reserved queue place and slot): {high[3]}"
    assert late[0] == 429 and "deadline" in late[3], f"an expired deadline is refused before compute: {late[3]}"
    metrics = httpx.get(f"{small.url}/metrics", timeout=30).text
    assert 'outcome="error"' not in metrics, "no admitted request failed"
