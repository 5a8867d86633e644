"""The serving engine on CUDA: continuous batching with a static KV cache, fused weights and one CUDA
graph per (batch, attended length) bucket of the decode step. Runs on CPU too (fp32, no graphs) so the
tests check its arithmetic; its speed on a GPU has NOT been measured yet (`python -m tasks.gpubench`).

`CudaEngine(model, eos_token_ids=..., device="cuda", options=CudaOptions(...))` takes a Hugging Face
Llama-architecture model (the SmolLM2 family) with its own or costopt's quantized modules, and copies
its weights to the device once, in `options.dtype` (bf16 by default):
- q/k/v become one weight and gate/up one weight (`costopt.kernels.gpu_linear.concat`), so a layer is
  about ten kernels: add+RMSNorm, QKV GEMM, RoPE+cache write, attention, O GEMM, add+RMSNorm, gate/up
  GEMM, SiLU*mul, down GEMM (the residual add of a layer's output fuses into the next layer's norm);
- weights: dense, or weight-only INT8 (per output channel) and INT4 (grouped, two codes a byte) with
  the kernels of `costopt.kernels.gpu_linear`: costopt's own INT8/INT4 codes run as they are (the
  weights whose quality was measured on CPU), or `options.weights` quantizes dense weights on load;
- KV cache: one tensor [layers, 2, slots, kv_heads, max_len, head_dim], zeroed, on the device. Slots
  are the largest batch bucket plus one scratch slot that padded rows write to.

Decode step: the rows (row i lives in slot i, `SlotEngine`'s invariant) are padded to the smallest
batch bucket (1, 2, 4, ... 64) that holds them, and attend over the smallest length bucket (128, 256,
... max_len) that holds their longest sequence, with a per-row length mask; padded rows write only the
scratch slot, and their outputs are dropped. Token ids, positions and slots are copied into the
bucket's static input tensors; on CUDA each bucket is captured once (`torch.cuda.CUDAGraph`, lazily on
first use or by `warmup`) and then replayed: one launch per step, whatever the kernel count. The layer
and the LM head are `torch.compile`d as regions (each compiled once and reused by every layer; batch
and length dynamic), so Inductor fuses RMSNorm, RoPE, SiLU*mul and the INT8/INT4 de-quantization into
few kernels; the graph removes the per-call Python cost of the regions. Attention is SDPA: the query
heads of one KV head form a [group, head_dim] block against that head's cache (no K/V repeat). Greedy
argmax runs on the device (only token ids come back); temperature/top-p rows copy their logits row to
the host and sample with the request's own generator, as on CPU. Prefill runs outside the graphs,
eagerly, all newcomers' prompts packed into one pass with causal SDPA per prompt.

Why our own step: the issue's probe found HF's forward with its static cache under
`torch.compile(mode="reduce-overhead")` failing with a CUDA-graph overwrite error (an output of a graph
replay read after the next replay), and HF `generate` eager bound by ~300 kernel launches a step.
Owning the step fixes both: static buffers are ours, each graph's outputs are read within the step
that replayed it (so graphs share one memory pool safely), and every shape is a bucket we chose.

Not done here: prefix caching (`PREFIX_CACHE = False`), chunked prefill, a paged cache, speculative
decoding; tensor parallelism. CPU (device "cpu") runs the same code path eagerly, graphs off and
compile off unless asked; it is for tests, not for speed (costopt.runtimes.engine is the CPU engine).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from costopt.kernels import triton_decode as fused
from costopt.kernels.gpu_linear import (INT4_KERNELS, Embedding, QuantWeights, build_linear, concat, module_bytes,
                                        pack_int4, quantize_int4, quantize_int8, unpack_int4)
from costopt.models.source import check_architecture
from costopt.runtimes.rope import rope
from costopt.runtimes.slots import SlotEngine, StepBatch, StepEvent, TensorKVSlots, TokenLogprobs, sample

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS = ("none", "int8", "int4")  # none: the model's own weights; int8/int4: quantize dense Linears on load
KERNELS = ("auto", "triton", "compiled")  # small-batch decode: fused Triton kernels, or compiled regions + cuBLAS
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # the second autotunes Triton GEMM templates (slow compile)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode batch sizes a graph is captured for
RECOMPILE_LIMIT = 64  # dynamo entries per compiled region: shapes x formats x batch ranges of every engine


def available() -> str | None:
    """None when a CUDA device is usable here, else why not."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__} is {build})"


@dataclass(frozen=True)
class CudaOptions:
    """How the engine runs the model; `check` raises ValueError naming the field."""
    dtype: str = "bf16"  # activations and dense weights: bf16 | fp16 | fp32
    weights: str = "none"  # none | int8 | int4: dense Linears quantized on load (round to nearest); head INT8
    group_size: int = 64  # INT4 input channels per scale/zero (weights: int4); divides every SmolLM2 width
    graphs: bool | None = None  # capture each decode bucket as a CUDA graph; None: on for CUDA
    compile: bool | None = None  # torch.compile the layer and head regions; None: on for CUDA
    compile_mode: str = "default"  # or max-autotune-no-cudagraphs (Triton GEMMs with fused de-quantization)
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # decode batch sizes; rows are padded up to the next one
    len_bucket: int = 128  # smallest attended length; buckets double up to max_len
    int4_kernel: str = "auto"  # auto | tinygemm | dequant (costopt.kernels.gpu_linear)
    gemv_rows: int = 8  # compiled INT8/INT4 layers: at most this many rows run as one fused reduction
    kernels: str = "auto"  # decode buckets of <= fused_rows rows: triton (costopt.kernels.triton_decode) or
    #                        compiled; auto: triton on CUDA where every layer's weights fit it, else compiled
    fused_rows: int = 8  # the largest decode bucket the Triton kernels run (at most triton_decode.MAX_ROWS)

    def __post_init__(self) -> None:
        if isinstance(self.buckets, list):
            object.__setattr__(self, "buckets", tuple(self.buckets))

    def check(self) -> None:
        for name, allowed in (("dtype", tuple(DTYPES)), ("weights", WEIGHTS), ("compile_mode", COMPILE_MODES),
                              ("int4_kernel", INT4_KERNELS), ("kernels", KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r}; expected one of {list(allowed)}")
        for name in ("graphs", "compile"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"{name}: {getattr(self, name)!r}; expected true, false or null (on for CUDA)")
        if type(self.fused_rows) is not int or not 1 <= self.fused_rows <= fused.MAX_ROWS:
            raise ValueError(f"fused_rows: {self.fused_rows!r}; expected an integer in [1, {fused.MAX_ROWS}]")
        for name, low in (("group_size", 2), ("len_bucket", 1), ("gemv_rows", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < low or (name == "group_size" and value % 2):
                raise ValueError(f"{name}: {value!r}; expected an {'even ' if name == 'group_size' else ''}"
                                 f"integer >= {low}")
        b = self.buckets
        if not (isinstance(b, tuple) and b and all(type(x) is int and x >= 1 for x in b)
                and all(x < y for x, y in zip(b, b[1:]))):
            raise ValueError(f"buckets: {list(b) if isinstance(b, tuple) else b!r}; expected strictly increasing "
                             f"integers >= 1, e.g. {list(DEFAULT_BUCKETS)}")


class DeviceLogits(NamedTuple):
    """One step's output on the device: logits [n, vocab] and their argmax [n]."""
    logits: torch.Tensor
    tokens: torch.Tensor


class CudaLayer(nn.Module):
    """One Llama decoder layer's weights on the device, fused; sizes as plain ints (constants to compile)."""

    def __init__(self, in_norm: torch.Tensor, qkv: list[nn.Module], o: nn.Module, post_norm: torch.Tensor,
                 gate_up: list[nn.Module], down: nn.Module, n_q: int, n_kv: int, hd: int, eps: float) -> None:
        super().__init__()
        self.register_buffer("in_norm", in_norm)
        self.register_buffer("post_norm", post_norm)
        self.qkv, self.gate_up = nn.ModuleList(qkv), nn.ModuleList(gate_up)  # one module each when fused
        self.o, self.down = o, down
        self.n_q, self.n_kv, self.hd, self.eps, self.scale = n_q, n_kv, hd, eps, hd ** -0.5


# -- the step's arithmetic (eager, or compiled as regions) ------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, rounding as transformers does: normalize in fp32, scale in the weight's dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _project(mods: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    return mods[0](x) if len(mods) == 1 else torch.cat([m(x) for m in mods], dim=-1)


def _qkv(layer: CudaLayer, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, hd], k/v [T, Hkv, hd] of the residual stream r [T, D]; cos/sin [T, 1, hd]."""
    t, hd = r.shape[0], layer.hd
    q, k, v = _project(layer.qkv, rms_norm(r, layer.in_norm, layer.eps)).split(
        [layer.n_q * hd, layer.n_kv * hd, layer.n_kv * hd], dim=-1)
    return rope(q.view(t, layer.n_q, hd), cos, sin), rope(k.view(t, layer.n_kv, hd), cos, sin), \
        v.view(t, layer.n_kv, hd)


def _mlp(layer: CudaLayer, r: torch.Tensor) -> torch.Tensor:
    gate, up = _project(layer.gate_up, rms_norm(r, layer.post_norm, layer.eps)).chunk(2, dim=-1)
    return layer.down(F.silu(gate) * up)


def write_kv(kv_l: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """K/V of T rows [T, Hkv, hd] into kv_l [2, slots, Hkv, max_len, hd] at (slot[t], pos[t]), as one
    `index_put_` on kv_l itself. Writing through the view `kv_l[0]` instead made Inductor copy the whole
    layer cache back after every compiled decode step (on the H100: 0.46 ms of a 1.7B-shape layer's
    0.77 ms at batch 1, `triton_poi_fused_copy_`); indexing the base tensor is updated in place."""
    t = slot.shape[0]
    which = torch.arange(2, device=kv_l.device)[:, None].expand(2, t)
    kv_l[which, slot.expand(2, t), :, pos.expand(2, t)] = torch.stack([k, v])


def decode_layer(layer: CudaLayer, h: torch.Tensor, d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slot: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, kv_l: torch.Tensor):
    """One layer over B decode rows: residual h + the previous layer's output d [B, D] -> (residual, this
    layer's output). Row b's new K/V go to kv_l [2, slots, Hkv, max_len, hd] at (slot[b], pos[b]); row b
    attends to slot b's first S positions under mask [B, 1, 1, S] (additive: 0 or -inf)."""
    b, s = h.shape[0], mask.shape[-1]
    r = h + d
    q, k, v = _qkv(layer, r, cos, sin)
    write_kv(kv_l, slot, pos, k, v)
    qg = q.view(b, layer.n_kv, layer.n_q // layer.n_kv, layer.hd)  # [B, Hkv, G, hd]: query heads under their KV head
    o = F.scaled_dot_product_attention(qg, kv_l[0, :b, :, :s], kv_l[1, :b, :, :s], attn_mask=mask,
                                       scale=layer.scale)  # [B, Hkv, G, hd]
    r = r + layer.o(o.reshape(b, -1))
    return r, _mlp(layer, r)


def prefill_layer(layer: CudaLayer, h: torch.Tensor, d: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  slot: torch.Tensor, pos: torch.Tensor, spans: list[tuple[int, int]], kv_l: torch.Tensor | None):
    """One layer over whole prompts packed in [T, D] (prompt i at spans[i] = (start, length)), each
    attending causally to itself; K/V written at (slot, pos) unless kv_l is None (scoring)."""
    r = h + d
    q, k, v = _qkv(layer, r, cos, sin)
    if kv_l is not None:
        write_kv(kv_l, slot, pos, k, v)
    parts = [causal_attention(q[a:a + n], k[a:a + n], v[a:a + n], layer.scale) for a, n in spans]
    o = parts[0] if len(parts) == 1 else torch.cat(parts)
    r = r + layer.o(o.reshape(h.shape[0], -1))
    return r, _mlp(layer, r)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One prompt attending causally to itself: q [P, H, hd], k/v [P, Hkv, hd] -> [P, H, hd] (4-D inside,
    as the flash kernel wants; GQA without repeating K/V)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, scale=scale, enable_gqa=True)  # [1, H, P, hd]
    return out[0].transpose(0, 1)


def lm_head(norm: torch.Tensor, eps: float, head: nn.Module, h: torch.Tensor, d: torch.Tensor):
    """Final norm, LM head and greedy choice: (logits [B, vocab], argmax [B]), on the device."""
    logits = head(rms_norm(h + d, norm, eps))
    return logits, logits.argmax(-1)


# -- weights: the model's modules -> device formats --------------------------------------------------------
def _weights_of(module: nn.Module, name: str, weights: str, group: int) -> QuantWeights:
    """A Linear (torch's, or costopt's weight-only INT8/INT4) as QuantWeights; `weights` quantizes dense ones."""
    from costopt.quantization.modules import Int4Linear, Int8Linear

    if getattr(module, "bias", None) is not None:
        raise ValueError(f"model: {name} has a bias; the CUDA engine's fused projections take none "
                         f"(Llama's attention_bias and mlp_bias are false)")
    if isinstance(module, (Int8Linear, Int4Linear)) and weights != "none":
        raise ValueError(f"weights: {weights!r}, but {name} is already quantized ({type(module).__name__}); "
                         f"use weights: none to run the variant's own codes")
    if isinstance(module, Int8Linear):
        return QuantWeights("int8", module.weight_int8, module.scale.float())
    if isinstance(module, Int4Linear):
        inv = module.act_inv_scale.float() if module.scaled else None
        return QuantWeights("int4", unpack_int4(module.qweight), module.scale.float(), module.zero.float(), inv,
                            module.group_size)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"model: {name} is a {type(module).__name__}, not a format the CUDA engine runs "
                        f"(dense, costopt's INT8 or INT4 weight-only); serve W8A8 variants on the torch runtime")
    w = module.weight.detach()
    if weights == "int8":
        return quantize_int8(w)
    if weights == "int4":
        try:
            return quantize_int4(w, group)
        except ValueError as exc:
            raise ValueError(f"group_size: {group} does not divide {name}'s {w.shape[1]} input channels") from exc
    return QuantWeights("dense", w)


class _Builder:
    """Builds the device modules of one engine, collecting why any INT4 layer left tinygemm, and each
    projection's weights as the fused kernels read them (`kernel`: the last `linears` call's, or why not)."""

    def __init__(self, options: CudaOptions, device: torch.device) -> None:
        self.options, self.device, self.dtype = options, device, DTYPES[options.dtype]
        self.int4_notes: dict[str, str] = {}
        self.kernel: fused.KernelWeight | str = ""

    def linears(self, mods: list[nn.Module], names: list[str], weights: str) -> list[nn.Module]:
        """One module for the Linears over one input (fused), or one each when their formats differ."""
        parts = [_weights_of(m, n, weights, self.options.group_size) for m, n in zip(mods, names)]
        fused = concat(parts)
        groups = [(fused, "+".join(names))] if fused is not None else list(zip(parts, names))
        out = []
        for w, name in groups:
            module, why = build_linear(w, self.dtype, self.device, self.options.int4_kernel, self.options.gemv_rows)
            if why:
                self.int4_notes[name] = why
            out.append(module)
        self.kernel = _kernel_weight(groups[0][0], groups[0][1], out[0], self.device) if len(groups) == 1 else \
            f"{'+'.join(names)}: their formats differ, so they are not one weight"
        return out

    def norm(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().to(device=self.device, dtype=self.dtype)


def build_weights(model: nn.Module, options: CudaOptions, device: torch.device):
    """(layers, embedding, final norm weight, LM head, INT4 notes, kernel weights) of `model` on `device`;
    kernel weights: [(qkv, o, gate_up, down) per layer..., head] as `_kernel_weight` gives them."""
    b = _Builder(options, device)
    cfg, body = model.config, model.model
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    layers, kernel_weights = [], []

    def linears(mods: list[nn.Module], names: list[str], weights: str, into: list) -> list[nn.Module]:
        out = b.linears(mods, names, weights)
        into.append(b.kernel)
        return out

    for i, layer in enumerate(body.layers):
        at, mlp, p, kw = layer.self_attn, layer.mlp, f"model.layers.{i}", []
        layers.append(CudaLayer(
            b.norm(layer.input_layernorm),
            linears([at.q_proj, at.k_proj, at.v_proj], [f"{p}.self_attn.{n}_proj" for n in "qkv"], options.weights,
                    kw),
            linears([at.o_proj], [f"{p}.self_attn.o_proj"], options.weights, kw)[0],
            b.norm(layer.post_attention_layernorm),
            linears([mlp.gate_proj, mlp.up_proj], [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], options.weights, kw),
            linears([mlp.down_proj], [f"{p}.mlp.down_proj"], options.weights, kw)[0],
            n_q, n_kv, hd, cfg.rms_norm_eps))
        kernel_weights.append(tuple(kw))
    head_weights = "none" if options.weights == "none" else "int8"  # INT4 on the head costs too much quality
    head = linears([model.lm_head], ["lm_head"], head_weights, kernel_weights)[0]
    embed = _embedding(body.embed_tokens, model.lm_head, head, head_weights, b)
    return layers, embed, b.norm(body.norm), head, b.int4_notes, kernel_weights


def _kernel_weight(w: QuantWeights, name: str, module: nn.Module,
                   device: torch.device) -> fused.KernelWeight | str:
    """The projection's weights as the fused decode kernels read them, sharing the module's device tensors
    where the layouts agree (dense, INT8), or why the kernels cannot take it."""
    if w.inv is not None:
        return f"{name}: AWQ's activation scaling (the fused kernels take none)"
    if w.kind == "dense":
        return fused.KernelWeight(fused.DENSE, module.weight)
    if w.kind == "int8":
        return fused.KernelWeight(fused.INT8, module.weight, module.scale)
    packed = getattr(module, "packed", None)  # the de-quantizing module keeps the canonical packing
    kw = fused.KernelWeight(fused.INT4, packed if packed is not None else pack_int4(w.data.to(device)),
                            w.scale.to(device).float().contiguous(), w.zero.to(device).float().contiguous(), w.group)
    try:
        kw.check(name)
    except ValueError as exc:
        return str(exc)
    return kw


def _embedding(src: nn.Module, src_head: nn.Module, head: nn.Module, weights: str, b: _Builder) -> Embedding:
    """The embedding on the device; a tied one shares the head's device tensors (one copy, as on CPU)."""
    from costopt.quantization.modules import Int8Embedding

    tied = getattr(src, "weight", None) is not None and getattr(src_head, "weight", None) is src.weight
    tied = tied or (isinstance(src, Int8Embedding) and getattr(src_head, "weight_int8", None) is src.weight_int8)
    if tied:
        return Embedding(head.weight, getattr(head, "scale", None), b.dtype)
    if isinstance(src, Int8Embedding):
        return Embedding(src.weight_int8.to(b.device), src.scale.float().to(b.device), b.dtype)
    if weights == "int8":
        w = quantize_int8(src.weight.detach())
        return Embedding(w.data.to(b.device), w.scale.to(b.device), b.dtype)
    return Embedding(src.weight.detach().to(device=b.device, dtype=b.dtype), None, b.dtype)


def _check(model: nn.Module, max_batch: int, max_len: int, device: torch.device, options: CudaOptions) -> Any:
    """The model's config, after checking the model and the engine's limits; errors name the field."""
    options.check()
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        raise TypeError("model: expected a Llama-like causal LM with .config, .model and .lm_head "
                        "(e.g. transformers' LlamaForCausalLM)")
    check_architecture(cfg, "model")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"model: hidden_act {cfg.hidden_act!r}; the CUDA engine implements Llama's SiLU MLP only")
    limit = getattr(cfg, "max_position_embeddings", max_len)
    if type(max_len) is not int or not 2 <= max_len <= limit:
        raise ValueError(f"max_len: {max_len!r}; must be an integer in [2, {limit}] (the model's "
                         f"max_position_embeddings)")
    if type(max_batch) is int and max_batch > options.buckets[-1]:
        raise ValueError(f"max_batch: {max_batch} exceeds the largest bucket {options.buckets[-1]} (buckets: "
                         f"{list(options.buckets)}); add a bucket >= {max_batch} or lower max_batch")
    if device.type == "cuda" and available():
        raise RuntimeError(f"device: {device}: {available()}")
    if options.graphs and device.type != "cuda":
        raise ValueError(f"graphs: CUDA graphs need a CUDA device, got device {device.type!r}; use graphs: "
                         f"false (or null: on for CUDA only)")
    return cfg


def _rope_tables(model: nn.Module, max_len: int, dtype: torch.dtype, device: torch.device):
    """cos, sin [max_len, head_dim] from the model's own rotary embedding (its rope scaling included),
    rounded to `dtype` as transformers rounds them for each step."""
    rotary = model.model.rotary_emb
    where = rotary.inv_freq.device
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=where), torch.arange(max_len, device=where)[None])
    return cos[0].to(device=device, dtype=dtype), sin[0].to(device=device, dtype=dtype)


def _len_buckets(first: int, max_len: int) -> tuple[int, ...]:
    out, s = [], min(first, max_len)
    while s < max_len:
        out.append(s)
        s *= 2
    return (*out, max_len)


def capture_graph(fn: Callable[[], Any], device: torch.device, warmups: int = 1, pool: Any = None) -> tuple[Any, Any]:
    """(a CUDA graph of `fn`, what the captured call returned): `fn` runs `warmups` times on a side stream
    first, as capture requires (lazy initialisation, compilation and autotuning must not happen inside it)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class DecodeGraph:
    """One (batch, length) bucket of the decode step: its static inputs, and on CUDA its captured graph.

    Inputs start as padding (token 0 at position 0 of the scratch slot), so the warm-up and capture
    runs write nothing but the scratch slot. `logits`/`tokens` are the graph's static outputs: read them
    before any other bucket replays (the graphs share one memory pool)."""

    def __init__(self, engine: "CudaEngine", batch: int, length: int) -> None:
        dev = engine.device
        self.engine, self.batch, self.length = engine, batch, length
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slot = torch.full((batch,), engine.scratch, dtype=torch.long, device=dev)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None  # [batch, vocab]
        self.tokens: torch.Tensor | None = None  # [batch]

    def forward(self):
        return self.engine._decode_forward(self.ids, self.pos, self.slot, self.length)

    def capture(self, pool: Any) -> None:
        """Compile (first use of a region's shapes) and warm up on a side stream, then capture."""
        # two warm-ups: the first call compiles and autotunes; nothing may compile during capture
        self.graph, (self.logits, self.tokens) = capture_graph(self.forward, self.ids.device, warmups=2, pool=pool)

    def run(self, host: torch.Tensor) -> None:
        """Copy inputs host [3, batch] (ids, positions, slots; pinned on CUDA) in and run the step."""
        for dst, src in zip((self.ids, self.pos, self.slot), host):
            dst.copy_(src, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits, self.tokens = self.forward()


class CudaEngine(TensorKVSlots, SlotEngine):
    """Continuous batching over a Llama-architecture model on a CUDA device (or on CPU for tests); the
    slot bookkeeping (add, cancel, pause, resume, clear, step) is `SlotEngine`'s."""

    def __init__(self, model: nn.Module, *, eos_token_ids: Sequence[int], max_batch: int = 16,
                 max_len: int = 2048, device: str | torch.device = "cuda", options: CudaOptions | None = None,
                 prefix_cache: int = 0) -> None:
        options = options or CudaOptions()
        device = torch.device(device)
        cfg = _check(model, max_batch, max_len, device, options)
        super().__init__(eos_token_ids=eos_token_ids, max_batch=max_batch, max_len=max_len,
                         vocab_size=cfg.vocab_size, prefix_cache=prefix_cache)
        self.options, self.device, self.dtype = options, device, DTYPES[options.dtype]
        self.graphs = device.type == "cuda" if options.graphs is None else options.graphs
        self.compile = device.type == "cuda" if options.compile is None else options.compile
        self.batch_buckets = (*(b for b in options.buckets if b < max_batch),
                              next(b for b in options.buckets if b >= max_batch))
        self.len_buckets = _len_buckets(options.len_bucket, max_len)
        self.slots = self.batch_buckets[-1] + 1  # + the scratch slot padded rows write to
        self.scratch = self.slots - 1
        with torch.inference_mode():
            self.layers, self.embed, self.norm, self.head, self.int4_notes, kernel_weights = \
                build_weights(model, options, device)
            hd = self.layers[0].hd
            n_q, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
            # weights multiplied per token: q/k/v, o, gate/up/down of every layer, and the LM head
            self._matmul_params = len(self.layers) * (d * (n_q + 2 * n_kv) * hd + n_q * hd * d
                                                      + 3 * d * cfg.intermediate_size) + cfg.vocab_size * d
            self.cos, self.sin = _rope_tables(model, max_len, self.dtype, device)  # [max_len, hd] each
            self.positions = torch.arange(max_len, device=device)
            # [layers, k/v, slot, kv_heads, position, head_dim]; zeros: a masked position is weight 0 times a
            # finite value (torch.empty may hold NaN, and 0 * NaN = NaN)
            self.kv = torch.zeros(len(self.layers), 2, self.slots, n_kv, max_len, hd,
                                  dtype=self.dtype, device=device)
            self._kv_layers = list(self.kv.unbind(0))
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._host = {b: torch.zeros(3, b, dtype=torch.long, pin_memory=device.type == "cuda")
                      for b in self.batch_buckets}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.graph_seconds: dict[tuple[int, int], float] = {}  # bucket -> s to compile (first) and capture
        self.decode_steps = 0  # decode steps run through a bucket
        self._layer_fn, self._head_fn = decode_layer, lm_head
        self.fused_rows, self.kernels_note = self._fused_kernels(kernel_weights)
        self._kernel_weights = kernel_weights if self.fused_rows else None
        if self.compile and self.batch_buckets[-1] > self.fused_rows:
            self._compile_regions()
        if self.int4_notes:
            name, why = next(iter(self.int4_notes.items()))
            log.warning("cuda engine: %d INT4 projection(s) run de-quantized, not on tinygemm, e.g. %s: %s "
                        "(engine.int4_notes lists each)", len(self.int4_notes), name, why)

    def _fused_kernels(self, kernel_weights: list) -> tuple[int, str]:
        """(the largest decode bucket the fused Triton kernels run, 0 for none; why not, if they do not)."""
        opt = self.options
        if opt.kernels == "compiled":
            return 0, "kernels: compiled (asked)"
        why = fused.available()
        if why is None and self.device.type != "cuda" and not fused.interpreting():
            why = f"device {self.device.type}: Triton kernels need CUDA (or TRITON_INTERPRET=1)"
        if why is None:
            *layers, head = kernel_weights
            why = next((w for w in [*(w for layer in layers for w in layer), head] if isinstance(w, str)), None)
        if why is not None:
            if opt.kernels == "triton":
                raise ValueError(f"kernels: triton, but {why}")
            log.info("cuda engine: decode on compiled regions, not the fused kernels: %s", why)
            return 0, why
        return max((b for b in self.batch_buckets if b <= opt.fused_rows), default=0), ""

    # -- buckets -----------------------------------------------------------------------------------
    def _compile_regions(self) -> None:
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        mode = None if self.options.compile_mode == "default" else self.options.compile_mode
        self._layer_fn = torch.compile(decode_layer, fullgraph=True, mode=mode)
        self._head_fn = torch.compile(lm_head, fullgraph=True, mode=mode)

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        """The (batch, length) bucket a decode step of `rows` rows, the longest attending to `length`
        positions, runs in. The fused kernels read each row's length on the device, so their buckets
        need one graph for every length: the shortest length bucket stands for all."""
        b = next((x for x in self.batch_buckets if x >= rows), None)
        s = next((x for x in self.len_buckets if x >= length), None)
        if b is None or s is None:
            raise ValueError(f"bucket: {rows} rows x {length} positions exceed the engine's buckets "
                             f"{self.batch_buckets} x {self.len_buckets}")
        return b, (self.len_buckets[0] if b <= self.fused_rows else s)

    @torch.inference_mode()
    def decode_graph(self, batch: int, length: int) -> DecodeGraph:
        """The bucket's step, built (compiled, captured) on first use."""
        if batch not in self.batch_buckets or length not in self.len_buckets:
            raise ValueError(f"decode_graph: ({batch}, {length}) is not a bucket; batch in {self.batch_buckets}, "
                             f"length in {self.len_buckets}")
        graph = self._graphs.get((batch, length))
        if graph is None:
            t0 = time.perf_counter()
            graph = DecodeGraph(self, batch, length)
            if self.graphs:
                graph.capture(self._pool)
            elif self.compile:
                graph.forward()  # compile now, not inside a served step
            self.graph_seconds[(batch, length)] = round(time.perf_counter() - t0, 3)
            self._graphs[(batch, length)] = graph
        return graph

    def warmup(self, batches: Sequence[int] | None = None, lengths: Sequence[int] | None = None) -> float:
        """Build the buckets' steps ahead of traffic (default: every batch bucket at every length); seconds."""
        t0 = time.perf_counter()
        for b in batches or self.batch_buckets:
            for s in lengths or self.len_buckets:
                self.decode_graph(*self.bucket(b, s))  # fused buckets: one graph for every length
        return time.perf_counter() - t0

    # -- the runtime's side (SlotEngine's hooks) ----------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        return super().step()

    def _logits(self, batch: StepBatch, new: list) -> DeviceLogits:
        n = batch.n_dec
        outs = [self._decode(batch.ids[:n], batch.pos[:n])] if n else []
        if new:
            outs.append(self._prefill(batch))
        if len(outs) == 1:
            return outs[0]
        return DeviceLogits(torch.cat([o.logits for o in outs]), torch.cat([o.tokens for o in outs]))

    def _choose(self, logits: DeviceLogits) -> list[int]:
        """Greedy ids from the device; rows that sample copy their logits row and use their own generator."""
        tokens = logits.tokens.tolist()  # the only copy back for a greedy batch: n ints
        rows = [i for i, s in enumerate(self._rows) if s.generator is not None]
        if rows:
            host = logits.logits[rows].float().cpu()
            for j, i in enumerate(rows):
                s = self._rows[i]
                if torch.isfinite(host[j]).all():  # non-finite logits: this row stays greedy, as on CPU
                    tokens[i] = sample(host[j], s.params, s.generator)
        return tokens

    def _logprobs(self, logits: DeviceLogits, tokens: list[int]) -> dict[int, TokenLogprobs]:
        if not any(s.params.logprobs >= 0 for s in self._rows):
            return {}
        return super()._logprobs(logits.logits.float().cpu(), tokens)

    # -- internals -----------------------------------------------------------------------------------
    def _decode(self, ids: list[int], pos: list[int]) -> DeviceLogits:
        """Rows 0..n-1 (in slots 0..n-1), one token each, through their bucket's graph."""
        n = len(ids)
        graph = self.decode_graph(*self.bucket(n, max(pos) + 1))
        host = self._host[graph.batch]
        host[0, :n], host[1, :n], host[2, :n] = torch.tensor(ids), torch.tensor(pos), torch.arange(n)
        host[0, n:], host[1, n:], host[2, n:] = 0, 0, self.scratch  # padding: token 0 at 0 in the scratch slot
        graph.run(host)
        self.decode_steps += 1
        return DeviceLogits(graph.logits[:n], graph.tokens[:n])

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, length: int):
        """The decode step over static inputs ids/pos/slot [B] attending to `length` positions: what a
        graph captures. -> (logits [B, vocab], argmax [B])."""
        b = ids.shape[0]
        if b <= self.fused_rows:
            return self._fused_forward(ids, pos, slot, length)
        h = self.embed(ids)  # [B, D]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, hd]
        hidden = (self.positions[:length][None, :] > pos[:, None])[:, None, None]  # [B, 1, 1, S]
        mask = torch.zeros(b, 1, 1, length, dtype=self.dtype, device=self.device).masked_fill(hidden, float("-inf"))
        d = torch.zeros_like(h)
        dynamic = self.compile and b > 1  # one compiled region for every batch >= 2 (1 is specialized)
        for layer, kv_l in zip(self.layers, self._kv_layers):
            if self.compile:
                _mark_dynamic((h, d, cos, sin, slot, pos, mask), dynamic, mask)
            h, d = self._layer_fn(layer, h, d, cos, sin, slot, pos, mask, kv_l)
        if self.compile:
            _mark_dynamic((h, d), dynamic, None)
        return self._head_fn(self.norm, self.layers[0].eps, self.head, h, d)

    def _fused_forward(self, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, length: int):
        """`_decode_forward` on the fused Triton kernels: five launches a layer (`costopt.kernels.triton_decode`);
        attention reads each row's length from `pos` on the device, so `length` does not matter here."""
        kws = self._kernel_weights
        x = self.embed(ids)  # [B, D]: the residual stream
        for layer, kv_l, (qkv, o, gate_up, down) in zip(self.layers, self._kv_layers, kws):
            q = fused.qkv_rope(x, layer.in_norm, layer.eps, qkv, self.cos, self.sin, pos, slot, kv_l, layer.n_q,
                               layer.n_kv)
            x = fused.gemv(fused.attention(q, kv_l, pos), o, residual=x, kind="o")
            x = fused.gemv(fused.gate_up(x, layer.post_norm, layer.eps, gate_up), down, residual=x, kind="down")
        logits = fused.gemv(x, kws[-1], norm=self.norm, eps=self.layers[0].eps, kind="head")
        return logits, logits.argmax(-1)

    def _prefill(self, batch: StepBatch) -> DeviceLogits:
        """Newcomers' whole prompts (packed after the decode rows in `batch`), eager; their last tokens' logits."""
        n = batch.n_dec
        spans = [(a - n, length) for a, length in batch.spans]
        logits = self._prompt_forward(batch.ids[n:], batch.pos[n:], batch.slots[n:], spans,
                                      [a + length - 1 for a, length in spans], write=True)
        return DeviceLogits(logits, logits.argmax(-1))

    def _prompt_forward(self, ids: list[int], pos: list[int], slots: list[int], spans: list[tuple[int, int]],
                        rows: list[int] | None, write: bool) -> torch.Tensor:
        """Logits [len(rows), vocab] (all tokens' if rows is None) of prompts packed in one pass."""
        dev = self.device
        ids_t, pos_t, slot_t = (torch.tensor(x, device=dev) for x in (ids, pos, slots))
        h = self.embed(ids_t)  # [T, D]
        cos, sin = self.cos[pos_t][:, None], self.sin[pos_t][:, None]
        d = torch.zeros_like(h)
        for layer, kv_l in zip(self.layers, self._kv_layers):
            h, d = prefill_layer(layer, h, d, cos, sin, slot_t, pos_t, spans, kv_l if write else None)
        if rows is not None:
            keep = torch.tensor(rows, device=dev)
            h, d = h[keep], d[keep]
        return lm_head(self.norm, self.layers[0].eps, self.head, h, d)[0]

    @torch.inference_mode()
    def prompt_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits [len(ids), vocab] of one sequence (positions 0..n-1); writes no cache."""
        if not 1 <= len(ids) <= self.max_len:
            raise ValueError(f"ids: {len(ids)} tokens; must be 1..{self.max_len} (max_len)")
        return self._prompt_forward(list(ids), list(range(len(ids))), [0] * len(ids), [(0, len(ids))], None,
                                    write=False)

    # -- what a benchmark needs to know --------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every layer, the final norm and the LM head (the
        embedding is read one row per token, so a separate table does not count)."""
        return sum(module_bytes(m) for m in self.layers) + module_bytes(self.head) + \
            self.norm.numel() * self.norm.element_size()

    def kv_bytes(self, rows: int, length: int) -> int:
        """Bytes of K/V a decode step of `rows` rows attending to `length` positions reads."""
        layers, _, _, n_kv, _, hd = self.kv.shape
        return layers * 2 * rows * n_kv * length * hd * self.kv.element_size()

    def matmul_params(self) -> int:
        """Weights multiplied per token (layers' projections and the LM head): FLOPs per token = 2x this."""
        return self._matmul_params


def _mark_dynamic(tensors: tuple, batch: bool, mask: torch.Tensor | None) -> None:
    """Tell dynamo which sizes vary, so one compiled region serves every bucket: the batch (>= 2) and the
    attended length (the mask's last dimension)."""
    if batch:
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    if mask is not None:
        torch._dynamo.maybe_mark_dynamic(mask, 3)


class CudaScorer:
    """The CUDA engine's own teacher-forced logits, called like a Hugging Face causal LM on a padded batch
    (`model(input_ids=, attention_mask=).logits`, on the host, fp32): the validate phase's scorer."""

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cuda",
                 options: CudaOptions | None = None, max_len: int | None = None) -> None:
        limit = getattr(model.config, "max_position_embeddings", 2048)
        options = replace(options or CudaOptions(), buckets=(1,), graphs=False, compile=False)  # prefill only
        self.engine = CudaEngine(model, eos_token_ids=[], max_batch=1, max_len=min(max_len or 4096, limit),
                                 device=device, options=options)
        self.device = torch.device("cpu")  # callers pass host tensors; logits come back to the host

    def eval(self) -> "CudaScorer":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = torch.zeros(*input_ids.shape, self.engine.vocab_size)  # [B, T, V]; padding stays 0
        for b, (ids, keep) in enumerate(zip(input_ids.tolist(), mask.bool().tolist())):
            where = [i for i, k in enumerate(keep) if k]
            if where:
                out[b, torch.tensor(where)] = self.engine.prompt_logits([ids[i] for i in where]).float().cpu()
        return SimpleNamespace(logits=out)
