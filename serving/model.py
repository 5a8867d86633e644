"""`VariantModel`: one precision variant of the model as a `kserve.Model`, with its own engine loop.

`load()` reads the variant from the workspace the pipeline wrote (`fp32` is the ingested model; any
other name is a variant folder with its `spec.json`, rebuilt exactly as the validate phase measured
it), builds the continuous-batching engine of the runtime its spec names (`costopt.runtimes.registry`:
the torch engine, or llama.cpp's batched decode), its `EngineLoop`, and sets `self.ready`. Nothing comes
from a hub. `generate()` is the one path every API takes (OpenAI chat and completions, streamed or
not, and Open Inference Protocol v2 `predict`): it checks the request against the limits, queues it
and yields text as tokens come.

    model = VariantModel("int8_weight_only", ServeOptions(workspace=Path(".")))
    model.load()
    gen = model.submit(model.encode_chat(messages), SamplingParams(...), priority=None, deadline_s=None)
    async for piece in model.stream(gen): ...  # Piece(text, finish, tokens, offsets)

A piece's `tokens` are the answer's tokens consumed since the previous piece (indices into
`gen.tokens`); `log_entries` turns them into the logprobs responses' entries (their bytes come from the
byte-level BPE alphabet, so a token that is part of a UTF-8 character keeps its exact bytes).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, NamedTuple, Sequence

import kserve
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from serving import metrics
from serving.admission import Admission, AdmissionConfig, Priority
from serving.driver import EngineLoop, Generation, calibrate
from costopt.runtimes.engine import Engine, SamplingParams
from costopt.runtimes.slots import DEFAULT_PREFIX_CACHE
from serving.protocol import ApiError, LogprobEntry, lone_surrogate, printable

BASELINE = "fp32"  # the ingested model, served as is


@dataclass(frozen=True)
class ServeOptions:
    workspace: Path = Path(".")
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    max_len: int = 2048  # tokens per sequence, prompt + answer: the KV cache's length
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 1536  # longest prompt accepted, tokens
    default_max_tokens: int = 128  # when a chat request sets none
    threads: int = 2  # torch threads per engine step
    prefix_cache: int = DEFAULT_PREFIX_CACHE  # prompts whose KV an engine keeps, on runtimes that can (llama.cpp)
    device: str = "cpu"  # cuda: fp32 and torch-runtime variants run on the CUDA engine (costopt.runtimes.cuda)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device: {self.device!r}; expected one of {list(DEVICES)}")


DEVICES = ("cpu", "cuda")


def load_engine(options: ServeOptions, name: str) -> tuple[Any, Any, str]:
    """(engine, tokenizer, runtime name) of `name`: fp32, or a variant on the runtime its spec names
    (the torch engine over costopt's modules, or llama.cpp's batched decode over its GGUF)."""
    from transformers import AutoTokenizer

    from costopt.models.source import load_model_dir
    from costopt.models.variants import read_spec
    from costopt.runtimes.registry import spec_runtime
    from costopt.storage.layout import Workspace

    ws = Workspace(options.workspace)
    if not (ws.model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{ws.model_dir}: no ingested model; run the pipeline (make demo) or "
                                f"`dvc pull` first")
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    eos = tok.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if name == BASELINE and options.device == "cuda":
        model, _ = load_model_dir(ws.model_dir)
        return _on_cuda(options, name, model, eos_ids), tok, "cuda"
    if name == BASELINE:
        model, _ = load_model_dir(ws.model_dir)
        return Engine(model, eos_token_ids=eos_ids, max_batch=options.admission.max_batch,
                      max_len=options.max_len), tok, "torch"
    spec = read_spec(ws, name)
    runtime, _ = spec_runtime(spec)
    if options.device == "cuda" and runtime.name == "torch":
        from costopt.models.variants import load_torch_variant

        return _on_cuda(options, name, load_torch_variant(ws, spec)[0], eos_ids), tok, "cuda"
    if options.device == "cuda" and runtime.device != "cuda":
        raise RuntimeError(f"variant {name!r}: device cuda, but it runs on runtime {runtime.name!r}, which the server "
                           f"does not move to the GPU; serve fp32, a torch-runtime or a cuda-runtime variant")
    reason = runtime.available()
    if reason:
        raise RuntimeError(f"variant {name!r}: runtime {runtime.name!r} cannot run here: {reason}")
    extra = {"prefix_cache": options.prefix_cache} if runtime.prefix_cache else {}  # torch: none (docs/serving.md)
    engine = runtime.engine(ws, spec, eos_token_ids=eos_ids, max_batch=options.admission.max_batch,
                            max_len=options.max_len, threads=options.threads, **extra)
    return engine, tok, runtime.name


def _on_cuda(options: ServeOptions, name: str, model: Any, eos_ids: list[int]) -> Any:
    """`--device cuda`: the model's torch weights (fp32's, or a torch-runtime variant's INT8/INT4 codes) on the
    CUDA engine with the cuda runtime's default settings (bf16 activations, graphs, fused kernels)."""
    from costopt.runtimes import cuda_runtime

    reason = cuda_runtime.available()
    if reason:
        raise RuntimeError(f"variant {name!r}: device cuda: {reason}")
    return cuda_runtime.engine_of(model, name, cuda_runtime.CudaConfig(), eos_token_ids=eos_ids,
                                  max_batch=options.admission.max_batch, max_len=options.max_len,
                                  threads=options.threads)


class Piece(NamedTuple):
    """One piece of a streamed answer: new text, the finish reason (last piece only), and the answer's
    tokens consumed since the previous piece with each one's character offset in the answer's text."""
    text: str
    finish: str | None
    tokens: range  # indices into Generation.tokens
    offsets: tuple[int, ...]  # len(tokens) of them


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves, the
    others for 256 + their rank (what `tokenizers`' ByteLevel pre-tokenizer writes tokens in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(others)}


class TokenBytes:
    """A token id's exact bytes: a byte-level BPE token's own bytes (even part of a UTF-8 character);
    for other tokenizers, the UTF-8 of the token decoded alone. Cached: the vocabulary is small."""

    def __init__(self, tok: Any) -> None:
        self.tok, self._cache = tok, {}
        self._alphabet = _byte_level_alphabet() if _is_byte_level(tok) else None

    def __call__(self, token_id: int) -> bytes:
        got = self._cache.get(token_id)
        if got is None:
            piece = self.tok.convert_ids_to_tokens(token_id)
            if self._alphabet is not None and piece and all(c in self._alphabet for c in piece):
                got = bytes(self._alphabet[c] for c in piece)
            else:
                got = self.tok.decode([token_id]).encode("utf-8", "backslashreplace")
            self._cache[token_id] = got
        return got


def _is_byte_level(tok: Any) -> bool:
    """Whether a (fast) tokenizer writes its tokens in the byte-level alphabet (GPT-2 style BPE)."""
    return type(getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)).__name__ == "ByteLevel"


class Detokenizer:
    """Token ids in, new text out; holds back a trailing partial UTF-8 character."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


class VariantModel(kserve.Model):
    def __init__(self, name: str, options: ServeOptions) -> None:
        super().__init__(name)
        self.options = options
        self.loop: EngineLoop | None = None
        self.tokenizer: Any = None
        self.info: dict[str, Any] = {}
        self.library: Any = None  # the ModelLibrary serving it: v2 infer resubmits through it on a hot switch
        self.token_bytes: TokenBytes | None = None

    def load(self) -> bool:
        import torch

        torch.set_num_threads(self.options.threads)
        t0 = time.perf_counter()
        engine, self.tokenizer, runtime = load_engine(self.options, self.name)
        self.token_bytes = TokenBytes(self.tokenizer)
        admission = Admission(self.options.admission)
        calibrate(engine, admission)
        self.loop = EngineLoop(engine, admission, self.name, on_step=self._observe_step)
        self.info = {"name": self.name, "runtime": runtime, "load_seconds": round(time.perf_counter() - t0, 2),
                     "instance": uuid.uuid4().hex[:12]}
        metrics.LOADED.labels(self.name).set(1)
        self.ready = True
        return self.ready

    # -- encoding -----------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:  # e.g. a template that insists on alternating roles
            raise ApiError(400, f"messages: the model's chat template refused them: {exc}", param="messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_token_ids(self, ids: Sequence[int], field_name: str) -> list[int]:
        """A prompt given as token ids, used as it is: each id must be in the model's vocabulary."""
        vocab = self.loop.engine.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"{field_name}: token id {ids[bad]} at index {bad} is outside the vocabulary; "
                                f"ids must be in [0, {vocab})", param=field_name)
        return list(ids)

    def check_lengths(self, prompt_ids: Sequence[int], max_tokens: int, field_name: str) -> None:
        """400s naming the field and the limit, before anything is queued."""
        o = self.options
        if max_tokens > o.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} is over this server's limit of "
                                f"{o.max_tokens_limit}", param="max_tokens")
        if not prompt_ids:
            raise ApiError(400, f"{field_name}: empty after tokenization", param=field_name)
        if len(prompt_ids) > o.max_prompt_tokens:
            raise ApiError(400, f"{field_name}: {len(prompt_ids)} tokens is over the limit of "
                                f"{o.max_prompt_tokens} prompt tokens", param=field_name)
        if len(prompt_ids) + max_tokens > o.max_len:
            raise ApiError(400, f"max_tokens: {len(prompt_ids)} prompt tokens + max_tokens {max_tokens} is "
                                f"over the context limit of {o.max_len} tokens", param="max_tokens")

    # -- generation ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, priority: Any,
               deadline_s: float | None) -> Generation:
        if self.loop is None or not self.ready:
            raise ApiError(503, f"model {self.name!r} is not ready", type_="model_not_ready")
        gen = self.loop.submit(prompt_ids, params, priority, deadline_s)
        self._observe_queue()
        return gen

    def _observe_step(self, *step: Any) -> None:
        metrics.observe_step(self.name, *step)
        self._observe_queue()

    def _replaced(self) -> bool:
        """A hot switch put a fresh copy in this one's place: the name's gauges are that copy's now."""
        current = self.library.models.get(self.name) if self.library is not None else None
        return current is not None and current is not self

    def _observe_queue(self) -> None:
        if self.loop is not None and not self._replaced():
            metrics.observe_queue(self.name, self.loop.admission.queued(), self.loop.running_by_priority()[0])

    async def stream(self, gen: Generation, stops: Sequence[str] = ()) -> AsyncIterator[Piece]:
        """Piece(text delta, None, ...)... then Piece("", finish_reason, ...). Stop strings end the answer
        before them (its tokens end with the one that completed the stop string)."""
        detok, held = Detokenizer(self.tokenizer), ""
        keep = max((len(s) for s in stops), default=1) - 1  # chars that may be a stop string's start
        sent, offsets = 0, []  # tokens handed out in pieces; offsets of those consumed since

        def piece(text: str, finish: str | None = None) -> Piece:
            nonlocal sent, offsets
            out = Piece(text, finish, range(sent, sent + len(offsets)), tuple(offsets))
            sent, offsets = out.tokens.stop, []
            return out

        try:
            async for token_id in gen:
                offsets.append(len(detok.text))
                held += detok.push(token_id)
                cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield piece(held[:cut])
                    self.loop.cancel(gen)
                    gen.finish_reason = "stop"
                    yield piece("", "stop")
                    return
                if len(held) > keep:
                    out, held = held[:len(held) - keep], held[len(held) - keep:]
                    yield piece(out)
            if held:
                yield piece(held)
            yield piece("", "length" if gen.finish_reason == "length" else "stop")
        finally:
            self.loop.cancel(gen)  # no-op unless the client went away mid-answer

    def log_entries(self, gen: Generation, tokens: range, offsets: Sequence[int]) -> list[LogprobEntry]:
        """The logprobs entries of `gen`'s tokens at `tokens` (a request that asked for log-probs)."""
        name, out = self.token_bytes, []
        for i, offset in zip(tokens, offsets):
            lp = gen.logprobs[i]
            out.append(LogprobEntry(name(gen.tokens[i]), lp.logprob, lp.entropy,
                                    tuple((name(t), v) for t, v in lp.top), offset))
        return out

    async def predict(self, payload: InferRequest | dict, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        """Open Inference Protocol v2: input `text_input` (BYTES, one prompt per element, sent through the
        chat template) -> output `text_output`. Parameters: max_tokens, temperature, top_p, seed."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("v2 infer: expected an inference request with inputs")
        inp = payload.get_input_by_name("text_input")
        if inp is None or inp.datatype != "BYTES":
            raise InvalidInput("inputs: expected one input named 'text_input' with datatype BYTES")
        prompts = [_prompt_text(p, i) for i, p in enumerate(inp.data)]
        if not 1 <= len(prompts) <= 16:
            raise InvalidInput(f"text_input: expected 1 to 16 prompts, got {len(prompts)}")
        params = dict(payload.parameters or {})
        try:
            default = min(self.options.default_max_tokens, self.options.max_tokens_limit)
            sampling = SamplingParams(max_new_tokens=int(params.get("max_tokens", default)),
                                      temperature=float(params.get("temperature", 0.0)),
                                      top_p=float(params.get("top_p", 1.0)),
                                      seed=None if params.get("seed") is None else int(params["seed"]))
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"parameters: {printable(str(exc))}") from None
        try:
            priority = Priority.parse((headers or {}).get("x-costopt-priority"))
        except ValueError as exc:
            raise InvalidInput(f"x-costopt-priority header: {printable(str(exc))}") from None
        encoded = []
        for text in prompts:
            try:
                ids = self.encode_chat([{"role": "user", "content": text}])
                self.check_lengths(ids, sampling.max_new_tokens, "text_input")
            except ApiError as exc:
                raise InvalidInput(exc.message) from None
            encoded.append(ids)
        gens: list[tuple[VariantModel, Generation]] = []
        try:
            for ids in encoded:
                gens.append(self._submit_serving(ids, sampling, priority))
            outs = []
            for model, gen in gens:
                outs.append("".join([p.text async for p in model.stream(gen)]))
        except BaseException:  # a 429 for prompt k, or the client gone: the others stop using compute
            for model, gen in gens:
                model.loop.cancel(gen)
            raise
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name,
                             infer_outputs=[InferOutput("text_output", [len(outs)], "BYTES", outs)])

    def _submit_serving(self, ids: list[int], sampling: SamplingParams,
                        priority: Priority) -> tuple[VariantModel, Generation]:
        """Queue on whichever copy of this variant serves now: KServe may hand a request to this copy
        just as a hot switch retires it. The library's errors become KServe's typed ones."""
        if self.library is None:
            return self, self.submit(ids, sampling, priority, None)
        try:
            return self.library.submit(self.name, ids, sampling, priority, None)
        except ApiError as exc:
            raise (ModelNotFound(self.name) if exc.status == 404 else ModelNotReady(self.name, exc.message)) from None

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        """KServe's v1 `:explain` answers 501 without an explainer; here it is a client error that says
        what to call instead."""
        raise InvalidInput(f"{self.name}:explain: costopt variants have no explainer; generate with "
                           f"/openai/v1/chat/completions or /v2/models/{self.name}/infer")

    def stop(self) -> None:
        """No longer serving; the gauges go to zero unless a fresh copy serves under the name (hot switch)."""
        if not self._replaced():
            metrics.LOADED.labels(self.name).set(0)
            metrics.observe_queue(self.name, 0, 0)
        self.ready = False


def _prompt_text(item: Any, index: int) -> str:
    """One `text_input` element as text: UTF-8 bytes or a string, never a lone surrogate."""
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"text_input[{index}]: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(item, str):
        raise InvalidInput(f"text_input[{index}]: expected a string, got {type(item).__name__}")
    if lone_surrogate(item) is not None:
        raise InvalidInput(f"text_input[{index}]: not valid Unicode text (an unpaired UTF-16 surrogate)")
    return item
