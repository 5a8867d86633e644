"""The OpenAI-compatible request and response shapes, and the errors every endpoint returns.

KServe 0.21 ships OpenAI endpoints, but they import vLLM's protocol types (its `llm` extra pins
vllm==0.24, a GPU build that does not install on this CPU), so the model server registers none
without vLLM. These pydantic models describe the subset costopt serves: `/openai/v1/completions` and
`/openai/v1/chat/completions`, streaming included, one choice per request. Unknown fields are ignored,
as OpenAI-compatible servers do; a known field with a wrong type or range is a 400 that names it.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        message = printable(message)  # a client's lone surrogate echoed back must not break the JSON encoder
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def printable(text: str) -> str:
    """`text` with any lone UTF-16 surrogate written as a `\\udXXX` escape, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(obj: Any, path: str = "") -> str | None:
    """Where the first unpaired UTF-16 surrogate sits in a decoded JSON body (a dotted path), or None.

    JSON may escape one (`"\\udc80"`) and Python's decoder keeps it, but it is not Unicode text: no
    tokenizer takes it and no UTF-8 writer (the request log, the metrics page) can write it.
    """
    stack = [(path, obj)]
    while stack:  # depth-first, iterative: a body nested as deep as the JSON decoder allows is fine
        where, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return printable(where or "body")
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = []
        for key, child in items:
            at = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return printable(at)
            children.append((at, child))
        stack.extend(reversed(children))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("at most 4 stop strings of 1-64 characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(max_length=200_000)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("one prompt per request (a string, or a list of one string)")
        if not (v if isinstance(v, str) else v[0]):
            raise ValueError("empty prompt")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def wanted_tokens(self, default: int) -> int:
        return self.max_tokens or default


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f", got {str(got)[:80]!r}"
        raise ApiError(400, f"{field}: {err['msg']}{shown}", param=field) from None


def _ids(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    rid, created = _ids("chatcmpl")
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    rid, created = _ids("cmpl")
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


class ChunkMaker:
    """SSE chunks of one streamed answer, sharing its id and creation time."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id, self.created = _ids("chatcmpl" if chat else "cmpl")

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
