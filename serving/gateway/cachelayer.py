"""The gateway's cache module: which requests may use the cache, their keys, lookups and stores, and the
replay of a cached answer as a response or a stream. No HTTP here (`serving.gateway.server` wires it).

- Only deterministic requests use the cache: `temperature` 0 (the default of 1.0 samples, so a cached
  answer would be one draw of many), one choice. Everything else bypasses it.
- The key (`costopt.cache.store.CacheKey`) holds the tenant the API key named (in open mode every
  request is the one open tenant: a client-written label is never trusted to separate tenants), the
  model fingerprint, the variant asked for, every generation field that changes the answer
  (max_tokens, stop, response shape; seed and top_p do not change a greedy answer and are left out),
  and the conversation before the last user turn, system message included. The last user turn (or the
  completion prompt) is what is matched by meaning.
- Answers are stored only when whole: a generation that failed, was cancelled, or whose stream ended
  without a finish reason and `[DONE]` is never stored. An answer that stopped at `max_tokens`
  (`finish_reason: length`) is whole for that key, since max_tokens is part of it.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from costopt.cache.store import CacheKey, Hit, SemanticCache, normalize_prompt
from serving.protocol import ChunkMaker, chat_response, completion_response

OPEN_TENANT = "open"
def asks_logprobs(body: dict[str, Any]) -> bool:
    """Chat's `logprobs: true` or `top_logprobs`, or a completion's `logprobs: k` (0 included)."""
    lp = body.get("logprobs")
    return (lp is not None and lp is not False) or body.get("top_logprobs") is not None


_KEY_FIELDS = ("max_tokens", "max_completion_tokens", "stop", "response_format", "logit_bias")


@dataclass
class CacheRequest:
    key: CacheKey
    prompt: str
    chat: bool
    model: str
    stream: bool
    include_usage: bool
    vector: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Answer:
    """What a finished generation left behind, assembled from the predictor's response or stream."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    variant: str = ""
    failed: bool = False
    done: bool = False  # the stream's [DONE] arrived (always True for a plain response)

    @property
    def whole(self) -> bool:
        return not self.failed and self.done and self.finish_reason in ("stop", "length")

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "variant": self.variant}


class CacheLayer:
    """Plans, lookups and stores for the gateway; `cache` None means off, with `disabled_reason`."""

    def __init__(self, cache: SemanticCache | None, model_fingerprint: str, disabled_reason: str = "",
                 keyed_tenants: bool = False) -> None:
        self.cache, self.model_fingerprint = cache, model_fingerprint
        self.disabled_reason = disabled_reason if cache is None else ""
        self.keyed_tenants = keyed_tenants
        self._inflight: dict[tuple[str, str], asyncio.Event] = {}

    # Request coalescing: an exact repeat (same namespace, same prompt up to case and spacing) that
    # arrives while the first is still generating waits for it and is then served from L1, instead of
    # generating the same answer twice. Paraphrases are not coalesced (they are verified on lookup).
    def _flight(self, req: CacheRequest) -> tuple[str, str]:
        return req.key.namespace, normalize_prompt(req.prompt)

    def join(self, req: CacheRequest) -> asyncio.Event | None:
        """The event of an identical request already generating (wait on it, then look up again), or
        None: this request now leads, and `release` must follow whatever happens to it."""
        event = self._inflight.get(self._flight(req))
        if event is not None:
            return event
        self._inflight[self._flight(req)] = asyncio.Event()
        return None

    def release(self, req: CacheRequest) -> None:
        event = self._inflight.pop(self._flight(req), None)
        if event is not None:
            event.set()

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    def status(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False, "reason": self.disabled_reason}
        s = self.cache.config.setting
        return {"enabled": True, "levels": self.cache.sizes(), "threshold": s.threshold,
                "min_phrase_sim": s.min_phrase_sim, "store_prompts": self.cache.config.store_prompts,
                "stats": dict(self.cache.stats)}

    def plan(self, body: dict[str, Any], chat: bool, tenant: str | None) -> tuple[CacheRequest | None, str]:
        """(the cache request, "") or (None, why this request bypasses the cache). `body` was validated."""
        if self.cache is None:
            return None, "cache off"
        if float(body.get("temperature", 1.0)) != 0.0:
            return None, "temperature is not 0"
        if int(body.get("n", 1)) != 1:
            return None, "more than one choice"
        if asks_logprobs(body) or body.get("return_token_ids"):
            return None, "log-probs or token ids asked for (a cached answer has neither)"
        tenant = tenant if self.keyed_tenants and tenant else OPEN_TENANT
        params = tuple(sorted((k, json.dumps(body[k], sort_keys=True)) for k in _KEY_FIELDS if k in body))
        params += (("endpoint", "chat" if chat else "completions"),)
        if chat:
            messages = body["messages"]
            if messages[-1].get("role") != "user":
                return None, "the last message is not a user turn"
            prompt, context = messages[-1]["content"], json.dumps(messages[:-1], sort_keys=True, ensure_ascii=False)
        else:
            prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
            if not isinstance(prompt, str):
                return None, "the prompt is token ids (the cache matches text)"
            context = ""
        if not prompt.strip():
            return None, "empty prompt"
        key = CacheKey(tenant, self.model_fingerprint, str(body["model"]), params, context)
        stream = bool(body.get("stream"))
        usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        return CacheRequest(key, prompt, chat, str(body["model"]), stream, usage), ""

    async def lookup(self, req: CacheRequest) -> Hit | None:
        assert self.cache is not None
        cache = self.cache

        def run() -> Hit | None:
            req.vector = cache.encode([req.prompt])[0]
            return cache.lookup(req.key, req.prompt, req.vector)
        return await asyncio.to_thread(run)

    async def store(self, req: CacheRequest, answer: Answer) -> bool:
        """Store a whole answer (True) or refuse a partial one (False, counted)."""
        assert self.cache is not None
        if not answer.whole:
            self.cache.stats["not_stored_partial"] += 1
            return False
        await asyncio.to_thread(self.cache.store, req.key, req.prompt, answer.as_dict(), req.vector)
        return True

    def purge(self, tenant: str) -> dict[str, int]:
        assert self.cache is not None
        return self.cache.purge(tenant if self.keyed_tenants else OPEN_TENANT)


def reply(req: CacheRequest, hit: Hit) -> dict[str, Any]:
    """The non-streamed response for a hit, in the endpoint's shape."""
    a = hit.entry.answer
    build = chat_response if req.chat else completion_response
    return build(req.model, a["text"], a.get("finish_reason") or "stop", int(a.get("prompt_tokens", 0)),
                 int(a.get("completion_tokens", 0)))


_PIECE = re.compile(r"\S*\s*")


def replay_events(req: CacheRequest, hit: Hit) -> Iterator[bytes]:
    """The cached answer as server-sent events: the same chunk shapes the predictor streams, a word at a
    time, then the finish reason, the usage chunk when asked for, and `[DONE]`."""
    a = hit.entry.answer
    maker = ChunkMaker(req.model, req.chat)
    pieces = [p for p in _PIECE.findall(a["text"]) if p] or [""]
    yield _event(maker.chunk(pieces[0], None, first=True))
    for p in pieces[1:]:
        yield _event(maker.chunk(p, None))
    yield _event(maker.chunk("", a.get("finish_reason") or "stop"))
    if req.include_usage:
        yield _event(maker.usage_chunk(int(a.get("prompt_tokens", 0)), int(a.get("completion_tokens", 0))))
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class StreamCollector:
    """Reads the predictor's SSE bytes as they pass through and assembles the `Answer`."""

    def __init__(self, variant: str) -> None:
        self.answer, self.buffer = Answer(variant=variant), b""

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Complete events in `data` (with what came before), each as (bytes to relay, is a usage-only
        chunk); a usage-only chunk is relayed only to a client that asked for usage."""
        self.buffer += data
        out = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            usage_only = False
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    usage_only = self._data(line[6:].strip()) or usage_only
            out.append((event + b"\n\n", usage_only))
        return out

    def _data(self, payload: bytes) -> bool:
        if payload == b"[DONE]":
            self.answer.done = True
            return False
        try:
            obj = json.loads(payload)
        except ValueError:
            self.answer.failed = True
            return False
        if "error" in obj:
            self.answer.failed = True
            return False
        for choice in obj.get("choices") or []:
            delta = choice.get("delta")
            piece = (delta or {}).get("content") if delta is not None else choice.get("text")
            self.answer.text += piece or ""
            if choice.get("finish_reason"):
                self.answer.finish_reason = choice["finish_reason"]
        if obj.get("usage"):
            self.answer.prompt_tokens = int(obj["usage"].get("prompt_tokens", 0))
            self.answer.completion_tokens = int(obj["usage"].get("completion_tokens", 0))
            return not obj.get("choices")
        return False


def answer_from_body(body: dict[str, Any], chat: bool, variant: str) -> Answer:
    """The `Answer` in a plain (non-streamed) predictor response."""
    choice = (body.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    usage = body.get("usage") or {}
    return Answer(text=text or "", finish_reason=choice.get("finish_reason"), variant=variant,
                  prompt_tokens=int(usage.get("prompt_tokens", 0)),
                  completion_tokens=int(usage.get("completion_tokens", 0)), done=text is not None)
