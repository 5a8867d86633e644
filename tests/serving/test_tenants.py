"""The tenant guard on its own (serving.tenants): keys files, priority ceilings, quotas, the admin key.

An echo app behind `Guard` shows what a route downstream would see; the real server's wiring is tested in
test_tenants_server.py."""
from __future__ import annotations

import asyncio
import os
import stat

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.admission import Priority
from serving.tenants import (ENV_ADMIN, ENV_KEYS, ConfigError, Guard, Quotas, TenantKeys, TokenBucket, admin_key,
                             digest, load_keys)

ADMIN = "admin-key-" + "a" * 20
QUIET, NOISY, LOWLY = "quiet-key-" + "q" * 20, "noisy-key-" + "n" * 20, "lowly-key-" + "l" * 20
KEYS = {"defaults": {"max_priority": "normal", "rate": None, "max_concurrent": None},
        "tenants": {"quiet": {"keys": [f"sha256:{digest(QUIET)}"], "max_priority": "high"},
                    "noisy": {"keys": [NOISY], "max_concurrent": 2, "rate": 5, "burst": 3},
                    "lowly": {"keys": [LOWLY], "max_priority": "low"}}}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _app(keys: TenantKeys | None, clock: Clock | None = None, gate: asyncio.Event | None = None):
    async def echo(request: Request) -> JSONResponse:
        if gate is not None and request.url.path.endswith("/slow"):
            await gate.wait()
        return JSONResponse({"priority": request.headers.get("x-costopt-priority"),
                             "tenant": request.headers.get("x-costopt-tenant")})

    routes = [Route(p, echo, methods=["GET", "POST"]) for p in
              ("/openai/v1/chat/completions", "/openai/v1/slow", "/v2/models/m/infer", "/v2/models/m/ready",
               "/v2/health/ready", "/metrics", "/v2/repository/models/m/load", "/something/new")]
    return Guard(Starlette(routes=routes), keys=keys, admin=ADMIN, quotas=Quotas(clock or Clock()))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _run(coro):
    return asyncio.run(coro)


def test_keyed_mode_needs_a_valid_key_on_every_non_public_route():
    async def go():
        async with _client(_app(TenantKeys.parse(KEYS, "test"))) as c:
            for path in ("/openai/v1/chat/completions", "/v2/models/m/infer", "/something/new"):
                r = await c.post(path)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
                r = await c.post(path, headers=_auth("not-a-key-" + "x" * 20))
                assert r.status_code == 401 and "not a valid API key" in r.json()["error"]["message"], r.text
                assert "x" * 20 not in r.text, "a presented key is never echoed"
                r = await c.post(path, headers={"Authorization": "Basic dXNlcjpwdw=="})
                assert r.status_code == 401, "only Bearer keys"
            for path in ("/v2/health/ready", "/v2/models/m/ready", "/metrics"):
                assert (await c.get(path)).status_code == 200, f"{path} stays open for probes and scrapers"
            r = await c.post("/openai/v1/chat/completions", headers=_auth(QUIET))
            assert r.status_code == 200 and r.json()["tenant"] == "quiet", "a digest in the file matches its key"
    _run(go())


def test_tenant_comes_from_the_key_never_from_the_header():
    async def go():
        async with _client(_app(TenantKeys.parse(KEYS, "test"))) as c:
            r = await c.post("/openai/v1/chat/completions", headers={**_auth(LOWLY), "x-costopt-tenant": "quiet"})
            assert r.json()["tenant"] == "lowly", r.json()
    _run(go())


@pytest.mark.parametrize("key, asked, granted", [
    (QUIET, "high", "high"), (QUIET, None, "normal"),
    (NOISY, "high", "normal"), (NOISY, "low", "low"), (NOISY, " HIGH ", "normal"),
    (LOWLY, "high", "low"), (LOWLY, "normal", "low"),
    (ADMIN, "high", "high"),
])
def test_priority_is_capped_at_the_tenant_ceiling(key, asked, granted):
    async def go():
        async with _client(_app(TenantKeys.parse(KEYS, "test"))) as c:
            headers = _auth(key) | ({"x-costopt-priority": asked} if asked else {})
            r = await c.post("/v2/models/m/infer", headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["priority"] == granted, f"route saw {r.json()['priority']}, expected {granted}"
            assert r.headers["x-costopt-priority-granted"] == granted
    _run(go())


def test_an_unreadable_priority_reaches_the_route_unchanged_for_its_400():
    async def go():
        async with _client(_app(TenantKeys.parse(KEYS, "test"))) as c:
            r = await c.post("/v2/models/m/infer", headers=_auth(NOISY) | {"x-costopt-priority": "urgent"})
            assert r.json()["priority"] == "urgent" and "x-costopt-priority-granted" not in r.headers
    _run(go())


def test_admin_routes_need_the_admin_key_in_open_mode_too():
    async def go():
        for keys in (None, TenantKeys.parse(KEYS, "test")):
            async with _client(_app(keys)) as c:
                r = await c.post("/v2/repository/models/m/load")
                assert r.status_code == 401, r.text
                r = await c.post("/v2/repository/models/m/load", headers=_auth("wrong-" + "w" * 20))
                assert r.status_code == 401, r.text
                assert (await c.post("/v2/repository/models/m/load", headers=_auth(ADMIN))).status_code == 200
        async with _client(_app(TenantKeys.parse(KEYS, "test"))) as c:
            r = await c.post("/v2/repository/models/m/load", headers=_auth(QUIET))
            assert r.status_code == 403 and "quiet" in r.json()["error"]["message"], r.text
    _run(go())


def test_open_mode_serves_everyone_as_one_tenant_keeping_the_label():
    async def go():
        async with _client(_app(None)) as c:
            r = await c.post("/openai/v1/chat/completions",
                             headers={"x-costopt-tenant": "team-a", "x-costopt-priority": "high"})
            assert r.status_code == 200 and r.json() == {"priority": "high", "tenant": "team-a"}
    _run(go())


def test_rate_limit_is_a_429_with_retry_after_and_refills():
    clock = Clock()

    async def go():
        async with _client(_app(TenantKeys.parse(KEYS, "test"), clock)) as c:
            codes = [(await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))).status_code
                     for _ in range(4)]
            assert codes == [200, 200, 200, 429], f"burst 3: {codes}"
            r = await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.headers
            assert "rate limit of 5 requests/s" in r.json()["error"]["message"], r.text
            assert (await c.post("/openai/v1/chat/completions", headers=_auth(QUIET))).status_code == 200, \
                "another tenant is not affected"
            clock.t += 0.2  # one token back at 5/s
            assert (await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))).status_code == 200
            assert (await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))).status_code == 429
    _run(go())


def test_concurrency_limit_counts_requests_until_their_answer_ends():
    async def go():
        gate = asyncio.Event()
        guard = _app(TenantKeys.parse({**KEYS, "tenants": {**KEYS["tenants"], "noisy": {
            "keys": [NOISY], "max_concurrent": 2, "rate": None}}}, "test"), gate=gate)
        async with _client(guard) as c:
            slow = [asyncio.create_task(c.post("/openai/v1/slow", headers=_auth(NOISY))) for _ in range(2)]
            while guard.quotas.in_flight.get("noisy", 0) < 2:
                await asyncio.sleep(0.01)
            r = await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))
            assert r.status_code == 429 and "2 requests in flight" in r.text and r.headers["retry-after"] == "1"
            assert (await c.post("/openai/v1/chat/completions", headers=_auth(QUIET))).status_code == 200
            gate.set()
            assert [(await s).status_code for s in slow] == [200, 200]
            assert guard.quotas.in_flight["noisy"] == 0, "every slot is given back"
            assert (await c.post("/openai/v1/chat/completions", headers=_auth(NOISY))).status_code == 200
    _run(go())


def test_token_bucket_arithmetic():
    b = TokenBucket(rate=2.0, size=2, now=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.25) == pytest.approx(0.25), "half a token back after 0.25 s at 2/s"
    assert b.take(0.5) == 0
    assert b.take(100.0) == 0 and b.take(100.0) == 0 and b.take(100.0) > 0, "never more than the bucket holds"


@pytest.mark.parametrize("doc, named", [
    ({}, "tenants"),
    ({"tenants": {}}, "tenants"),
    ({"tenants": {"a": {"keys": []}}}, "tenants.a.keys"),
    ({"tenants": {"a": {"keys": ["short"]}}}, "tenants.a.keys[0]"),
    ({"tenants": {"a": {"keys": ["k" * 20], "max_priority": "urgent"}}}, "tenants.a.max_priority"),
    ({"tenants": {"a": {"keys": ["k" * 20], "rate": -1}}}, "tenants.a.rate"),
    ({"tenants": {"a": {"keys": ["k" * 20], "max_concurrent": 1.5}}}, "tenants.a.max_concurrent"),
    ({"tenants": {"a": {"keys": ["k" * 20], "quota": 3}}}, "unknown field"),
    ({"tenants": {"a": {"keys": ["k" * 20]}, "b": {"keys": ["k" * 20]}}}, "also listed for tenant 'a'"),
    ({"tenants": {"admin": {"keys": ["k" * 20]}}}, "tenants.admin"),
    ({"tenants": {"a b": {"keys": ["k" * 20]}}}, "tenants.a b"),
    ({"tenants": {"a": {"keys": ["k" * 20]}}, "defaults": {"keys": ["x" * 20]}}, "defaults.keys"),
    ({"tenants": {"a": {"keys": ["k" * 20]}}, "extra": 1}, "unknown top-level"),
])
def test_bad_keys_files_name_the_field(doc, named):
    with pytest.raises(ConfigError, match=None) as info:
        TenantKeys.parse(doc, "keys file k.yaml")
    assert named in str(info.value), str(info.value)


def test_defaults_apply_to_tenants_without_their_own_limits():
    keys = TenantKeys.parse({"defaults": {"max_priority": "low", "max_concurrent": 3},
                             "tenants": {"a": {"keys": ["k" * 20]}, "b": {"keys": ["j" * 20], "max_priority": "high"}}},
                            "t")
    a, b = keys.lookup("k" * 20), keys.lookup("j" * 20)
    assert a.quota.max_priority == Priority.LOW and a.quota.max_concurrent == 3
    assert b.quota.max_priority == Priority.HIGH and b.quota.max_concurrent == 3


def test_keys_from_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "keys.yaml"
    path.write_text("tenants:\n  team-a:\n    keys: ['%s']\n" % ("k" * 20))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        TenantKeys.from_file(path)
    path.chmod(0o600)
    assert TenantKeys.from_file(path).lookup("k" * 20).name == "team-a"
    monkeypatch.setenv(ENV_KEYS, f"x={'x' * 20},y={'y' * 20},x={'z' * 20}")
    keys = load_keys(None)
    assert [t.name for t in keys.tenants] == ["x", "y"] and keys.lookup("z" * 20).name == "x"
    monkeypatch.setenv(ENV_KEYS, str(path))
    assert load_keys(None).lookup("k" * 20).name == "team-a"
    monkeypatch.setenv(ENV_KEYS, "x=")
    with pytest.raises(ConfigError, match=ENV_KEYS):
        load_keys(None)
    monkeypatch.delenv(ENV_KEYS)
    assert load_keys(None) is None, "no setting: open mode"


def test_admin_key_is_generated_once_into_a_private_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_ADMIN, raising=False)
    path = tmp_path / "ws" / ".costopt" / "admin.key"
    key, where = admin_key(path)
    assert "generated" in where and len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert admin_key(path) == (key, str(path)), "the second start reads the same key"
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        admin_key(path)
    monkeypatch.setenv(ENV_ADMIN, "from-the-environment-1234")
    assert admin_key(path)[0] == "from-the-environment-1234", "the environment wins (a pod's Secret)"
    monkeypatch.setenv(ENV_ADMIN, "short")
    with pytest.raises(ConfigError, match=ENV_ADMIN):
        admin_key(path)
