"""The gateway's HTTP side: a KServe model server whose models are transformers in front of a predictor.

- OIP v2 (`/v2/models/{variant}/infer`, metadata, readiness) is KServe's own: each served variant is a
  `Passthrough` transformer (`kserve.Model` with the predictor host), so v2 requests go through KServe's
  client to the predictor unchanged (`x-costopt-cache: bypass`).
- OpenAI-compatible `/openai/v1/chat/completions` and `/openai/v1/completions` (streaming included)
  are costopt's routes: validated as the predictor validates them, looked up in the semantic cache
  (`serving.gateway.cachelayer`), answered from it (`x-costopt-cache: hit-l1|hit-l2|hit-l3`) or sent
  to the predictor (`miss`, or `bypass` when the request may not use the cache) and stored when whole.
  Every response says `x-costopt-variant`.
- `POST /v2/cache/purge` removes the caller's tenant's entries (the admin key may name any tenant with
  `?tenant=`); `/v2/health/ready` adds `details`: the cache's state (on, or off and why) and the predictor.
- The tenant guard (`serving.tenants.Guard`) and the body-size guard of the predictor run here too.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from kserve import Model
from prometheus_client import Counter, Histogram

from serving.api import BodyLimit, _json, error_response
from serving.gateway.cachelayer import (Answer, CacheLayer, CacheRequest, StreamCollector, answer_from_body,
                                        replay_events, reply)
from serving.protocol import ApiError, ChatRequest, CompletionRequest, parse
from serving.tenants import ADMIN_TENANT, Guard, TenantKeys

_log = logging.getLogger(__name__)

CACHE_RESULTS = Counter("costopt_gateway_requests_total", "gateway requests by cache outcome",
                        ["variant", "cache"])
LOOKUP_SECONDS = Histogram("costopt_gateway_cache_lookup_seconds", "embedding + lookup time per cacheable request",
                           buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0))
COALESCE_WAIT_S = 300.0  # longest an exact repeat waits for the identical request already generating
FALLBACK_STATUSES = (404, 429, 500, 502, 503, 504)  # a canary answer the current variant replaces
FORWARD = ("authorization", "x-costopt-priority", "x-costopt-deadline-ms", "x-costopt-tenant", "x-request-id")
RELAY = ("x-costopt-variant", "x-costopt-instance", "retry-after")


class Passthrough(Model):
    """One served variant as a KServe transformer: KServe forwards its v2 requests to the predictor."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True


class Upstream:
    """The predictor, over HTTP (httpx), with timeouts."""

    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.base_url,
                                        timeout=httpx.Timeout(timeout_s, connect=5.0))

    def headers(self, request: Request) -> dict[str, str]:
        out = {k: request.headers[k] for k in FORWARD if k in request.headers}
        out["content-type"] = "application/json"
        return out

    async def ready(self) -> bool:
        try:
            r = await self.client.get("/v2/health/ready", timeout=2.0)
            return r.status_code == 200
        except httpx.HTTPError:
            return False


def _unreachable(upstream: Upstream, exc: Exception) -> ApiError:
    return ApiError(502, f"predictor at {upstream.base_url} did not answer: {type(exc).__name__}",
                    type_="server_error")


DEFAULT_MAX_TOKENS = 128  # a chat request without max_tokens (the predictor's own default, serving.model)


class GatewayRoutes:
    def __init__(self, layer: CacheLayer, upstream: Upstream, routing: Any = None, rollout: Any = None) -> None:
        self.layer, self.upstream, self.routing = layer, upstream, routing  # routing: serving.gateway.routing.Routing
        self.rollout = rollout  # serving.gateway.rollout.Rollout: the deployment name, its variant and canary

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Response:
        path = "/openai/v1/chat/completions" if chat else "/openai/v1/completions"
        try:
            body = await _json(request)
            parse(ChatRequest if chat else CompletionRequest, body)  # the predictor's own validation and errors
            on_ok = None
            if self.rollout is not None and body.get("model") == self.rollout.deployment:
                variant, is_canary = self.rollout.pick()
                if is_canary:  # the canary's answers are judged on what it generates: no cache
                    return await self._canary(request, path, body, chat, variant)
                body = {**body, "model": variant}
                on_ok = lambda ms, v=variant: self.rollout.current_answered(v, ms)  # noqa: E731
            plan, _why = self.layer.plan(body, chat, request.headers.get("x-costopt-tenant"))
            if plan is not None:
                t0 = time.perf_counter()
                hit = await self.layer.lookup(plan)
                LOOKUP_SECONDS.observe(time.perf_counter() - t0)
                if hit is not None:
                    return self._hit(plan, hit)
                leading = await self._coalesce(plan)
                if leading is not True:  # an identical request just finished: its answer, if it was stored
                    hit = await self.layer.lookup(plan)
                    if hit is not None:
                        return self._hit(plan, hit)
                    plan = None  # it was not stored (failed or cut off): forward this one uncached
        except ApiError as exc:
            return error_response(exc)
        try:
            if self.routing is not None and body.get("model") == self.routing.config.model:
                if float(body.get("temperature", 1.0)) == 0.0:
                    return await self._routed(request, body, plan, chat)
                body = {**body, "model": self.routing.config.reference.name}  # not greedy: the reference whole
            if body.get("stream"):
                return await self._stream(request, path, body, plan)  # releases when the stream ends
            return await self._plain(request, path, body, plan, chat, on_ok)
        except ApiError as exc:
            if plan is not None:
                self.layer.release(plan)
            return error_response(exc)

    async def _routed(self, request: Request, body: dict, plan: CacheRequest | None, chat: bool) -> Response:
        """A greedy request for the routed model: across the tiers (serving.gateway.routing); a whole
        answer is stored in the cache like any other."""
        from serving.gateway.routing import HttpTiers

        routing = self.routing
        routing.check(body)
        req = parse(ChatRequest if chat else CompletionRequest, body)
        max_tokens = req.wanted_tokens(DEFAULT_MAX_TOKENS)
        tiers = HttpTiers(self.upstream.client, self.upstream.headers(request))
        outcome = "miss" if plan is not None else "bypass"
        CACHE_RESULTS.labels(routing.config.model, outcome).inc()

        async def on_done(text: str, result: Any, prompt_tokens: int) -> None:
            if plan is None:
                return
            try:
                if result is not None:
                    await self.layer.store(plan, Answer(text=text, finish_reason=result.finish_reason,
                                                        prompt_tokens=prompt_tokens,
                                                        completion_tokens=len(result.token_ids),
                                                        variant=",".join(result.tiers), done=True))
            finally:
                self.layer.release(plan)

        headers = {"x-costopt-cache": outcome}
        if body.get("stream"):
            return await routing.stream(body, chat, max_tokens, tiers, on_done, headers)
        return await routing.answer(body, chat, max_tokens, tiers, on_done, headers)

    async def _coalesce(self, plan: CacheRequest) -> bool:
        """True: this request leads (generates, then releases). False: an identical one was generating and
        has finished (or the wait timed out)."""
        event = self.layer.join(plan)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout=COALESCE_WAIT_S)
        except TimeoutError:
            pass
        return False

    def _hit(self, plan: CacheRequest, hit: Any) -> Response:
        variant = hit.entry.answer.get("variant") or plan.model
        headers = {"x-costopt-cache": f"hit-{hit.level}", "x-costopt-variant": variant}
        CACHE_RESULTS.labels(plan.model, f"hit-{hit.level}").inc()
        if plan.stream:
            return StreamingResponse(_iterate(replay_events(plan, hit)), media_type="text/event-stream",
                                     headers=headers)
        return JSONResponse(reply(plan, hit), headers=headers)

    async def _plain(self, request: Request, path: str, body: dict, plan: CacheRequest | None, chat: bool,
                     on_ok: Any = None) -> Response:
        t0 = time.perf_counter()
        try:
            r = await self.upstream.client.post(path, json=body, headers=self.upstream.headers(request))
        except httpx.HTTPError as exc:
            raise _unreachable(self.upstream, exc) from None
        if on_ok is not None and r.status_code == 200:
            on_ok((time.perf_counter() - t0) * 1000.0)
        headers = _relayed(r, plan, body)
        if plan is not None:
            try:
                if r.status_code == 200:
                    await self.layer.store(plan, answer_from_body(r.json(), chat,
                                                                  r.headers.get("x-costopt-variant", plan.model)))
            finally:
                self.layer.release(plan)
        return Response(r.content, status_code=r.status_code, headers=headers,
                        media_type=r.headers.get("content-type", "application/json"))

    async def _open_stream(self, request: Request, path: str, body: dict) -> httpx.Response:
        upstream_body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        req = self.upstream.client.build_request("POST", path, json=upstream_body, headers=self.upstream.headers(request))
        try:
            return await self.upstream.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(self.upstream, exc) from None

    async def _stream(self, request: Request, path: str, body: dict, plan: CacheRequest | None,
                      opened: httpx.Response | None = None, on_done: Any = None) -> Response:
        """Relay the predictor's stream (opened here unless `opened`); `on_done(answer, finished)` at its end."""
        asked_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        r = opened if opened is not None else await self._open_stream(request, path, body)
        headers = _relayed(r, plan, body)
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
            content = await r.aread()
            await r.aclose()
            if plan is not None:
                self.layer.release(plan)
            return Response(content, status_code=r.status_code, headers=headers,
                            media_type=r.headers.get("content-type", "application/json"))
        collector = StreamCollector(r.headers.get("x-costopt-variant", plan.model if plan else ""))

        async def relay() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for data in r.aiter_bytes():
                    for event, usage_only in collector.feed(data):
                        if not usage_only or asked_usage:
                            yield event
                finished = True
            except httpx.HTTPError:
                collector.answer.failed = True
                yield b'data: {"error": {"message": "the predictor stream broke off", "type": "server_error", ' \
                      b'"param": null, "code": 502}}\n\ndata: [DONE]\n\n'
            finally:  # a client that went away (cancelled) leaves finished False: nothing is stored
                await r.aclose()
                if on_done is not None:
                    on_done(collector.answer, finished)
                if plan is not None:
                    if not finished:
                        collector.answer.failed = True
                    try:
                        await self.layer.store(plan, collector.answer)
                    finally:
                        self.layer.release(plan)

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    async def _canary(self, request: Request, path: str, body: dict, chat: bool, candidate: str) -> Response:
        """A deployment request the canary takes. If the predictor refuses or fails it before the first byte,
        the current variant answers instead (the failure counts against the canary): no client request
        fails because of a canary."""
        rollout = self.rollout
        cbody = {**body, "model": candidate}
        fallback = {**body, "model": rollout.current}
        t0 = time.perf_counter()
        if body.get("stream"):
            try:
                r = await self._open_stream(request, path, cbody)
            except ApiError:
                r = None
            if r is None or r.status_code in FALLBACK_STATUSES or (
                    r.status_code == 200 and not r.headers.get("content-type", "").startswith("text/event-stream")):
                if r is not None:
                    await r.aread()
                    await r.aclose()
                if r is None or r.status_code != 429:  # a 429 sheds load, as the current would: not the canary's fault
                    rollout.canary_answered(candidate, False, None)
                return await self._stream(request, path, fallback, None)
            if r.status_code != 200:  # the request's own fault (400, 413): the current would refuse it too
                return await self._stream(request, path, cbody, None, opened=r)

            def on_done(answer: Any, finished: bool) -> None:
                ok = finished and not answer.failed
                rollout.canary_answered(candidate, ok, None)
                if ok and rollout.wants_judgement(candidate):
                    asyncio.get_running_loop().create_task(rollout.judge(candidate, body, chat, answer.text))

            return await self._stream(request, path, cbody, None, opened=r, on_done=on_done)
        try:
            r = await self.upstream.client.post(path, json=cbody, headers=self.upstream.headers(request))
        except httpx.HTTPError:
            r = None
        if r is None or r.status_code in FALLBACK_STATUSES:
            if r is None or r.status_code != 429:
                rollout.canary_answered(candidate, False, None)
            return await self._plain(request, path, fallback, None, chat)
        if r.status_code == 200:
            rollout.canary_answered(candidate, True, (time.perf_counter() - t0) * 1000.0)
            if rollout.wants_judgement(candidate):
                try:
                    text = answer_from_body(r.json(), chat, candidate).text
                except (ValueError, KeyError, TypeError):
                    text = ""
                asyncio.get_running_loop().create_task(rollout.judge(candidate, body, chat, text))
        return Response(r.content, status_code=r.status_code, headers=_relayed(r, None, cbody),
                        media_type=r.headers.get("content-type", "application/json"))

    async def models(self, request: Request) -> Response:
        try:
            r = await self.upstream.client.get("/openai/v1/models", headers=self.upstream.headers(request))
        except httpx.HTTPError as exc:
            return error_response(_unreachable(self.upstream, exc))
        if r.status_code != 200 or (self.routing is None and self.rollout is None):
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        listing = r.json()
        if self.routing is not None:
            listing.setdefault("data", []).append({"id": self.routing.config.model, "object": "model", "created": 0,
                                                   "owned_by": "costopt", "costopt_tiers":
                                                   [t.name for t in self.routing.config.tiers]})
        if self.rollout is not None:
            listing.setdefault("data", []).append({"id": self.rollout.deployment, "object": "model", "created": 0,
                                                   "owned_by": "costopt", "costopt_current": self.rollout.current})
        return JSONResponse(listing)

    async def purge(self, request: Request) -> Response:
        tenant = request.headers.get("x-costopt-tenant") or ""
        named = request.query_params.get("tenant")
        if named is not None:
            if tenant != ADMIN_TENANT:
                return error_response(ApiError(403, "tenant: only the admin key may purge another tenant's "
                                                    "entries; without ?tenant= a key purges its own",
                                               param="tenant", type_="permission_error"))
            tenant = named
        if not self.layer.enabled:
            return error_response(ApiError(503, f"cache: off ({self.layer.disabled_reason})",
                                           type_="server_error"))
        removed = self.layer.purge(tenant)
        return JSONResponse({"tenant": tenant if self.layer.keyed_tenants else "open", "removed": removed})

    async def ready(self) -> Response:
        up = await self.upstream.ready()
        body = {"ready": up, "details": {"predictor": {"url": self.upstream.base_url, "ready": up},
                                         "cache": self.layer.status()}}
        return JSONResponse(body, status_code=200 if up else 503)


def _relayed(r: httpx.Response, plan: CacheRequest | None, body: dict) -> dict[str, str]:
    """The predictor's headers a client may see, plus where this answer came from (counted)."""
    outcome = "miss" if plan is not None else "bypass"
    CACHE_RESULTS.labels(str(body.get("model")), outcome).inc()
    return {**{k: r.headers[k] for k in RELAY if k in r.headers}, "x-costopt-cache": outcome}


async def _iterate(events: Any) -> AsyncIterator[bytes]:
    for e in events:
        yield e


def register(app: FastAPI, layer: CacheLayer, upstream: Upstream, max_body_bytes: int, keys: TenantKeys | None,
             admin: str, routing: Any = None, rollout: Any = None) -> None:
    routes = GatewayRoutes(layer, upstream, routing, rollout)
    router = APIRouter()
    if rollout is not None:
        from serving.gateway.rollout import RolloutRoutes

        admin_routes = RolloutRoutes(rollout)
        router.add_api_route("/v2/rollout", admin_routes.get, methods=["GET"], tags=["rollout"])
        router.add_api_route("/v2/rollout", admin_routes.set_current, methods=["POST"], tags=["rollout"])
        router.add_api_route("/v2/rollout/canary", admin_routes.start, methods=["POST"], tags=["rollout"])
        router.add_api_route("/v2/rollout/canary", admin_routes.stop, methods=["DELETE"], tags=["rollout"])
    router.add_api_route("/openai/v1/chat/completions", routes.chat, methods=["POST"], tags=["OpenAI"])
    router.add_api_route("/openai/v1/completions", routes.completions, methods=["POST"], tags=["OpenAI"])
    router.add_api_route("/openai/v1/models", routes.models, methods=["GET"], tags=["OpenAI"])
    router.add_api_route("/v2/cache/purge", routes.purge, methods=["POST"], tags=["cache"])
    router.add_api_route("/v2/health/ready", routes.ready, methods=["GET"], tags=["V2"])
    app.include_router(router)  # before KServe adds its own routes at start: first match wins
    app.add_middleware(_V2Headers)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Guard, keys=keys, admin=admin)  # added last: runs first


class _V2Headers:
    """OIP v2 infer responses say where they came from too: the predictor (no cache), which variant."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v2/models/") and path.endswith("/infer")):
            return await self.app(scope, receive, send)
        variant = path[len("/v2/models/"):-len("/infer")].encode()

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-costopt-cache", b"bypass"),
                                                  (b"x-costopt-variant", variant)]}
            await send(message)
        await self.app(scope, receive, wrapped)

