"""The engine's compiled decode step: the whole decode forward as one `torch.compile` graph (Inductor,
CPU C++ kernels) for steps in which every running sequence adds one token.

`CompiledDecode(model, kv, ...)` holds the graph; `Engine(..., compile=True)` builds one, compiles it
(`warmup`) and routes decode-only steps through it (prefill and mixed steps stay eager). It computes
what `Engine._forward` computes for decode rows, with the model's own submodules, so costopt's
quantized modules run inside it through their kernels' custom ops (`costopt.kernels.ops`).

Choices, each measured on the 2-core box with the INT8 variant, one thread, cache length 256, medians
of interleaved rounds in one process (prototypes in /tmp, not kept):
- One graph over all 30 layers, each layer a `torch.compiler.nested_compile_region`, so Inductor
  compiles the layer once and stamps it out: 26 s cold, against 122 s for the plain whole graph
  (same step time) and ~170 s before each layer's cache became its own input (the layer index baked
  into every kernel made 77 distinct C++ kernels instead of 19). Compiling only the layer and calling
  it 30 times ("regional compilation") compiles in 5-10 s but steps only 1.15x faster than eager,
  against 1.3-1.4x for the whole graph: each call pays dynamo's guards and wrappers (~150 us).
- Dynamic batch and cache length: one graph for batch 1 and one for every batch of 2 or more, the
  cache length dynamic in both, so nothing is padded or bucketed. Static shapes per (batch, length)
  stepped no faster (ms per step, static vs dynamic: batch 1 20.9 vs 20.4; batch 16 146 vs 145;
  batch 8 at length 700 137 vs 139), and a bucket grid of batch 1..16 by 256-multiples up to 2048
  would be 40 compiles of ~26 s each.
- Each layer's cache is a separate graph input (`kv.unbind(0)`), written with `index_put_` on that
  input itself: writing through a view of the one big cache made Inductor copy the cache every layer
  (a 7 s step). The views do not overlap, so AOTAutograd keeps them apart and writes in place.
- Decode attention (one query row per sequence) as mul-and-sum reductions that Inductor fuses into
  its own loops, not eager's two MKL `bmm` calls, which cost more than their arithmetic on [3 KV
  heads x 3 queries x 64] per row: eager/compiled 1.24x vs 1.15x with bmm at batch 16, and 1.53x vs
  1.36x at batch 1 with 2 threads.
- RoPE's cos/sin come from a table that `rotary_emb` computes once for every position (bit-identical
  to computing them per step, checked), so no transcendental runs in the graph.

Inductor's C++ kernels take their OpenMP thread count from `torch.get_num_threads()` at compile time:
set it before building the engine. Compiled graphs are cached on disk (Inductor's FX graph cache,
`TORCHINDUCTOR_CACHE_DIR`, /tmp/torchinductor_<user> by default), so a second process compiles in a
few seconds instead of tens.
"""
from __future__ import annotations

import logging
import time

import torch
from torch._dynamo.decorators import mark_unbacked

from costopt.runtimes.rope import rope as _rope

log = logging.getLogger(__name__)


def decoder_layer(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_l: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                  n_q: int, n_kv: int, hd: int) -> torch.Tensor:
    """One Llama decoder layer over B decode rows: h [B, D], cos/sin [B, 1, hd], pos [B] (each row's
    position), mask [B, 1, 1, S] -> h [B, D]. kv_l is this layer's cache [2, slot, Hkv, pos, hd]; row b
    lives in slot b, and its new K/V are written there at pos[b]."""
    b, s = h.shape[0], mask.shape[-1]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = _rope(attn.q_proj(x).view(b, n_q, hd), cos, sin)  # [B, H, hd]
    k = _rope(attn.k_proj(x).view(b, n_kv, hd), cos, sin)  # [B, Hkv, hd]
    v = attn.v_proj(x).view(b, n_kv, hd)
    heads = torch.arange(n_kv)[None, :]  # [1, Hkv]
    kv_l.index_put_((torch.tensor(0), rows[:, None], heads, pos[:, None]), k.to(kv_l.dtype))
    kv_l.index_put_((torch.tensor(1), rows[:, None], heads, pos[:, None]), v.to(kv_l.dtype))
    o = _attention(q, kv_l[0, :b, :, :s], kv_l[1, :b, :, :s], mask, attn.scaling)  # [B, H, hd]
    h = h + attn.o_proj(o.reshape(b, n_q * hd))
    return h + layer.mlp(layer.post_attention_layernorm(h))


_LAYER = torch.compiler.nested_compile_region(decoder_layer)  # eager: calls decoder_layer as is


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
    """`engine._decode_attention` as reductions: q [B, H, hd], k/v [B, Hkv, S, hd], mask [B, 1, 1, S]."""
    b, n_q, hd = q.shape
    n_kv = k.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, 1, hd) * scale  # [B, Hkv, G, 1, hd]: query heads under their KV head
    scores = (qg * k[:, :, None]).sum(-1) + mask  # [B, Hkv, G, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return (probs.to(v.dtype)[..., None] * v[:, :, None]).sum(-2).view(b, n_q, hd)  # sum over S


class CompiledDecode:
    """Logits of one decode step for rows 0..B-1 of an engine's cache, as a compiled graph.

    `kv` is the engine's cache [layers, 2, slot, Hkv, pos, hd]; it is written in place and must stay the
    same tensor (in-place changes to it are fine). Call `warmup` once: it compiles the graph(s) and
    raises whatever stops them (a graph break, an op Inductor cannot lower, no C++ compiler); the
    caller falls back to eager.
    """

    def __init__(self, model: torch.nn.Module, kv: torch.Tensor, *, heads: int, kv_heads: int,
                 head_dim: int) -> None:
        self.model, self.body = model, model.model
        self.n_q, self.n_kv, self.hd = heads, kv_heads, head_dim
        self.caches = list(kv.unbind(0))  # per-layer [2, slot, Hkv, pos, hd]: separate graph inputs
        self.max_batch, self.max_len = kv.shape[2], kv.shape[4]
        with torch.inference_mode():
            probe = torch.zeros(1, 1, dtype=kv.dtype)
            cos, sin = self.body.rotary_emb(probe, torch.arange(self.max_len)[None])  # [1, max_len, hd]
        self.cos, self.sin = cos[0], sin[0]
        self.one_graph = True  # one graph for all batch sizes; False: batch 1 and batch >= 2 apart
        self.compile_seconds: dict[str, float] = {}  # graph ("all batches" | "batch 1", "batch >= 2") -> s
        # what a call raises when its graph cannot be (re)built: dynamo's errors (a graph break under
        # fullgraph, Inductor failures as BackendCompilerFailed) and the recompile limit
        self.errors = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)
        # dynamic=False: only the dimensions marked in __call__ are dynamic (automatic dynamic shapes
        # would make cache and weight shapes symbolic once a second engine differs). Own recompile
        # budget per engine: 2 graphs expected, a few spare for guard failures (an engine's model
        # changing under it), then FailOnRecompileLimitHit and eager rather than a compile storm.
        self._fn = torch.compile(self._forward, fullgraph=True, dynamic=False, isolate_recompiles=True,
                                 recompile_limit=4)

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile (and run once) the graph for every batch size; if that fails, a batch-1 graph and a
        batch >= 2 one (see __call__). Raises what stops the second try. Writes K/V garbage at position
        1 of slots 0-1; the engine zeroes a position before its first use."""
        try:
            self._warm({"all batches": (1, 2)})
        except self.errors as exc:  # e.g. a module branching on the row count (Bf16Linear)
            log.info("one graph for every batch size failed (%s: %s); compiling batch 1 and batch >= 2 apart",
                     type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:300])
            self.one_graph = False
            self.compile_seconds.clear()
            self._warm({"batch 1": (1,), "batch >= 2": (2,)})

    def _warm(self, graphs: dict[str, tuple[int, ...]]) -> None:
        for name, batches in graphs.items():
            t0 = time.perf_counter()
            for b in (b for b in batches if b <= self.max_batch):
                pos = torch.ones(b, dtype=torch.long)  # position 1, length 2
                self(torch.zeros(b, dtype=torch.long), pos, torch.zeros(b, 1, 1, 2, dtype=self.cos.dtype))
            self.compile_seconds[name] = round(time.perf_counter() - t0, 1)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids/pos [B] (row b in slot b), mask [B, 1, 1, S] additive (0 or -inf) -> logits [B, vocab]."""
        if self.max_len > 2:  # one graph for every attended length
            torch._dynamo.mark_dynamic(mask, 3)
        if self.one_graph:  # the batch as an unbacked size: size 1 is not specialized either
            for t in (ids, pos, mask):
                mark_unbacked(t, 0, min=1, max=self.max_batch)
        elif ids.shape[0] > 1 and self.max_batch > 2:
            # a backed dynamic batch >= 2; not where its range would hold one value (2..2): dynamo fails
            # on that (InternalTorchDynamoError, KeyError: 2), and that batch never varies anyway
            for t in (ids, pos, mask):
                torch._dynamo.mark_dynamic(t, 0)
        return self._fn(ids, pos, mask, self.caches)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                 caches: list[torch.Tensor]) -> torch.Tensor:
        body = self.body
        rows = torch.arange(ids.shape[0])
        h = body.embed_tokens(ids)  # [B, D]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, hd]
        for layer, kv_l in zip(body.layers, caches):
            h = _LAYER(layer, h, cos, sin, kv_l, rows, pos, mask, self.n_q, self.n_kv, self.hd)
        return self.model.lm_head(body.norm(h))  # [B, vocab]
