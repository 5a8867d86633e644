"""The gateway's precision routing over HTTP: `costopt.routing.router` with the predictor's tiers.

A request for the routed model (`--router_model`, default `routed`) is tokenized here the way the
predictor would (its chat template; a completion's text without special tokens, or its token ids as
given), then each tier is asked on `/openai/v1/completions` with the prompt as token ids, greedy,
streamed, with log-probs and token ids (`logprobs: 0`, `return_token_ids`), so the router sees every
token's probability and the next tier continues from exactly the same tokens. An escalation closes
the cheap tier's stream (the predictor cancels that generation). The client gets one answer, streamed
or not, in the shape it asked for; `x-costopt-variant` lists the tiers that answered, in order, and
`x-costopt-escalations` how many times the request moved up.

A tier that refuses (404: not loaded, 429, 503, any 5xx), cannot be reached or breaks off is skipped (counted in
`costopt_gateway_router_skips_total`); a 4xx other than 429 is the request's own fault and is
returned as it is. Requests that are not greedy (temperature above 0) go to the reference tier
whole: the thresholds were fitted on greedy answers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter

from costopt.routing.router import (Finish, RouterConfig, RouterConfigError, RouteResult, TierUnavailable, Token,
                                    route)
from serving.gateway.cachelayer import asks_logprobs
from serving.protocol import ApiError, ChunkMaker, chat_response, completion_response

_log = logging.getLogger(__name__)

ROUTED = Counter("costopt_gateway_routed_requests_total", "routed requests by the tier they finished on",
                 ["finished_on"])
ESCALATIONS = Counter("costopt_gateway_router_escalations_total", "escalations by tier pair", ["from_tier", "to_tier"])
SKIPS = Counter("costopt_gateway_router_skips_total", "tiers skipped because they were down or overloaded", ["tier"])
UNAVAILABLE = (404, 429, 502, 503, 504)  # 404: the tier is not loaded (down, or switched away)


def load_router(path: Path | None, model: str, fallback: str | None) -> tuple[RouterConfig | None, str]:
    """(the router, how it was set up) from `path`; with no usable file, everything to `fallback` (logged
    by the caller), or no routing at all when there is no fallback either."""
    if path is not None:
        try:
            config = RouterConfig.from_dict(json.loads(Path(path).read_text()))
            if config.model != model:
                config = RouterConfig(model, config.tiers, config.fitted)
            return config, f"tiers {[(t.name, t.threshold) for t in config.tiers]} from {path}"
        except FileNotFoundError:
            why = f"{path}: missing"
        except (OSError, ValueError, RouterConfigError) as exc:  # JSONDecodeError is a ValueError
            why = f"{path}: unusable ({exc})"
    else:
        why = "no --router file"
    if fallback:
        return RouterConfig.reference_only(model, fallback), f"{why}: routing everything to {fallback}"
    return None, f"{why}: no routing"


class HttpTiers:
    """`generate` for the router: one predictor tier over HTTP (see the module docstring)."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        self.client, self.headers = client, headers
        self.t0 = time.monotonic()

    def _headers(self) -> dict[str, str]:
        """The client's headers; its deadline shortened by the time already spent on earlier tiers."""
        out = dict(self.headers)
        if "x-costopt-deadline-ms" in out:
            try:
                left = float(out["x-costopt-deadline-ms"]) - (time.monotonic() - self.t0) * 1e3
                out["x-costopt-deadline-ms"] = str(max(1, int(left)))
            except ValueError:
                pass  # the predictor answers a malformed deadline with its own 400
        return out

    async def generate(self, tier: str, ids: list[int], max_new: int) -> AsyncIterator[Token | Finish]:
        body = {"model": tier, "prompt": ids, "max_tokens": max_new, "temperature": 0, "stream": True,
                "logprobs": 0, "return_token_ids": True}
        req = self.client.build_request("POST", "/openai/v1/completions", json=body, headers=self._headers())
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            SKIPS.labels(tier).inc()
            raise TierUnavailable(f"{tier}: unreachable ({type(exc).__name__})") from None
        try:
            if r.status_code != 200:
                content = await r.aread()
                if r.status_code in UNAVAILABLE or r.status_code >= 500:
                    SKIPS.labels(tier).inc()
                    raise TierUnavailable(f"{tier}: HTTP {r.status_code}", status=r.status_code,
                                          retry_after=r.headers.get("retry-after"))
                raise _as_error(r.status_code, content)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    SKIPS.labels(tier).inc()
                    raise TierUnavailable(f"{tier}: {event['error'].get('message', 'stream error')}")
                choice = (event.get("choices") or [None])[0]
                if choice is None:
                    continue  # the usage chunk
                lps = choice.get("logprobs") or {}
                steps = list(zip(choice.get("token_ids") or [], lps.get("token_logprobs") or [],
                                 lps.get("costopt_entropy") or [None] * len(choice.get("token_ids") or [])))
                if choice.get("finish_reason") == "stop" and steps:
                    steps.pop()  # the EOS token that ended it: not part of the answer, never judged
                for tid, lp, ent in steps:
                    yield Token(int(tid), math.exp(lp), ent)
                if choice.get("finish_reason"):
                    yield Finish(choice["finish_reason"])
                    return
        except httpx.HTTPError as exc:
            SKIPS.labels(tier).inc()
            raise TierUnavailable(f"{tier}: the stream broke off ({type(exc).__name__})") from None
        finally:
            await r.aclose()


def _as_error(status: int, content: bytes) -> ApiError:
    try:
        err = json.loads(content)["error"]
        return ApiError(status, err.get("message", ""), param=err.get("param"), type_=err.get("type", "invalid_request_error"))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, content.decode("utf-8", "replace")[:500])


class Routing:
    """The routed model's requests: tokenize, route, answer (streamed or not), and what to cache."""

    def __init__(self, config: RouterConfig, tokenizer: Any) -> None:
        self.config, self.tok = config, tokenizer

    def check(self, body: dict[str, Any]) -> None:
        """What routing cannot honour is refused, naming the field."""
        if body.get("stop"):
            raise ApiError(400, f"stop: stop sequences are not supported for the routed model "
                                f"{self.config.model!r}; ask a variant directly", param="stop")
        if asks_logprobs(body) or body.get("return_token_ids"):
            raise ApiError(400, f"logprobs: not available from the routed model {self.config.model!r} (its tokens "
                                f"come from several tiers); ask a variant directly", param="logprobs")

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            ids = self.tok.apply_chat_template(list(body["messages"]), add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return list(self.tok(prompt, add_special_tokens=False)["input_ids"])

    def headers(self, result: RouteResult) -> dict[str, str]:
        return {"x-costopt-variant": ",".join(result.tiers) or self.config.reference.name,
                "x-costopt-escalations": str(len(result.escalations))}

    def _count(self, result: RouteResult) -> None:
        ROUTED.labels(result.finished_on or "none").inc()
        for e in result.escalations:
            ESCALATIONS.labels(e["from"], e["to"]).inc()

    async def answer(self, body: dict[str, Any], chat: bool, max_tokens: int, tiers: HttpTiers,
                     on_done: Any, extra_headers: dict[str, str]) -> Response:
        """A plain response. `on_done(text, result or None, prompt_tokens)` is awaited exactly once:
        with the whole answer, or with None when routing failed."""
        ids, result, text = self.prompt_ids(body, chat), None, ""
        try:
            result = await route(self.config, ids, max_tokens, tiers.generate)
            self._count(result)
            text = self.tok.decode(result.token_ids, skip_special_tokens=True)
        except TierUnavailable as exc:  # the last tier refused or failed
            if exc.status == 429:  # overloaded, or a deadline it would miss: the client may retry
                raise ApiError(429, f"model: every tier of {self.config.model!r} is overloaded or would miss the "
                                    f"deadline; the last: {exc}", type_="rate_limit_error",
                               headers={"retry-after": exc.retry_after} if exc.retry_after else None) from None
            raise ApiError(502, f"model: every tier of {self.config.model!r} failed; the last: {exc}",
                           type_="server_error") from None
        finally:
            await on_done(text, result, len(ids))
        make = chat_response if chat else completion_response
        out = make(self.config.model, text, result.finish_reason, len(ids), len(result.token_ids))
        return JSONResponse(out, headers={**extra_headers, **self.headers(result)})

    async def stream(self, body: dict[str, Any], chat: bool, max_tokens: int, tiers: HttpTiers,
                     on_done: Any, extra_headers: dict[str, str]) -> Response:
        """A streamed response: the accepted tokens' text as it comes. The tiers that will answer are not
        known when the headers leave, so `x-costopt-variant` names the first tier; the last chunk says
        which tiers answered (`costopt_route`)."""
        from serving.model import Detokenizer

        ids = self.prompt_ids(body, chat)
        maker, detok = ChunkMaker(self.config.model, chat), Detokenizer(self.tok)
        queue: asyncio.Queue = asyncio.Queue()
        asked_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def on_token(token_id: int, tier: str) -> None:
            delta = detok.push(token_id)
            if delta:
                await queue.put(delta)

        async def run() -> RouteResult | Exception:
            try:
                return await route(self.config, ids, max_tokens, tiers.generate, on_token)
            except Exception as exc:  # reported in the stream; never left unread
                return exc
            finally:
                await queue.put(None)

        task = asyncio.create_task(run())

        async def events() -> AsyncIterator[bytes]:
            done: RouteResult | None = None
            try:
                if chat:
                    yield _sse(maker.chunk(None, first=True))
                while (delta := await queue.get()) is not None:
                    yield _sse(maker.chunk(delta))
                result = await task
                if isinstance(result, Exception):
                    msg = f"every tier of {self.config.model!r} failed; the last: {result}"
                    yield _sse({"error": {"message": msg, "type": "server_error", "param": None, "code": 502}})
                    yield b"data: [DONE]\n\n"
                    return
                self._count(result)
                last = maker.chunk(None, finish=result.finish_reason)
                last["costopt_route"] = {"tiers": result.tiers, "escalations": len(result.escalations)}
                yield _sse(last)
                if asked_usage:
                    yield _sse(maker.usage_chunk(len(ids), len(result.token_ids)))
                yield b"data: [DONE]\n\n"
                done = result
            finally:  # a client that went away leaves done None: nothing is stored
                if not task.done():  # stop generating
                    task.cancel()
                await on_done(self.tok.decode(done.token_ids, skip_special_tokens=True) if done else "", done,
                              len(ids))

        first = self.config.tiers[0].name
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**extra_headers, "x-costopt-variant": first})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

