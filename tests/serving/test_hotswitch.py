"""Hot switch: a variant is replaced, and another unloaded and loaded again, while requests flow, with
zero failed requests; in-flight requests finish on the weights they started on. Once for a torch
variant and once for a llama.cpp one (its engine is replaced the same way)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from servers import GGUF_VARIANT, VARIANT, start_server

PROMPT = "Name three colours."
V2_BODY = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
           "parameters": {"max_tokens": 24}}


@pytest.fixture(scope="module", params=[VARIANT, GGUF_VARIANT], ids=["torch", "llamacpp"])
def server(request, workspace, tmp_path_factory):
    """fp32 and one variant (the one switched) behind one server."""
    log = tmp_path_factory.mktemp(f"hotswitch-{request.param}") / "server.log"
    srv = start_server(workspace, log, variants=("fp32", request.param))
    srv.variant = request.param
    yield srv
    srv.stop()


async def _traffic(url: str, variant: str, stop: asyncio.Event, results: list) -> None:
    body = {"model": variant, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while not stop.is_set():
            r = await http.post("/openai/v1/chat/completions", json=body)
            results.append((r.status_code, r.headers.get("x-costopt-instance"),
                            r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text))


async def _v2_traffic(url: str, variant: str, stop: asyncio.Event, results: list) -> None:
    """OIP v2 infer: KServe may hand it to the copy being retired; it must land on the replacement."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while not stop.is_set():
            r = await http.post(f"/v2/models/{variant}/infer", json=V2_BODY)
            results.append((r.status_code, "v2", r.json()["outputs"][0]["data"][0] if r.status_code == 200 else r.text))


async def _switch(url: str, variant: str, admin: dict[str, str]) -> tuple[list[int], list]:
    results: list = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_traffic(url, variant, stop, results)) for _ in range(5)]
    workers.append(asyncio.create_task(_v2_traffic(url, variant, stop, results)))
    codes = []
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=admin) as http:
        while len(results) < 6:
            await asyncio.sleep(0.2)
        codes.append((await http.post(f"/v2/repository/models/{variant}/load")).status_code)  # replace
        codes.append((await http.post("/v2/repository/models/fp32/unload")).status_code)
        codes.append((await http.post("/v2/repository/models/fp32/load")).status_code)
        n = len(results)
        while len(results) < n + 6:
            await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    return codes, results


def test_replace_and_reload_under_traffic_fail_nothing(server):
    codes, results = asyncio.run(_switch(server.url, server.variant, server.admin_headers))
    assert codes == [200, 200, 200], f"load, unload and load succeed: {codes}"
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"zero failed requests during the switch: {failed[:3]}"
    assert any(r[1] == "v2" for r in results), "OIP v2 requests flowed during the switch"
    instances = [r[1] for r in results if r[1] != "v2"]
    assert len(set(instances)) == 2, f"the replacement answers after the switch: {sorted(set(instances))}"
    assert instances[-1] != instances[0], "the last requests were answered by the replacement"
    assert len({r[2] for r in results}) == 1, "same weights reloaded: every greedy answer (OpenAI or v2) is the same"
    models = httpx.get(f"{server.url}/openai/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in models} == {"fp32", server.variant}, f"both variants serve again: {models}"


def test_unknown_variant_load_is_404_and_unload_of_missing_is_404(server):
    admin = server.admin_headers
    r = httpx.post(f"{server.url}/v2/repository/models/int3_magic/load", timeout=30, headers=admin)
    assert r.status_code == 404 and "int3_magic" in r.text and server.variant in r.text, r.text
    r = httpx.post(f"{server.url}/v2/repository/models/int3_magic/unload", timeout=30, headers=admin)
    assert r.status_code == 404, r.text
