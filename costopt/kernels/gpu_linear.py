"""Weight-only linear layers for the CUDA engine (`costopt.runtimes.cuda`): dense, INT8 and INT4.

A Linear's weights first become a `QuantWeights` record (its format, codes and scales, on any device),
so the engine can fuse q/k/v and gate/up into one weight each (`concat`) before it builds the run-time
module (`build_linear`). Every format has a pure-torch reference path that runs on CPU (the tests'),
and its GPU path:

- dense (bf16/fp16/fp32): `F.linear`, i.e. cuBLAS.
- INT8, symmetric per output channel (the codes and fp32 scales of costopt's `Int8Linear`, or
  `quantize_int8` of a dense weight, the same rule): y = (x @ q.T) * scale. Under `torch.compile`,
  up to `gemv_rows` activation rows run as one multiply-and-sum over K, which Inductor fuses with the
  int8 -> float conversion into a single reduction kernel that reads the int8 codes once (gpt-fast's
  formulation); more rows de-quantize and call the GEMM. Eager, it de-quantizes and calls the GEMM,
  which reads the weights twice over: correct, and only fast once compiled.
- INT4, grouped asymmetric (`w = (q - zero) * scale` per row and group of `group` input channels; the
  codes of costopt's `Int4Linear`, AWQ's per-input-channel 1/s included, or `quantize_int4`):
  * `tinygemm`: torch's own CUDA kernel `aten._weight_int4pack_mm` (the one gpt-fast and torchao's
    tensor-core-tiled layout call), bf16 activations, scale and zero rounded to bf16 in its
    [groups, N, 2] layout with its zero convention w = (q - 8) * scale + z', z' = (8 - zero) * scale;
  * `dequant`: unpack, de-quantize, multiply, written like INT8 so Inductor fuses it for few rows.
  `auto` takes tinygemm where it applies (CUDA, bf16, the shape constraints in `tinygemm_unfit`) and
  passes a check against the reference on the real layer; else dequant, with the reason kept.

Why not torchao: it is not installed on the GPU machine (its 0.18.0 wheel is pure Python, py3-none-any,
and could travel), but on that setup it would call the same two things: tinygemm for INT4 (its
tensor-core-tiled layout; its default INT4 packing needs fbgemm-gpu-genai, which is not there) and
Inductor-fused de-quantization for INT8. Calling them directly keeps one dependency fewer and the
weights bit-for-bit the ones costopt quantized and validated on CPU. None of these paths has been timed
on a GPU yet: `python -m tasks.gpubench` measures them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("dense", "int8", "int4")
INT4_KERNELS = ("auto", "tinygemm", "dequant")
TINYGEMM_GROUPS = (32, 64, 128, 256)  # group sizes aten._weight_int4pack_mm takes
TINYGEMM_CHECK_TOL = 2e-2  # max |tinygemm - reference| / max |reference| on the check input: bf16 rounding is ~4e-3


@dataclass
class QuantWeights:
    """One Linear's weights in one format, before fusion and before the run-time module is built."""
    kind: str  # dense | int8 | int4
    data: torch.Tensor  # dense: float [N, K]; int8: codes int8 [N, K]; int4: codes uint8 [N, K] in 0..15, unpacked
    scale: torch.Tensor | None = None  # int8: fp32 [N]; int4: fp32 [N, K / group]
    zero: torch.Tensor | None = None  # int4: fp32 [N, K / group], integer-valued codes
    inv: torch.Tensor | None = None  # int4: fp32 [K], AWQ's 1/s multiplying the activations; None: no scaling
    group: int = 0  # int4: input channels per scale and zero

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r}; expected one of {list(KINDS)}")

    @property
    def out_features(self) -> int:
        return self.data.shape[0]


def quantize_int8(w: torch.Tensor) -> QuantWeights:
    """Symmetric per-output-channel INT8 of w [N, K]: costopt's rule (`quantize_per_channel`), so the codes
    equal the int8_weight_only scheme's."""
    from costopt.quantization.modules import quantize_per_channel

    q, scale = quantize_per_channel(w.float())
    return QuantWeights("int8", q, scale.float())


def quantize_int4(w: torch.Tensor, group: int) -> QuantWeights:
    """Round-to-nearest grouped asymmetric INT4 of w [N, K] (`costopt.quantization.algorithms.rtn_int4`)."""
    from costopt.quantization.algorithms import rtn_int4

    q, scale, zero = rtn_int4(w.float(), group)  # raises ValueError naming group_size when it does not divide K
    return QuantWeights("int4", q, scale, zero, None, group)


def concat(parts: list[QuantWeights]) -> QuantWeights | None:
    """The weights of several Linears over the same input as one (outputs stacked along N: fused q/k/v,
    gate/up), or None when their formats differ (e.g. AWQ gave each its own activation scaling)."""
    first = parts[0]
    same = all(p.kind == first.kind and p.group == first.group and p.data.dtype == first.data.dtype
               and ((p.inv is None and first.inv is None)
                    or (p.inv is not None and first.inv is not None and torch.equal(p.inv, first.inv)))
               for p in parts)
    if not same:
        return None
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantWeights(first.kind, cat([p.data for p in parts]), cat([p.scale for p in parts]),
                        cat([p.zero for p in parts]), first.inv, first.group)


# -- INT4 packing ---------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q uint8 [N, K] (0..15) -> uint8 [N, K/2], k = 2j in the low nibble of byte j: costopt's
    canonical INT4 format (`costopt.kernels.ops.pack_int4`, which validates; this one only packs)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the canonical format -> codes uint8 [N, K]; plain tensor ops, so Inductor fuses it."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def tinygemm_unfit(n: int, k: int, group: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why aten._weight_int4pack_mm cannot run this [N, K] weight (None: it can)."""
    if device.type != "cuda":
        return f"device {device.type}: tinygemm is a CUDA kernel"
    if dtype != torch.bfloat16:
        return f"dtype {dtype}: tinygemm takes bf16 activations only"
    if group not in TINYGEMM_GROUPS:
        return f"group_size {group}: tinygemm takes {list(TINYGEMM_GROUPS)}"
    if n % 8:
        return f"out_features {n}: tinygemm needs a multiple of 8"
    if k % 32:
        return f"in_features {k}: tinygemm needs a multiple of 32"
    return None


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """costopt's (scale, zero) [N, G] with w = (q - zero) * scale -> tinygemm's bf16 [G, N, 2] with
    w = (q - 8) * scale + z', z' = (8 - zero) * scale."""
    return torch.stack((scale.float(), (8.0 - zero.float()) * scale.float()), dim=-1).transpose(0, 1) \
        .contiguous().to(torch.bfloat16)


def _inner_k_tiles(k: int) -> int:
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2  # tinygemm needs K % (tiles * 16) == 0


# -- run-time modules -----------------------------------------------------------------------------------
class DenseLinear(nn.Module):
    """y = x @ w.T with w in the activations' dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Int8WeightLinear(nn.Module):
    """y = (x @ q.T) * scale, q int8 [N, K], scale fp32 [N]; x [M, K] -> [M, N] in x's dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, gemv_rows: int) -> None:
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.gemv_rows = gemv_rows  # compiled: at most this many rows take the fused multiply-and-sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[0] <= self.gemv_rows:
            y = (x.float()[:, None, :] * self.weight.float()).sum(-1)  # [M, N]: one reduction, codes read once
        else:
            y = F.linear(x, self.weight.to(x.dtype)).float()  # int8 codes are exact in bf16/fp16
        return (y * self.scale).to(x.dtype)


class Int4WeightLinear(nn.Module):
    """Grouped INT4: y = (x * inv) @ ((q - zero) * scale).T; x [M, K] -> [M, N] in x's dtype.

    `kernel` "dequant" keeps the canonical packed codes [N, K/2] and fp32 scale/zero [N, G]; "tinygemm"
    keeps only what aten._weight_int4pack_mm reads (its packed int32 tiles and bf16 [G, N, 2])."""

    def __init__(self, w: QuantWeights, kernel: str, gemv_rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features = w.data.shape
        self.group, self.kernel, self.gemv_rows = w.group, kernel, gemv_rows
        self.register_buffer("inv", None if w.inv is None else w.inv.float())
        if kernel == "tinygemm":
            q = w.data.to(torch.uint8)
            high_first = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()  # the CUDA op's nibble order
            self.register_buffer("tiles", torch.ops.aten._convert_weight_to_int4pack(
                high_first, _inner_k_tiles(self.in_features)))
            self.register_buffer("scales_and_zeros", tinygemm_scales_and_zeros(w.scale, w.zero))
        else:
            self.register_buffer("packed", pack_int4(w.data))
            self.register_buffer("scale", w.scale.float().contiguous())
            self.register_buffer("zero", w.zero.float().contiguous())

    def dequantize(self) -> torch.Tensor:
        """w_hat fp32 [N, K] (dequant kernel only): the reference the other paths are checked against."""
        n, k, g = self.out_features, self.in_features, self.group
        q = unpack_int4(self.packed).float().view(n, k // g, g)  # [N, G, g]
        return ((q - self.zero[..., None]) * self.scale[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv is not None:
            x = (x.float() * self.inv).to(x.dtype)
        if self.kernel == "tinygemm":
            return torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.tiles, self.group,
                                                      self.scales_and_zeros)
        if torch.compiler.is_compiling() and x.shape[0] <= self.gemv_rows:
            return (x.float()[:, None, :] * self.dequantize()).sum(-1).to(x.dtype)  # de-quantized inside the reduction
        return F.linear(x, self.dequantize().to(x.dtype))


def build_linear(w: QuantWeights, dtype: torch.dtype, device: torch.device, int4_kernel: str = "auto",
                 gemv_rows: int = 8) -> tuple[nn.Module, str | None]:
    """The run-time module for `w` on `device`, and (INT4) why tinygemm was not taken, if it was not."""
    if w.kind == "dense":
        return DenseLinear(w.data.to(device=device, dtype=dtype).contiguous()), None
    if w.kind == "int8":
        return Int8WeightLinear(w.data.to(device).contiguous(), w.scale.to(device).float(), gemv_rows), None
    if int4_kernel not in INT4_KERNELS:
        raise ValueError(f"int4_kernel: {int4_kernel!r}; expected one of {list(INT4_KERNELS)}")
    on = QuantWeights("int4", w.data.to(device), w.scale.to(device), w.zero.to(device),
                      None if w.inv is None else w.inv.to(device), w.group)
    reference = Int4WeightLinear(on, "dequant", gemv_rows)
    if int4_kernel == "dequant" or (int4_kernel == "auto" and device.type != "cuda"):
        return reference, None  # off CUDA the reference is the only path, not a fallback
    n, k = w.data.shape
    why = tinygemm_unfit(n, k, w.group, dtype, device)
    if why is None:
        fast = Int4WeightLinear(on, "tinygemm", gemv_rows)
        why = _tinygemm_mismatch(fast, reference, dtype)
        if why is None:
            return fast, None
    if int4_kernel == "tinygemm":
        raise ValueError(f"int4_kernel: tinygemm cannot run this [{n}, {k}] weight: {why}")
    return reference, why


@torch.inference_mode()
def _tinygemm_mismatch(fast: Int4WeightLinear, reference: Int4WeightLinear, dtype: torch.dtype) -> str | None:
    """None when tinygemm's output matches the reference de-quantization on a random input (a packing or
    zero-convention mistake would not), else what differed."""
    gen = torch.Generator(device=reference.packed.device).manual_seed(0)
    x = torch.randn(4, reference.in_features, device=reference.packed.device, generator=gen).to(dtype)
    want = F.linear(x.float() * (1 if reference.inv is None else reference.inv), reference.dequantize())
    got = fast(x).float()
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    return None if err <= TINYGEMM_CHECK_TOL else f"tinygemm differs from the reference by {err:.3g} (relative)"


class Embedding(nn.Module):
    """Row lookup in a dense [V, D] table, or in INT8 rows [V, D] with fp32 per-row scales [V] (the tied
    INT8 head's own tensors); -> [..., D] in `dtype`."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        return rows if self.scale is None else (rows.float() * self.scale[ids, None]).to(self.dtype)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's buffers and parameters: what one pass over its weights reads."""
    return sum(t.numel() * t.element_size() for t in [*module.buffers(), *module.parameters()])
