"""The OpenAI-compatible request and response shapes, and the errors every endpoint returns.

KServe 0.21 ships OpenAI endpoints, but they import vLLM's protocol types (its `llm` extra pins
vllm==0.24, a GPU build that does not install on this CPU), so the model server registers none
without vLLM. These pydantic models describe the subset costopt serves: `/openai/v1/completions` and
`/openai/v1/chat/completions`, streaming included, one choice per request. Unknown fields are ignored,
as OpenAI-compatible servers do; a known field with a wrong type or range is a 400 that names it.

Log-probabilities come in both of OpenAI's shapes (chat: `logprobs` + `top_logprobs`, a `content` list
of entries; completions: the legacy `logprobs: k`, parallel lists), each with a costopt extension, the
entropy of the whole next-token distribution (`costopt_entropy`). `return_token_ids` (a costopt
extension, as vLLM's field of that name) adds the prompt's and the answer's token ids to the choice, and
a completion's `prompt` may be token ids, so a caller can continue an answer from exactly its tokens.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's limit for completions)


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
    return_token_ids: bool = False  # costopt extension: the choice gets prompt_token_ids and token_ids

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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_k(self) -> int:
        """SamplingParams.logprobs: -1 = none asked for, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else -1

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    # text, or token ids used as they are (no BOS, no template); a list of one of either is one prompt too
    prompt: str | list[str] | list[int] | list[list[int]] = Field(max_length=200_000)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (legacy form)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        """The one prompt, as text or token ids; one message for every wrong shape (a union's errors
        would name its members instead of the field)."""
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        if isinstance(v, list) and v and all(isinstance(t, (str, list)) for t in v):
            raise ValueError("one prompt per request: a string or token ids (or a list of one of them)")
        if not isinstance(v, (str, list)) or isinstance(v, list) and not all(type(t) is int for t in v):
            raise ValueError("expected a string or token ids (a list of integers), or a list of one of them")
        if not v:
            raise ValueError("empty prompt")
        return v

    @field_validator("logprobs", mode="before")
    @classmethod
    def _not_a_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"expected an integer 0-{MAX_LOGPROBS} on /v1/completions (alternatives per "
                             f"token); logprobs: true is the chat form")
        return v

    def text(self) -> str:
        """The prompt as text ('' for token ids)."""
        return self.prompt if isinstance(self.prompt, str) else ""

    def token_ids(self) -> list[int] | None:
        """The prompt's token ids when the request gave ids, else None."""
        return None if isinstance(self.prompt, str) else list(self.prompt)

    def logprobs_k(self) -> int:
        """SamplingParams.logprobs: -1 = none asked for, else how many alternatives per token."""
        return -1 if self.logprobs is None else self.logprobs

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


class LogprobEntry(NamedTuple):
    """One generated token, ready for either logprobs shape (the tokenizer already applied)."""
    token: bytes  # the token's bytes (a byte-level token may be part of a UTF-8 character)
    logprob: float  # nats, under the model's raw distribution (temperature 1, no top-p)
    entropy: float  # of that whole next-token distribution, nats
    top: tuple[tuple[bytes, float], ...]  # the k most likely tokens' bytes and log-probs, most likely first
    offset: int  # characters of the answer's text before this token (the legacy text_offset)


def token_text(token: bytes) -> str:
    """A token's bytes as text; bytes that are not whole UTF-8 characters written as `\\xNN` escapes."""
    return token.decode("utf-8", "backslashreplace")


def _lp(value: float) -> float:
    """JSON has no -inf: a token of probability 0 (or a broken row's NaN) gets OpenAI's -9999.0."""
    return value if math.isfinite(value) else -9999.0


def _entropy(value: float) -> float | None:
    return value if math.isfinite(value) else None


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """`choices[0].logprobs` of a chat answer (or of one chunk's tokens)."""
    return {"content": [{"token": token_text(e.token), "logprob": _lp(e.logprob), "bytes": list(e.token),
                         "top_logprobs": [{"token": token_text(t), "logprob": _lp(lp), "bytes": list(t)}
                                          for t, lp in e.top],
                         "costopt_entropy": _entropy(e.entropy)} for e in entries]}


def completion_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """`choices[0].logprobs` of a completion (or of one chunk's tokens), OpenAI's legacy parallel lists.
    Each top_logprobs dict holds the k most likely tokens and the chosen one (so up to k + 1, as OpenAI's);
    tokens with the same text share one key, the most likely one's."""
    tops = []
    for e in entries:
        top: dict[str, float] = {}
        for t, lp in e.top + ((e.token, e.logprob),):
            top.setdefault(token_text(t), _lp(lp))
        tops.append(top)
    return {"tokens": [token_text(e.token) for e in entries], "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": tops, "text_offset": [e.offset for e in entries],
            "costopt_entropy": [_entropy(e.entropy) for e in entries]}


def _with(choice: dict[str, Any], token_ids: list[int] | None, prompt_token_ids: list[int] | None) -> dict:
    """The choice with the return_token_ids extension's fields, when asked for."""
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = prompt_token_ids
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, *,
                  logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
                  prompt_token_ids: list[int] | None = None) -> dict:
    rid, created = _ids("chatcmpl")
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
              "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [_with(choice, token_ids, prompt_token_ids)], "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, *,
                        logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
                        prompt_token_ids: list[int] | None = None) -> dict:
    rid, created = _ids("cmpl")
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [_with(choice, token_ids, prompt_token_ids)], "usage": usage(prompt_tokens, completion_tokens)}


class ChunkMaker:
    """SSE chunks of one streamed answer, sharing its id and creation time."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id, self.created = _ids("chatcmpl" if chat else "cmpl")

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False, *,
              logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
              prompt_token_ids: list[int] | None = None) -> dict:
        """One chunk; `logprobs` and `token_ids` are for this chunk's tokens, `prompt_token_ids` goes on
        the first chunk only."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            obj = "text_completion"
        choice = _with(choice, token_ids, prompt_token_ids)
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
