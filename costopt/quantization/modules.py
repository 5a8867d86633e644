"""Quantized drop-in modules: what a quantized variant's Linears and embeddings become at run time.

Each module holds its weights in the artifact's storage format as buffers (so safetensors save and
load them by name) and calls the matching CPU kernel in `costopt.kernels.ops`:

- `Int8Linear`: per-output-channel INT8 weights, fp32 activations (weight-only);
- `Int8Embedding`: per-row INT8 embedding rows; shares its tensors with a tied `Int8Linear` head;
- `Int4Linear`: grouped INT4 weights (two codes per byte, per-group scale and zero), fp32 activations;
- `W8A8Linear`: INT8 weights and INT8 activations with int32 accumulation; the activation scale is
  per token at run time (dynamic) or one calibrated number (static);
- `Bf16Linear`: bfloat16 weights and activations.

`Int4Linear` and `W8A8Linear` carry an optional per-input-channel divisor of the activations
(`act_inv_scale`, all ones when unused): AWQ and SmoothQuant move quantization difficulty from
activations into weights by scaling input channels, W' = W * s, x' = x / s. We apply x / s as one
multiply at run time instead of folding it into the previous layer, so it works for any Linear
(including o_proj under grouped-query attention, where folding into v_proj is not possible); it costs
K multiplies against the N*K of the GEMM.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from costopt.kernels.ops import int4_gemm, int8_gemm, pack_int4, w8a8_gemm

BF16_NATIVE_ROWS = 16  # bf16 GEMM has no FMA on AVX2: past a few rows, widening to fp32 is faster



def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: w [out, in] fp32 -> (int8 [out, in], scale [out] fp32)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.float()


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale).T + b with fp32 activations, on the native INT8 kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight_int8, mod.scale = quantize_per_channel(linear.weight.detach().float())
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [..., in]
        y = int8_gemm(x.reshape(-1, self.in_features).float(), self.weight_int8, self.scale)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., out]
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Embedding(nn.Module):
    """Row lookup into per-row INT8 embeddings; shares its tensors with a tied Int8Linear head."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(num, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).float()  # [..., dim]
        return rows * F.embedding(ids, self.scale[:, None])




class Bf16Linear(nn.Linear):
    """A bf16 Linear that picks its kernel by batch size, with bf16 semantics either way.

    Small batches (decode) run the native bf16 GEMM, which reads half the bytes of fp32. Large batches
    (prefill, teacher-forced evaluation) are compute-bound, and this AVX2 CPU has no bf16 FMA, so the
    native bf16 GEMM is 6x slower than fp32 there (measured). For them we widen the bf16 inputs to fp32,
    multiply with fp32 accumulation and round the result to bf16: every product of two bf16 numbers is
    exact in fp32, so this equals a bf16 GEMM with fp32 accumulation up to summation order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= BF16_NATIVE_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)




def _apply_inv(x: torch.Tensor, inv: torch.Tensor | None, active: bool) -> torch.Tensor:
    return x * inv if active else x


class Int4Linear(nn.Module):
    """y = (x / s) @ W_hat.T + b, W_hat de-quantized from grouped INT4 codes, on the native INT4 kernel.

    Buffers (the artifact format): `qweight` uint8 [out, in/2] (two 4-bit codes per byte, low nibble
    first), `scale` and `zero` fp32 [out, in/group], `act_inv_scale` fp32 [in] (1/s; ones = no scaling).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size: {group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups))
        self.register_buffer("act_inv_scale", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.scaled = False  # set by `finalize()` once the buffers hold real values

    @classmethod
    def from_codes(cls, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int, inv_scale: torch.Tensor | None = None) -> "Int4Linear":
        """Wrap codes q uint8 [out, in] (0..15) with their group scale/zero; `inv_scale` = 1/s or None."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        mod.qweight, mod.scale, mod.zero = pack_int4(q), scale.float().contiguous(), zero.float().contiguous()
        if inv_scale is not None:
            mod.act_inv_scale = inv_scale.float().contiguous()
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod.finalize()

    def finalize(self) -> "Int4Linear":
        self.scaled = bool((self.act_inv_scale != 1).any()) if not self.act_inv_scale.is_meta else False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [..., in]
        x2 = _apply_inv(x.reshape(-1, self.in_features).float(), self.act_inv_scale, self.scaled)
        y = int4_gemm(x2, self.qweight, self.scale, self.zero, self.group_size)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., out]
        return y if self.bias is None else y + self.bias.to(x.dtype)


class W8A8Linear(nn.Module):
    """y = s_x * s_w * (q(x / s) @ W_int8.T) + b with int32 accumulation, on the native W8A8 kernel.

    Buffers: `weight_int8` int8 [out, in], `scale` fp32 [out], `act_scale` fp32 [1] (static per-tensor
    activation scale; NaN = dynamic, per token at run time), `act_inv_scale` fp32 [in] (SmoothQuant 1/s).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("act_scale", torch.full((1,), float("nan")))
        self.register_buffer("act_inv_scale", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.scaled, self.static = False, None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scale: float | None = None,
                    smooth: torch.Tensor | None = None) -> "W8A8Linear":
        """Quantize `linear`'s weight (times `smooth` per input channel, if given) per output channel."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]
            mod.act_inv_scale = (1.0 / smooth).float().contiguous()
        mod.weight_int8, mod.scale = quantize_per_channel(w)
        if act_scale is not None:
            mod.act_scale = torch.tensor([float(act_scale)])
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod.finalize()

    def finalize(self) -> "W8A8Linear":
        if self.act_scale.is_meta:
            return self
        self.scaled = bool((self.act_inv_scale != 1).any())
        value = float(self.act_scale[0])
        self.static = None if value != value else value  # NaN -> dynamic
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [..., in]
        x2 = _apply_inv(x.reshape(-1, self.in_features).float(), self.act_inv_scale, self.scaled)
        y = w8a8_gemm(x2, self.weight_int8, self.scale, self.static)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., out]
        return y if self.bias is None else y + self.bias.to(x.dtype)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` inside `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
