"""HTTP routes costopt adds to KServe's FastAPI app: OpenAI-compatible completions, the model library.

- `POST /openai/v1/chat/completions`, `POST /openai/v1/completions` (SSE when `"stream": true`),
  `GET /openai/v1/models`. Request headers `x-costopt-priority` (high|normal|low, capped at the
  tenant's ceiling) and `x-costopt-deadline-ms` feed admission control; `x-costopt-tenant` is the tenant
  the API key named (`serving.tenants` rewrites both before any route reads them; in open mode the
  client's `x-costopt-tenant` is a label for the request log only).
- `POST /v2/repository/models/{name}/load` (load or hot-replace) and `.../unload`: KServe's model
  repository extension, registered ahead of KServe's own handlers so that an unknown variant is a 404
  naming the loadable ones rather than KServe's 503.
- A body-size guard for every route (413 naming the limit).

Log-probabilities (`logprobs`, chat's `top_logprobs`) and token ids (`return_token_ids`, and a completion
`prompt` given as ids) follow `serving.protocol`'s shapes; each streamed chunk carries those of its own
tokens. A request that asks for none of them is answered exactly as before they existed.

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for
anything the client can fix; a full queue is 429 with `Retry-After`.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving import metrics
from serving.admission import DeadlineExceeded, Priority, QueueFull, WouldMissDeadline
from serving.driver import EngineFault, Generation
from costopt.runtimes.engine import SamplingParams
from serving.library import ModelLibrary
from serving.model import Piece, VariantModel
from serving.protocol import (ApiError, ChatRequest, ChunkMaker, CompletionRequest, chat_logprobs, chat_response,
                              completion_logprobs, completion_response, lone_surrogate, parse)
from serving.reqlog import RequestLog
from serving.tenants import Guard, TenantKeys

_log = logging.getLogger(__name__)

MAX_TENANT = 64
_MS = re.compile(r"\s*[0-9]{1,9}\s*")  # a deadline in ms: 1 to 9 ASCII digits


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, counted as they arrive."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"request body: over the limit of {self.limit} bytes", param="body")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await error_response(too_big)(scope, receive, send)


class _TooBig(Exception):
    pass


class NoVersions:
    """ASGI middleware: KServe answers 501 to OIP v2's optional model versions; a request naming one is
    a client error here (one version per variant name), so it gets a 400 naming the field."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v2/models/") and (
                "/versions/" in scope["path"] or b"model_version=" in scope.get("query_string", b"")):
            err = ApiError(400, "model_version: variants are not versioned here; each variant name is one "
                                "version (load another name to serve another)", param="model_version")
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def _headers(request: Request) -> tuple[Priority, float | None, str]:
    h = request.headers
    try:
        priority = Priority.parse(h.get("x-costopt-priority"))
    except ValueError:
        raise ApiError(400, f"x-costopt-priority: expected high, normal or low, got "
                            f"{h.get('x-costopt-priority')!r}", param="x-costopt-priority") from None
    deadline = h.get("x-costopt-deadline-ms")
    if deadline is not None:
        # ASCII digits only: str.isdigit() also takes "²" (a latin-1 header byte) that int() refuses
        if not _MS.fullmatch(deadline) or not 1 <= int(deadline) <= 86_400_000:
            raise ApiError(400, f"x-costopt-deadline-ms: expected an integer number of ms in [1, 86400000], "
                                f"got {deadline!r}", param="x-costopt-deadline-ms")
    tenant = h.get("x-costopt-tenant", "default")
    if not 1 <= len(tenant) <= MAX_TENANT:
        raise ApiError(400, f"x-costopt-tenant: 1 to {MAX_TENANT} characters", param="x-costopt-tenant")
    return priority, None if deadline is None else int(deadline) / 1000, tenant


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body: not valid JSON ({exc})", param="body") from None
    except RecursionError:
        raise ApiError(400, "request body: nested too deeply", param="body") from None
    where = lone_surrogate(body)
    if where is not None:
        raise ApiError(400, f"{where}: not valid Unicode text (an unpaired UTF-16 surrogate escape)",
                       param=where)
    return body


class OpenAIRoutes:
    def __init__(self, library: ModelLibrary, reqlog: RequestLog) -> None:
        self.library, self.reqlog = library, reqlog

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "costopt"}
                                           for n in self.library.served()]}

    async def _serve(self, request: Request, chat: bool) -> Response:
        t0 = time.monotonic()
        log: dict[str, Any] = {"variant": "?", "priority": "normal", "tenant": "default", "prompt": None,
                               "prompt_field": "messages" if chat else "prompt", "prompt_tokens": 0}
        try:
            priority, deadline_s, tenant = _headers(request)
            log.update(priority=priority.name.lower(), tenant=tenant)
            req = parse(ChatRequest if chat else CompletionRequest, await _json(request))
            model = self.library.get_model(req.model)
            if model is None:
                served = ", ".join(self.library.served()) or "none"
                raise ApiError(404, f"model: {req.model!r} is not served here; served: {served}",
                               param="model", type_="model_not_found")
            log["variant"] = req.model  # only a served name becomes a metrics label: labels stay bounded
            if chat:
                log["prompt"] = [m.model_dump() for m in req.messages]
                ids = model.encode_chat(log["prompt"])
            elif req.token_ids() is not None:  # used as they are: no BOS, no template
                log["prompt"] = ids = model.check_token_ids(req.token_ids(), "prompt")
            else:
                log["prompt"] = req.text()
                ids = model.encode_text(log["prompt"])
            log["prompt_tokens"] = len(ids)
            opts = model.options
            wanted = req.wanted_tokens(min(opts.default_max_tokens, opts.max_tokens_limit))
            model.check_lengths(ids, wanted, "messages" if chat else "prompt")
            sampling = SamplingParams(max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                                      seed=req.seed, logprobs=req.logprobs_k())
            try:
                if deadline_s is not None:  # the deadline counts from arrival: parsing and tokenizing took some
                    deadline_s = max(1e-3, deadline_s - (time.monotonic() - t0))
                model, gen = self.library.submit(req.model, ids, sampling, priority, deadline_s)
            except QueueFull as exc:
                raise ApiError(429, f"queue full: {exc}", type_="rate_limit_exceeded",
                               headers=_retry_after(exc.retry_after_s)) from None
            except WouldMissDeadline as exc:
                raise ApiError(429, str(exc), param="x-costopt-deadline-ms", type_="deadline_unattainable",
                               headers=_retry_after(exc.retry_after_s)) from None
            metrics.PROMPT_TOKENS.labels(req.model).inc(len(ids))
            pieces = model.stream(gen, req.stops())
            first = await self._first(pieces)
            if req.stream:
                return StreamingResponse(self._sse(model, req, chat, gen, ids, first, pieces, log, t0),
                                         media_type="text/event-stream", headers=_served_by(model))
            try:
                got = [first] + [p async for p in pieces]
            except EngineFault as exc:
                raise ApiError(500, str(exc), type_="server_error") from None
            build = chat_response if chat else completion_response
            whole = Piece("".join(p.text for p in got), None, range(got[-1].tokens.stop),
                          tuple(o for p in got for o in p.offsets))
            body = build(req.model, whole.text, gen.finish_reason or "stop", len(ids), len(gen.tokens),
                         **_token_fields(model, req, gen, whole, ids))
            self._done(log, t0, gen, "ok", 200)
            return JSONResponse(body, headers=_served_by(model))
        except ApiError as exc:
            outcome = {429: "rejected", 404: "invalid", 400: "invalid", 413: "invalid"}.get(exc.status, "error")
            if exc.type == "deadline_exceeded":
                outcome = "expired"
            self._done(log, t0, None, outcome, exc.status)
            return error_response(exc)

    @staticmethod
    async def _first(pieces: AsyncIterator[Piece]) -> Piece:
        """The first piece, so queueing errors become a status code before any byte is streamed."""
        try:
            return await pieces.__anext__()
        except DeadlineExceeded as exc:
            raise ApiError(429, f"deadline exceeded before the request could start: {exc}",
                           param="x-costopt-deadline-ms", type_="deadline_exceeded",
                           headers={"Retry-After": "1"}) from None
        except EngineFault as exc:  # before ValueError: a fault of ours is never the client's
            raise ApiError(500, str(exc), type_="server_error") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def _sse(self, model: VariantModel, req: Any, chat: bool, gen: Any, prompt_ids: list[int], first: Piece,
                   pieces: AsyncIterator[Piece], log: dict, t0: float) -> AsyncIterator[bytes]:
        maker, outcome = ChunkMaker(req.model, chat), "cancelled"
        try:
            yield _event(maker.chunk(first.text, first.finish, first=True,
                                     **_token_fields(model, req, gen, first, prompt_ids)))
            async for p in pieces:
                yield _event(maker.chunk(p.text, p.finish, **_token_fields(model, req, gen, p)))
            if req.include_usage():
                yield _event(maker.usage_chunk(log["prompt_tokens"], len(gen.tokens)))
            yield b"data: [DONE]\n\n"
            outcome = "ok"
        except Exception as exc:  # mid-stream failure: say so in the stream, then end it cleanly
            outcome = "error"
            if not isinstance(exc, EngineFault):  # its message is safe; anything else stays in the log
                incident = uuid.uuid4().hex[:12]
                _log.error("stream of %s failed (incident %s)", req.model, incident, exc_info=exc)
                exc = RuntimeError(f"internal error while streaming; the server log holds the details under "
                                   f"incident {incident}")
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": 500}})
            yield b"data: [DONE]\n\n"
        finally:
            await pieces.aclose()
            self._done(log, t0, gen, outcome, 200)

    def _done(self, log: dict, t0: float, gen: Any, outcome: str, status: int) -> None:
        latency = time.monotonic() - t0
        ttft = None if gen is None or gen.first_token is None else gen.first_token - gen.submitted
        metrics.observe_request(log["variant"], log["priority"], outcome,
                                latency if outcome == "ok" else None, ttft)
        if outcome in ("rejected", "expired", "invalid"):
            metrics.REJECTIONS.labels(log["variant"], log["priority"], outcome).inc()
        if log["prompt"] is not None:
            self.reqlog.write(tenant=log["tenant"], variant=log["variant"], priority=log["priority"],
                              prompt=log["prompt"], prompt_field=log["prompt_field"],
                              prompt_tokens=log["prompt_tokens"],
                              completion_tokens=0 if gen is None else len(gen.tokens),
                              latency_ms=latency * 1000, outcome=outcome,
                              finish_reason=None if gen is None else gen.finish_reason, status=status)


def _token_fields(model: VariantModel, req: ChatRequest | CompletionRequest, gen: Generation, piece: Piece,
                  prompt_ids: list[int] | None = None) -> dict[str, Any]:
    """The logprobs and token-id fields a request asked for, for `piece`'s tokens (none asked: {}, so the
    choice is what it always was); `prompt_ids` for the first chunk or the whole answer only."""
    fields: dict[str, Any] = {}
    if req.logprobs_k() >= 0:
        entries = model.log_entries(gen, piece.tokens, piece.offsets)
        fields["logprobs"] = chat_logprobs(entries) if isinstance(req, ChatRequest) else completion_logprobs(entries)
    if req.return_token_ids:
        fields["token_ids"] = gen.tokens[piece.tokens.start:piece.tokens.stop]
        if prompt_ids is not None:
            fields["prompt_token_ids"] = list(prompt_ids)
    return fields


def _served_by(model: VariantModel) -> dict[str, str]:
    """Which loaded copy answered: a hot switch changes it (operators and tests read it)."""
    return {"x-costopt-variant": model.name, "x-costopt-instance": model.info.get("instance", "")}


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class RepositoryRoutes:
    def __init__(self, library: ModelLibrary) -> None:
        self.library = library

    async def load(self, model_name: str) -> Response:
        try:
            await self.library.load(model_name)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"name": model_name, "load": True})

    async def unload(self, model_name: str) -> Response:
        try:
            self.library.unload(model_name)
        except KeyError:
            return error_response(ApiError(404, f"model: {model_name!r} is not loaded; loaded: "
                                                f"{', '.join(self.library.served()) or 'none'}", param="model",
                                           type_="model_not_found"))
        return JSONResponse({"name": model_name, "unload": True})


def _inline(schema: Any, defs: dict) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _openapi(model: type) -> dict:
    """The request body and costopt headers in the OpenAPI schema (parsed by hand, for OpenAI-shaped errors)."""
    schema = model.model_json_schema()
    headers = [{"name": "x-costopt-priority", "in": "header", "required": False,
                "schema": {"type": "string", "enum": ["high", "normal", "low"]}},
               {"name": "x-costopt-deadline-ms", "in": "header", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 86_400_000}},
               {"name": "x-costopt-tenant", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_TENANT}}]
    return {"parameters": headers, "requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}}}


def _retry_after(seconds: float | None) -> dict[str, str]:
    """The Retry-After header, or none when retrying cannot help."""
    return {} if seconds is None else {"Retry-After": str(int(seconds))}


async def _overloaded(_: Any, exc: Exception) -> JSONResponse:
    """OIP v2 infer under load: KServe has no typed error for it (it would answer 500); send 429."""
    return error_response(ApiError(429, str(exc), type_="rate_limit_exceeded",
                                   headers=_retry_after(getattr(exc, "retry_after_s", 1.0))))


def register(app: FastAPI, library: ModelLibrary, reqlog: RequestLog, max_body_bytes: int,
             keys: TenantKeys | None, admin: str) -> None:
    """Add costopt's routes ahead of KServe's (first match wins), the body-size guard and, outermost, the
    tenant guard (keys, priority ceilings, quotas, the admin key: `serving.tenants`)."""
    openai, repo = OpenAIRoutes(library, reqlog), RepositoryRoutes(library)
    router = APIRouter()
    router.add_api_route("/openai/v1/chat/completions", openai.chat, methods=["POST"], tags=["OpenAI"],
                         openapi_extra=_openapi(ChatRequest))
    router.add_api_route("/openai/v1/completions", openai.completions, methods=["POST"], tags=["OpenAI"],
                         openapi_extra=_openapi(CompletionRequest))
    router.add_api_route("/openai/v1/models", openai.models, methods=["GET"], tags=["OpenAI"])
    router.add_api_route("/v2/repository/models/{model_name}/load", repo.load, methods=["POST"], tags=["V2"])
    router.add_api_route("/v2/repository/models/{model_name}/unload", repo.unload, methods=["POST"], tags=["V2"])
    app.include_router(router)
    for exc_type in (QueueFull, WouldMissDeadline, DeadlineExceeded):
        app.add_exception_handler(exc_type, _overloaded)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(NoVersions)
    app.add_middleware(Guard, keys=keys, admin=admin)  # added last: runs first


def bind_to(host: str) -> None:
    """Make KServe's REST server listen on `host`. KServe 0.21's `RESTServer` hard-codes 0.0.0.0 in its
    uvicorn config and `ModelServer` has no setting for it, so the server class `ModelServer.start` builds
    is swapped for a subclass that sets the host before uvicorn binds."""
    from kserve import model_server
    from kserve.protocol.rest.server import RESTServer

    class BoundRESTServer(RESTServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host  # read when uvicorn binds its socket, after this

    model_server.RESTServer = BoundRESTServer
