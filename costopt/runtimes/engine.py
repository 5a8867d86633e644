"""The continuous-batching engine: one model, one KV cache, one iteration per `step()`.

Sequences join (`add`) and leave (EOS, stop id, `max_new_tokens`, `cancel`) between steps. A step runs
ONE forward over a packed, unpadded row of tokens: the newest token of every running sequence
(decode) followed by the whole prompt of every sequence added since the last step (prefill; its first
token comes out of this step). Every Linear therefore runs once per step over all rows, whatever
module it is (costopt's quantized modules included). Not thread-safe: the driver calls add/cancel/step from one
thread. Timing entry point (real model, 2 threads): `python -m costopt.runtimes.engine --batch 1 16
[--compile] [--variant int8_weight_only --workspace DIR] [--hf]`.

`Engine(..., compile=True)` runs every decode-only step (no prompt to prefill in it) through one
`torch.compile` graph of the whole decode forward (`costopt.runtimes.compiled`: Inductor's C++ kernels,
costopt's quantized GEMMs as custom ops, one graph for batch 1 and one for batch >= 2, any cache
length); steps with a prefill stay eager. Both graphs compile in the constructor (`compile_seconds`).
If compiling fails (a graph break, an op Inductor cannot lower, no C++ compiler, a recompile that
fails later), the engine logs a warning and runs eager from then on, with `compiled` False and
`compile_error` the reason: it is never silently wrong, only slower. Compiled and eager agree: the
same greedy tokens, logits within 1e-3 (tests/serving/test_engine_compiled.py).

Why not transformers' own manager (`transformers.generation.continuous_batching`, 5.24; source read,
runs in /tmp on toy models and the real one): (a) it runs on CPU fp32, but sized from free host memory
by default it allocated masks that took 27 s to fill for a 2-layer toy model; `num_blocks` and
`max_batch_tokens` must be set by hand. (b) Per-request max_new_tokens, EOS ids, streaming and
`cancel_request` work, but it is a background thread fed through queues, not a step we drive; a
cancel emits nothing; sampling on/off is one flag per manager (per-request temperature/top_p only
with `per_request_processors`), and it samples from the global torch RNG seeded once, so a request's
tokens change with its batch mates (same seed with 0, 1, 2 mates: three different outputs). (c) With
costopt's Int8Linear swapped in, its greedy tokens equal `generate`'s. (d) It is the slowest option
at batch 16 (table below): on CPU it has no decode fast path (that needs flash-attn kernels), so each
step attends through one dense [new tokens, every cached token of the batch] mask. Hence our own.

Why our own forward rather than HF's forward with a cache object: HF caches give all rows one
`cache_position`, so per-sequence positions need left padding and re-padding or cropping whenever a
sequence joins or leaves, plus per-call mask building; here each sequence keeps positions 0..n-1 in
its own slot, so no padding exists and a sequence's tokens do not depend on its batch mates. The
forward uses the model's own submodules (embed_tokens, rotary_emb, each layer's norms, q/k/v/o_proj,
mlp, norm, lm_head), and computes the LM head only for the rows that need a token.

Prefill choice: all newcomers' prompts go into the same forward as the decode rows rather than being
chunked. On this CPU a prompt's cost is its FLOPs either way (16 prompts, 958 tokens: 4.3 s on one
core, about 14 decode steps); chunking would only spread that stall over more steps, delay the first
token and add a pass over the weights per chunk, while fusing shares one pass with the decode rows.
The driver bounds the stall by how many it admits per step.

KV cache: one tensor [layers, 2, max_batch, kv_heads, max_len, head_dim] allocated up front with
torch.empty; positions are zeroed once, just before first use (`_forward`), so resident memory grows
with the longest sequence seen. Running sequences occupy slots 0..running-1 (a finished sequence's
slot takes the last one's cache), so decode attends over one contiguous slice. `pause` moves a
sequence's cache to the top of the slot range (paused ones stack down from max_batch - 1) where no
step reads it; `resume` moves it back below the running ones: one cache copy each way. Size for the built-in
model (30 layers, 3 KV heads, head dim 64, fp32) at the default max_batch 32, max_len 2048:
30*2*32*3*2048*64*4 B = 3,019,898,880 B (2.81 GiB) at most.

Measured on the 2-core reference CPU, real model fp32, prompts 40-80 tokens, 64 new tokens, median of
3, tok/s summed over the batch. Another job held one core throughout, so these ran with one thread
(`python -m costopt.runtimes.engine --batch 1 16 --threads 1 --hf`); at 2 threads under that contention every
op stalls (1.2 and 5.5 tok/s) and says nothing. Rerun with the default 2 threads on an idle machine.

    batch | engine decode | engine end-to-end | HF manager end-to-end | HF generate end-to-end
        1 |           7.5 |               7.3 |                   6.6 |                    7.7
       16 |          55.2 |              45.1 |                  23.8 |                   36.5

Batch 16 over batch 1: 7.4x in decode, 6.2x end to end (prefill included), 5.9x over batch-1
`generate`. At batch 1 the engine is no faster than `generate`: both read every weight once per
token, and about 23 ms of a step is per-op dispatch over 30 layers (a 30-layer, hidden-64 model
steps in 23 ms here, HF's forward in 30 ms). Greedy tokens of 16 chat prompts arriving two every
other step equalled each prompt's own `generate` (16/16, 32 tokens, fp32).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from costopt.models.source import check_architecture
from costopt.runtimes.rope import rope as _rope
from costopt.runtimes.slots import (FINISH_REASONS, SamplingParams, Seq, SlotEngine, StepBatch, StepEvent,
                                    TensorKVSlots, bench_prompts, time_engine)

__all__ = ["Engine", "FINISH_REASONS", "SamplingParams", "StepEvent"]  # the request types live in slots
log = logging.getLogger(__name__)


class Engine(TensorKVSlots, SlotEngine):
    """Continuous batching over a Llama-architecture causal LM (fp32, bf16 or costopt-quantized) on CPU;
    the slot bookkeeping (add, cancel, pause, resume, clear, step) is `SlotEngine`'s."""

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: Sequence[int], max_batch: int = 16,
                 max_len: int = 2048, compile: bool = False) -> None:
        cfg = getattr(model, "config", None)
        body = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if cfg is None or body is None or not hasattr(model, "lm_head") or not all(hasattr(body, n) for n in needed):
            raise TypeError("model: expected a Llama-like causal LM with .config, .lm_head and .model."
                            f"{{{', '.join(needed)}}} (e.g. transformers' LlamaForCausalLM)")
        check_architecture(cfg, "model")  # same module names, other arithmetic: wrong tokens, not an error
        limit = getattr(cfg, "max_position_embeddings", max_len)
        if not 2 <= max_len <= limit:
            raise ValueError(f"max_len: {max_len}; must be in [2, {limit}] (the model's max_position_embeddings)")
        super().__init__(eos_token_ids=eos_token_ids, max_batch=max_batch, max_len=max_len,
                         vocab_size=cfg.vocab_size)
        self.model, self._body = model, body
        self._heads, self._kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self._head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        with torch.inference_mode():
            self.dtype = body.embed_tokens(torch.zeros(1, dtype=torch.long)).dtype  # activations' dtype
            # [layers, k/v, slot, kv_heads, position, head_dim]; untouched pages stay unallocated
            self.kv = torch.empty(len(body.layers), 2, max_batch, self._kv_heads, max_len, self._head_dim,
                                  dtype=self.dtype)
        self._clean = 0  # positions < _clean hold finite values in every slot (see _forward)
        self.compiled = False  # decode-only steps run as a compiled graph (costopt.runtimes.compiled)
        self.compile_error: str | None = None  # why not, when compile=True was asked for
        self.compile_seconds: dict[str, float] = {}  # graph -> seconds its compile (first call) took
        self.compiled_steps = 0  # steps that ran through the compiled graph
        self._graph = None
        if compile:
            self._compile()

    # -- the runtime's side (costopt.runtimes.slots.SlotEngine's hooks) ----------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        return super().step()

    def _logits(self, batch: StepBatch, new: list[Seq]) -> torch.Tensor:
        logits = self._decode_compiled(batch.ids, batch.pos) if self._graph is not None and not new else None
        if logits is None:
            logits = self._forward(batch.ids, batch.pos, batch.slots, batch.n_dec, batch.spans, batch.out_rows)
        return logits

    # -- internals -------------------------------------------------------------------------------
    def _compile(self) -> None:
        """Build and compile the decode graph; on any failure keep running eager and say why."""
        from costopt.runtimes.compiled import CompiledDecode

        if self.dtype != torch.float32:
            # bf16 activations: Inductor's fused kernels round intermediates differently from eager's
            # op-by-op bf16 (a tiny random bf16 Llama's greedy tokens diverged after 8), so the
            # compiled step would be a different model rather than a faster one
            self._compile_off(f"activations are {self.dtype}: the compiled decode step is exact only for "
                              f"float32 activations (fp32, costopt's INT8/INT4/W8A8 modules)")
            return
        try:
            graph = CompiledDecode(self.model, self.kv, heads=self._heads, kv_heads=self._kv_heads,
                                   head_dim=self._head_dim)
            graph.warmup()
        except Exception as exc:  # a graph break, an op Inductor cannot lower, no C++ compiler, ...
            self._compile_off(_reason(exc))
            return
        self._graph, self.compiled, self.compile_seconds = graph, True, graph.compile_seconds

    def _compile_off(self, reason: str) -> None:
        self.compile_error = reason
        self._graph, self.compiled = None, False
        log.warning("engine: the compiled decode step is off, every step runs eager: %s", reason)

    def _decode_compiled(self, ids: list[int], pos: list[int]) -> torch.Tensor | None:
        """Logits [n_dec, vocab] of a decode-only step through the compiled graph (row i in slot i).

        None after a compile failure here (a recompile for a shape the warm-up did not see): the engine
        is eager from then on, and the caller reruns the step eagerly, rewriting the same cache positions."""
        top = max(pos) + 1
        self._zero_new_positions(top)
        pos_t = torch.tensor(pos)  # [B]
        hidden = torch.arange(top)[None] > pos_t[:, None]  # [B, S]: row b sees positions 0..pos[b]
        mask = torch.zeros(len(ids), 1, 1, top, dtype=self.dtype).masked_fill_(hidden[:, None, None],
                                                                              float("-inf"))
        try:
            logits = self._graph(torch.tensor(ids), pos_t, mask)
        except self._graph.errors as exc:
            self._compile_off(_reason(exc))
            return None
        self.compiled_steps += 1
        return logits

    def _zero_new_positions(self, top: int) -> None:
        """Make positions < top finite in every slot (see _forward)."""
        if top > self._clean:
            # A decode row reads up to `span` in its slot; past its own length the mask gives weight 0,
            # but 0 * NaN = NaN, and torch.empty may hold NaN bit patterns. Zero each new position in
            # every slot once, before anything is written there, so resident memory grows with use.
            self.kv[:, :, :, :, self._clean:top].zero_()
            self._clean = top

    def _forward(self, ids: list[int], pos: list[int], slots: list[int], n_dec: int,
                 spans: list[tuple[int, int]], out_rows: list[int]) -> torch.Tensor:
        """Logits [len(out_rows), vocab] for a packed row: n_dec decode tokens, then whole prompts at `spans`."""
        body, hd, n_kv, n_q = self._body, self._head_dim, self._kv_heads, self._heads
        t = len(ids)
        pos_t = torch.tensor(pos)  # [T]
        slot_t = torch.tensor(slots)  # [T]
        h = body.embed_tokens(torch.tensor(ids))  # [T, D]
        cos, sin = body.rotary_emb(h, pos_t[None])  # [1, T, hd] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, hd]: broadcast over heads
        span = max(pos[:n_dec], default=0) + 1  # cache positions decode rows attend to
        self._zero_new_positions(max(pos) + 1)
        # additive mask [n_dec, 1, 1, span]: row b sees positions 0..pos[b] of its own slot
        hidden = (torch.arange(span)[None] > pos_t[:n_dec, None]).view(n_dec, 1, 1, span)
        mask = torch.zeros(n_dec, 1, 1, span, dtype=self.dtype).masked_fill_(hidden, float("-inf"))
        for li, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = _rope(attn.q_proj(x).view(t, n_q, hd), cos, sin)  # [T, H, hd]
            k = _rope(attn.k_proj(x).view(t, n_kv, hd), cos, sin)  # [T, Hkv, hd]
            v = attn.v_proj(x).view(t, n_kv, hd)
            kc, vc = self.kv[li, 0], self.kv[li, 1]  # [slot, Hkv, pos, hd]
            kc[slot_t, :, pos_t] = k.to(kc.dtype)
            vc[slot_t, :, pos_t] = v.to(vc.dtype)
            parts = []
            if n_dec:
                parts.append(_decode_attention(q[:n_dec], kc[:n_dec, :, :span], vc[:n_dec, :, :span], mask,
                                               attn.scaling))
            for start, length in spans:
                parts.append(_prefill_attention(q[start:start + length], k[start:start + length],
                                                v[start:start + length], attn.scaling))
            o = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, hd]
            h = h + attn.o_proj(o.reshape(t, n_q * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = h if len(out_rows) == t else h[torch.tensor(out_rows)]  # LM head only where a token is due
        return self.model.lm_head(body.norm(h))


def _reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (Inductor's run to pages)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:500]}"


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per row against its slot: q [B, H, hd], k/v [B, Hkv, S, hd], mask [B, 1, 1, S] -> [B, H, hd].

    Query heads are grouped under their KV head ([B, Hkv, H/Hkv, hd]) so K and V are read once, never
    repeated per query head.
    """
    b, n_q, hd = q.shape
    n_kv = k.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, hd) * scale
    scores = torch.matmul(qg, k.transpose(-1, -2)) + mask  # [B, Hkv, G, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return torch.matmul(probs.to(v.dtype), v).view(b, n_q, hd)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention over one whole prompt: q [P, H, hd], k/v [P, Hkv, hd] -> [P, H, hd]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                         enable_gqa=True)  # [1, H, P, hd]
    return out[0].transpose(0, 1)


# -- timing entry point: python -m costopt.runtimes.engine --batch 1 16 [--compile] [--variant V] [--hf] ---------
def _time_hf_manager(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """End-to-end tok/s of transformers' continuous batching manager (generate_batch), sized by hand."""
    import time

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    cb_cfg = ContinuousBatchingConfig(page_size=64, num_blocks=4 * len(prompts) + 4, max_batch_tokens=2048,
                                      max_requests_per_batch=len(prompts), allow_block_sharing=False)
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                               progress_bar=False)
    seconds = time.perf_counter() - t0
    return sum(len(o.generated_tokens) for o in out.values()) / seconds


def _time_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """End-to-end tok/s of plain `generate` on the left-padded batch (static batching, the naive baseline)."""
    import time

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def _load_bench_model(args) -> torch.nn.Module:
    from pathlib import Path

    if args.variant is None:
        from costopt.models.source import load_model_dir

        return load_model_dir(Path(args.model))[0]
    from costopt.models.variants import load_torch_variant, read_spec
    from costopt.storage.layout import Workspace

    ws = Workspace(Path(args.workspace))
    return load_torch_variant(ws, read_spec(ws, args.variant))[0]


def _bench_row(model: torch.nn.Module, batch: int, args) -> dict:
    """One batch size: eager (and compiled) engines built once, their runs interleaved, medians."""
    import statistics

    prompts = bench_prompts(batch, model.config.vocab_size)
    engines = {"engine": Engine(model, eos_token_ids=[], max_batch=batch, max_len=256)}
    row: dict = {"batch": batch}
    if args.compile:
        engines["compiled"] = compiled = Engine(model, eos_token_ids=[], max_batch=batch, max_len=256,
                                                compile=True)
        row["compile_s"] = compiled.compile_seconds
        if not compiled.compiled:
            row["compile_error"] = compiled.compile_error
    for engine in engines.values():
        time_engine(engine, prompts, 4)  # warm-up: first-touch of the cache pages
    runs: dict[str, list] = {name: [] for name in engines}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, engine in engines.items():
            runs[name].append(time_engine(engine, prompts, args.new_tokens))
    for name, rs in runs.items():
        row[f"{name}_decode_tok_s"] = statistics.median(r.decode_tok_s for r in rs)
        row[f"{name}_e2e_tok_s"] = statistics.median(r.e2e_tok_s for r in rs)
    if args.compile:
        row["compiled_over_eager_decode"] = row["compiled_decode_tok_s"] / row["engine_decode_tok_s"]
    if args.hf:
        row["hf_manager_e2e_tok_s"] = statistics.median(
            _time_hf_manager(model, prompts, args.new_tokens) for _ in range(args.repeats))
        row["generate_e2e_tok_s"] = statistics.median(
            _time_generate(model, prompts, args.new_tokens) for _ in range(args.repeats))
    return row


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="artifacts/model", help="folder with config.json + safetensors")
    parser.add_argument("--variant", help="time this variant of --workspace (e.g. int8_weight_only) instead")
    parser.add_argument("--workspace", default=".", help="folder holding artifacts/ (with --variant)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled decode step, interleaved with eager; reports compile seconds")
    parser.add_argument("--hf", action="store_true", help="also time transformers' manager and generate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # before compiling: Inductor's kernels keep this thread count
    model = _load_bench_model(args)
    for batch in args.batch:
        row = _bench_row(model, batch, args)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def greedy_answers(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                   batch_size: int = 16, progress: bool = True, compile: bool = True,
                   desc: str = "greedy answers") -> list[str]:
    """The model's greedy answer to each conversation, via its chat template, through the serving
    engine's continuous batching (`costopt.runtimes.slots.generate_all`): no padding, and a finished
    answer's slot goes to the next prompt at once. Stops at the model's EOS ids, as `generate` does."""
    from tqdm import tqdm

    from costopt.runtimes.slots import SamplingParams, generate_all

    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    # compile: decode-only steps (most of them: answers run to length together, so slots refill in waves)
    # run as one compiled graph, whose tokens equal eager's (tests/serving/test_engine_compiled.py)
    engine = Engine(model, eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                    max_batch=batch_size, max_len=max(map(len, prompts), default=1) + max_new_tokens,
                    compile=compile)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        new = generate_all(engine, prompts, SamplingParams(max_new_tokens=max_new_tokens), progress=bar)
    return tokenizer.batch_decode(new, skip_special_tokens=True)


if __name__ == "__main__":
    main()

