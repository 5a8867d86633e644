"""`POST /v2/compare`: the shadow judgement of one answer by two served variants (admin key only).

The gateway's canary (`serving.gateway.rollout`) sends a sample of the canary's answers here: the
request's prompt (chat `messages`, or a completion `prompt` as text or token ids) and the canary's
answer (`answer` text, or `answer_ids`). Both variants are teacher-forced on prompt + answer, each on
its own runtime (`costopt.online.shadow`), and the reply is the answer's mean KL(reference || candidate)
per token and top-1 agreement:

    POST /v2/compare {"reference": "gguf_q8_0", "candidate": "gguf_q6_k",
                      "messages": [{"role": "user", "content": "..."}], "answer": "..."}
    -> {"reference": ..., "candidate": ..., "tokens": 31, "kl_mean": 0.0123, "top1": 0.968, "seconds": 0.41}

Both variants must be served. The scorers load on first use, on the process's compute thread like every
engine step (a second copy of the weights: about 145 MB for a GGUF Q8_0, 540 MB for fp32), so a
judgement takes turns with serving instead of slowing it through a second OpenMP team. Admin only,
because it costs compute no tenant quota covers and reveals nothing a client needs.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.api import _json, error_response
from serving.driver import compute_executor
from serving.library import ModelLibrary
from serving.model import VariantModel
from serving.protocol import ApiError

MAX_ANSWER_TOKENS = 1024  # longest answer a judgement scores


class CompareRoutes:
    def __init__(self, library: ModelLibrary) -> None:
        self.library = library
        self._scorers: dict[tuple[str, str], Any] = {}  # (variant, instance) -> scorer; a hot switch makes a new one

    async def compare(self, request: Request) -> Response:
        try:
            body = await _json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "body: expected a JSON object", param="body")
            ref, cand = (self._model(body, f) for f in ("reference", "candidate"))
            prompt_ids = self._prompt(ref, body)
            answer_ids = self._answer(ref, body)
            ref.check_lengths(prompt_ids, len(answer_ids), "messages" if "messages" in body else "prompt")
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            kl, top1 = await loop.run_in_executor(compute_executor(), self._judge, ref, cand, prompt_ids, answer_ids)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"reference": ref.name, "candidate": cand.name, "tokens": len(answer_ids),
                             "kl_mean": kl, "top1": top1, "seconds": round(time.perf_counter() - t0, 4)})

    def _model(self, body: dict, field: str) -> VariantModel:
        name = body.get(field)
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{field}: expected the name of a served variant", param=field)
        model = self.library.get_model(name)
        if model is None or not model.ready:
            raise ApiError(404, f"{field}: {name!r} is not served here; served: "
                                f"{', '.join(self.library.served()) or 'none'}", param=field, type_="model_not_found")
        return model

    @staticmethod
    def _prompt(model: VariantModel, body: dict) -> list[int]:
        if ("messages" in body) == ("prompt" in body):
            raise ApiError(400, "messages: give either `messages` (chat) or `prompt` (completion), not both or none",
                           param="messages")
        if "messages" in body:
            msgs = body["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok:
                raise ApiError(400, "messages: expected a non-empty list of {role, content} strings", param="messages")
            return model.encode_chat([{"role": m["role"], "content": m["content"]} for m in msgs])
        prompt = body["prompt"]
        if isinstance(prompt, str) and prompt:
            return model.encode_text(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return model.check_token_ids(prompt, "prompt")
        raise ApiError(400, "prompt: expected a non-empty string or a list of token ids", param="prompt")

    @staticmethod
    def _answer(model: VariantModel, body: dict) -> list[int]:
        if "answer_ids" in body:
            ids = body["answer_ids"]
            if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise ApiError(400, "answer_ids: expected a list of token ids", param="answer_ids")
            ids = model.check_token_ids(ids, "answer_ids")
        elif isinstance(body.get("answer"), str):
            ids = model.encode_text(body["answer"])
        else:
            raise ApiError(400, "answer: expected the candidate's answer as a string (or `answer_ids`)", param="answer")
        if not 1 <= len(ids) <= MAX_ANSWER_TOKENS:
            raise ApiError(400, f"answer: {len(ids)} tokens; a judgement scores 1 to {MAX_ANSWER_TOKENS}",
                           param="answer")
        return ids

    def _scorer(self, model: VariantModel) -> Any:
        from costopt.online.shadow import load_shadow_scorer
        from costopt.storage.layout import Workspace

        key = (model.name, model.info.get("instance", ""))
        if key not in self._scorers:
            for stale in [k for k in self._scorers if k[0] == model.name]:  # a hot switch replaced that copy
                del self._scorers[stale]
            self._scorers[key] = load_shadow_scorer(Workspace(model.options.workspace), model.name)
        return self._scorers[key]

    def _judge(self, ref: VariantModel, cand: VariantModel, prompt_ids: list[int],
               answer_ids: list[int]) -> tuple[float, float]:
        """On the compute thread: both teacher-forced passes and the comparison."""
        from costopt.online.shadow import answer_logits, compare

        try:
            a = answer_logits(self._scorer(ref), prompt_ids, answer_ids)
            b = answer_logits(self._scorer(cand), prompt_ids, answer_ids)
            return compare(a, b)
        except (FloatingPointError, ValueError) as exc:
            raise ApiError(500, f"compare: {exc}", type_="server_error") from None


def register_compare(app: FastAPI, library: ModelLibrary) -> None:
    """Add `POST /v2/compare` (the tenant guard that `serving.api.register` installed keeps it admin-only)."""
    router = APIRouter()
    router.add_api_route("/v2/compare", CompareRoutes(library).compare, methods=["POST"], tags=["V2"])
    app.include_router(router)
