"""Calibrated quantization algorithms as pure tensor functions: RTN and GPTQ INT4, AWQ and SmoothQuant scales.

No modules, hooks or I/O here: `costopt.quantization.calibrated` collects the statistics on a model and builds the
quantized Linears; this module holds the maths. Everything is torch on the CPU, fp32 (the GPTQ Hessian
factorisation in fp64) and deterministic: the same inputs give bit-identical outputs.

- `rtn_int4` / `dequant_int4`: grouped INT4 by round to nearest, the format every INT4 path returns:
  codes q uint8 [N, K] in 0..15, scale and zero fp32 [N, K/g], w_hat = (q - zero) * scale per group.
- `gptq_int4`: GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", arXiv:2210.17323): quantize column by column and spread each column's
  rounding error over the columns not yet quantized, weighted by the inverse Hessian of X^T X.
  `HessianAccumulator` sums X^T X from forward-hook batches.
- `awq_scales`: AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
  and Acceleration", arXiv:2306.00978): per-input-channel scales s = mean|x|^alpha that enlarge the
  weights of salient channels before RTN, alpha searched on a grid against the output error.
- `smoothquant_scales` / `best_smoothing`: SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and
  Efficient Post-Training Quantization for Large Language Models", arXiv:2211.10438): move activation
  outliers into the weights, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), alpha picked per layer for W8A8
  with a static per-tensor activation scale.

Why our own: llm-compressor, AutoGPTQ and AutoAWQ pull in heavy dependency trees and GPU-only packing
kernels. torchao 0.18 (checked from its wheel): `prototype.gptq.gptq_quantize` asserts
`device.type == "cuda"` and needs mslk's int4 helpers, and its AWQ observer emits the base config's
`Int4Tensor`, whose from_hp/linear need mslk (GPU) kernels and whose zero-point convention differs from our
`Int4Linear` artifact. So none is usable on this CPU or for our format; the algorithms fit in one file.

    q, scale, zero = gptq_int4(w, acc.matrix(), group_size=64)      # w [N, K], acc: HessianAccumulator
    w_hat = dequant_int4(q, scale, zero, 64)                          # [N, K] fp32
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

INT4_MAX = 15  # codes 0..15
INT8_MAX = 127  # symmetric INT8 range -127..127 (the -128 code unused, as in costopt.quantization.modules)
AWQ_MIN_SCALE = 1e-4  # floor of mean|x|^alpha, so dead channels keep a finite 1/s (AWQ reference)
SQ_RANGE = (1e-5, 1e5)  # SmoothQuant s clamp: both s and 1/s stay finite in fp32 (and in bf16)


# ---------------------------------------------------------------------------------------------
# Round to nearest, grouped INT4


def _check_weight(w: torch.Tensor, group_size: int) -> tuple[int, int]:
    """(N, K) of a 2-D weight; ValueError naming `group_size` when it is not an even divisor of K."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D weight [N, K], got shape {list(w.shape)}")
    n, k = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size: expected an even integer >= 2, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide K={k} (the weight's input width)")
    return n, k


def _group_params(wg: torch.Tensor, sym: bool, clip: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero (as float) of groups wg [..., g] -> ([...], [...]); `clip` [...] in (0, 1]
    shrinks each group's range before rounding (AWQ's clipping; values outside saturate).

    Asymmetric: the range [min(w, 0), max(w, 0)] on 15 steps (0 kept exactly representable, as GPTQ's
    reference quantizer does). Symmetric: zero 8 and scale absmax/7, so codes 1..15 cover
    [-absmax, absmax] with no clipping (code 0 = -8 * scale is unused). All-zero groups get scale 1.
    """
    if sym:
        amax = wg.abs().amax(dim=-1)
        amax = amax if clip is None else amax * clip
        scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        return scale, torch.full_like(scale, 8.0)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    span = hi - lo
    scale = torch.where(span > 0, span / INT4_MAX, torch.ones_like(span))
    zero = torch.round(-lo / scale).clamp(0, INT4_MAX)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of w given broadcastable scale and zero, as float in 0..15."""
    return (torch.round(w / scale) + zero).clamp(0, INT4_MAX)


def rtn_int4(w: torch.Tensor, group_size: int, sym: bool = False, clip: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest grouped INT4 of w [N, K] -> (q uint8 [N, K] in 0..15, scale, zero fp32 [N, K/g]).

    One scale and zero per row and run of `group_size` input channels; w_hat[n, k] = (q[n, k] -
    zero[n, k // g]) * scale[n, k // g], within scale/2 of w (without `clip`). See `_group_params` for
    sym/asym and for `clip` [N, K/g], the per-group range shrink that `clip_search` picks.
    """
    n, k = _check_weight(w, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, g]
    scale, zero = _group_params(wg, sym, clip)  # [N, G]
    q = _codes(wg, scale[..., None], zero[..., None]).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def dequant_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unpacked codes q [N, K] with scale, zero [N, K/g] -> w_hat fp32 [N, K]."""
    n, k = _check_weight(q, group_size)
    if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
        raise ValueError(f"scale/zero: expected shape [{n}, {k // group_size}], got {list(scale.shape)} "
                         f"and {list(zero.shape)}")
    qg = q.float().reshape(n, k // group_size, group_size)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(n, k)


def output_mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared output error of x [T, K] through w_hat instead of w (both [N, K])."""
    diff = x.float() @ (w.float() - w_hat.float()).T  # [T, N]
    return float(diff.pow(2).mean())


# ---------------------------------------------------------------------------------------------
# GPTQ


class HessianAccumulator:
    """Sums H = X^T X [K, K] over every token row a Linear sees (feed it from a forward hook).

    The sum is unnormalised: GPTQ is invariant to scaling H (its dampening is relative to mean diag H
    and its updates are ratios of inverse-Hessian entries), so the reference's 2/n factor is left out.
    Each batch's product runs in fp32 (fast), the running sum is fp64 so many batches do not drift.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)  # [K, K]
        self.count = 0  # token rows added

    def add(self, x: torch.Tensor) -> None:
        """Add activation rows x [..., K]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got {list(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).float()  # [T, K]
        self.sum += (rows.T @ rows).double()
        self.count += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        """H = sum of x^T x, fp32 [K, K]."""
        return self.sum.float()


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, fp32 [K, K] (h fp64, modified in place)."""
    diag = torch.diagonal(h)
    diag += damp * float(diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(f"damp: H + {damp} * mean(diag H) * I is not positive definite; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()


def _gptq_block(w1: torch.Tensor, hinv1: torch.Tensor, col0: int, group_of: list[int],
                scale: torch.Tensor, zero: torch.Tensor, codes: torch.Tensor, dynamic: bool,
                group_size: int, sym: bool) -> torch.Tensor:
    """Quantize the block w1 = W[:, col0:col0+b] column by column, in place; return its errors [N, b].

    Codes go to codes[:, col0 + i]. With `dynamic`, a group's scale/zero are set from the block's
    current (error-updated) weights when its first column comes up; otherwise they were set up front.
    """
    err = torch.zeros_like(w1)  # [N, b]: (w - w_hat) / Hinv[i, i]
    for i in range(w1.shape[1]):
        col = col0 + i
        g = group_of[col]
        if dynamic and col % group_size == 0:
            scale[:, g], zero[:, g] = _group_params(w1[:, i:i + group_size], sym)
        q = _codes(w1[:, i], scale[:, g], zero[:, g])  # [N]
        codes[:, col] = q.to(torch.uint8)
        err[:, i] = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / hinv1[i, i]
        w1[:, i:] -= err[:, i:i + 1] * hinv1[i:i + 1, i:]
    return err


def gptq_int4(w: torch.Tensor, H: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
              act_order: bool = False, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ INT4 of w [N, K] for inputs with Hessian H = X^T X [K, K]; same output format as `rtn_int4`.

    Follows the reference (`gptq.py`, fasterquant): input channels with diag H = 0 are dead (their
    weights are zeroed, H_kk set to 1); H is damped by damp * mean(diag H); the upper Cholesky factor
    of H^-1 drives the error feedback; lazy batch updates push a block's errors to the rest of W once
    per `block` columns (rounded to a multiple of group_size, so a group never spans two blocks).
    Without act_order, a group's scale/zero come from the error-updated weights when the group starts
    (static_groups=False; torchao does the same, while the reference reads W before the current block's
    in-block updates: the two agree when group_size == block, checked to 4e-7). With act_order, columns
    go in order of decreasing diag H and every group's scale/zero are fixed up front from the original
    weights (static groups), so column k still belongs to group k // group_size in the returned format.
    """
    n, k = _check_weight(w, group_size)
    if H.shape != (k, k):
        raise ValueError(f"H: expected shape [{k}, {k}] for a weight with K={k}, got {list(H.shape)}")
    if not 0 < damp <= 1:
        raise ValueError(f"damp: expected a number in (0, 1], got {damp!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive integer, got {block!r}")
    weight = w.detach().float().clone()  # [N, K], updated in place
    h = H.detach().double().clone()  # [K, K]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    groups = k // group_size
    scale, zero = torch.ones(n, groups), torch.zeros(n, groups)
    perm = torch.arange(k)
    if act_order:
        scale, zero = _group_params(weight.reshape(n, groups, group_size), sym)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        weight, h = weight[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    group_of = (perm // group_size).tolist()  # [K]: group of the column now at each position
    codes = torch.empty(n, k, dtype=torch.uint8)  # in processing order
    step = max(group_size, block // group_size * group_size)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        err = _gptq_block(weight[:, i1:i2], hinv[i1:i2, i1:i2], i1, group_of, scale, zero, codes,
                          not act_order, group_size, sym)
        weight[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].contiguous(), scale, zero


# ---------------------------------------------------------------------------------------------
# AWQ


class _OutputError:
    """Mean squared output error of weight differences dW [N, K] on fixed rows x [T, K].

    ||x dW^T||^2 = sum((dW G) * dW) with G = x^T x: when T is larger than N, the K x K Gram matrix
    (built once) makes every evaluation cheaper than multiplying by x again.
    """

    def __init__(self, x: torch.Tensor, n_out: int) -> None:
        self.x = x.float()
        self.count = x.shape[0] * n_out
        self.gram = self.x.T @ self.x if x.shape[0] > n_out else None  # [K, K]

    def __call__(self, dw: torch.Tensor) -> float:
        if self.gram is None:
            return float((self.x @ dw.T).pow(2).sum()) / self.count
        return float(((dw @ self.gram) * dw).sum().clamp(min=0.0)) / self.count


@dataclass(frozen=True)
class AwqResult:
    """Outcome of the AWQ search for one Linear."""
    scales: torch.Tensor  # [K] fp32: quantize W * s (per input channel), feed x / s
    alpha: float  # chosen exponent on mean|x| (0 = no scaling, plain RTN)
    error: float  # mean squared output error on the calibration rows with `scales`
    rtn_error: float  # the same for plain RTN (alpha = 0)

    @property
    def ratio(self) -> float:
        """error / rtn_error: at most 1 on the calibration rows by construction."""
        return self.error / self.rtn_error if self.rtn_error > 0 else 1.0


def _awq_candidate(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha normalised by sqrt(max * min), as the AWQ reference; alpha = 0 gives ones."""
    s = x_mean.pow(alpha).clamp(min=AWQ_MIN_SCALE)
    return s / torch.sqrt(s.max() * s.min())


def awq_scales(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20) -> AwqResult:
    """AWQ scale search for w [N, K] on calibration rows x [T, K] (a subsample is enough).

    Tries alpha = i / grid for i in 0..grid-1 and keeps the s minimising ||x w^T - (x/s) Q(w*s)^T||^2,
    Q = `rtn_int4` then `dequant_int4` (asymmetric). alpha = 0 (s = 1, plain RTN) is tried first and
    only a strictly lower error replaces it, so AWQ never does worse than RTN on these rows.
    """
    n, k = _check_weight(w, group_size)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x: expected calibration rows [T, {k}], got shape {list(x.shape)}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid: expected a positive integer, got {grid!r}")
    w = w.detach().float()
    x_mean = x.detach().float().abs().mean(dim=0)  # [K]
    error_of = _OutputError(x.detach(), n)
    best = None
    for i in range(grid):
        s = _awq_candidate(x_mean, i / grid)
        w_hat = dequant_int4(*rtn_int4(w * s, group_size), group_size) / s  # [N, K]
        err = error_of(w - w_hat)
        if best is None or err < best[2]:
            best = (s, i / grid, err)
        if i == 0:
            rtn_error = err
    return AwqResult(scales=best[0], alpha=best[1], error=best[2], rtn_error=rtn_error)


def clip_search(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clipping search: per output row and group, the range shrink r in [1 - max_shrink, 1]
    (steps of 1/grid) whose RTN codes minimise that group's output error on the rows x [T, K].

    A group's error is d^T (X_g^T X_g) d with d = w_g - Q_r(w_g), so one Gram matrix per group [g, g]
    replaces the T rows. r = 1 (no clipping, plain RTN) is tried first and only a strictly lower error
    replaces it. Returns r [N, K/g] for `rtn_int4(..., clip=r)`.
    """
    n, k = _check_weight(w, group_size)
    groups = k // group_size
    wg = w.detach().float().reshape(n, groups, group_size)  # [N, G, g]
    xg = x.detach().float().reshape(-1, groups, group_size)  # [T, G, g]
    gram = torch.einsum("tgi,tgj->gij", xg, xg)  # [G, g, g]
    best_err = torch.full((n, groups), float("inf"))
    best = torch.ones(n, groups)
    for i in range(int(grid * max_shrink) + 1):
        r = torch.full((n, groups), 1.0 - i / grid)
        scale, zero = _group_params(wg, False, r)
        d = wg - (_codes(wg, scale[..., None], zero[..., None]) - zero[..., None]) * scale[..., None]
        err = torch.einsum("ngi,gij,ngj->ng", d, gram, d)  # [N, G]
        better = err < best_err
        best = torch.where(better, r, best)
        best_err = torch.where(better, err, best_err)
    return best


# ---------------------------------------------------------------------------------------------
# SmoothQuant for W8A8 with a static per-tensor activation scale


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """De-quantized symmetric per-output-channel INT8 of w [N, K]: round(w / s) * s, s = absmax_row / 127.

    The same rounding as `costopt.quantization.modules.quantize_per_channel` (kept here so this module stays pure).
    """
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / INT8_MAX  # [N, 1]
    return torch.clamp(torch.round(w / scale), -INT8_MAX, INT8_MAX) * scale


def static_int8_act(x: torch.Tensor) -> torch.Tensor:
    """De-quantized x [T, K] with one static scale s_x = absmax(x) / 127 over the whole tensor."""
    scale = x.abs().max().clamp(min=1e-8) / INT8_MAX
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def smoothquant_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max|W_j|^(1 - alpha) for act_absmax [K], w [N, K]; x / s and W * s.

    Both maxima are floored at 1e-5 (dead channels) and s is clamped to [1e-5, 1e5]. alpha = 0 means
    no migration and returns ones (the formula's limit 1 / max|W_j| would push the weight range into
    the activations instead).
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha: expected a number in [0, 1), got {alpha!r}")
    if act_absmax.shape != (w.shape[1],):
        raise ValueError(f"act_absmax: expected shape [{w.shape[1]}], got {list(act_absmax.shape)}")
    if alpha == 0:
        return torch.ones(w.shape[1])
    a = act_absmax.detach().float().clamp(min=1e-5)
    wmax = w.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # [K]
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(*SQ_RANGE)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
               quantize_act: Callable[[torch.Tensor], torch.Tensor] = static_int8_act,
               y: torch.Tensor | None = None) -> float:
    """Mean squared error of y = x w^T against W8A8 with smoothing s: quantize_act(x / s) @ int8_rows(w * s)^T.
    `y`: x w^T when the caller already has it (it is the same for every s)."""
    y = x @ w.T if y is None else y  # [T, N]
    y_hat = quantize_act(x / s) @ int8_rows(w * s[None, :]).T
    return float((y - y_hat).pow(2).mean())


def best_smoothing(x: torch.Tensor, w: torch.Tensor, alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
                   quantize_act: Callable[[torch.Tensor], torch.Tensor] = static_int8_act
                   ) -> tuple[float, torch.Tensor, dict[float, float]]:
    """The SmoothQuant alpha with the lowest W8A8 output error on calibration rows x [T, K] for w [N, K].

    Returns (alpha, s [K], errors {alpha: mean squared error}). alpha = 0 (s = ones, no migration) is
    always tried first and only a strictly lower error replaces it, so migration is used only where it
    helps on these rows. `quantize_act` maps x / s to its de-quantized form (default: static per-tensor).
    """
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x: expected calibration rows [T, {w.shape[1]}], got shape {list(x.shape)}")
    x, w = x.detach().float(), w.detach().float()
    act_absmax = x.abs().amax(dim=0)  # [K]
    y = x @ w.T  # [T, N]: the float output every alpha is compared with, computed once
    errors: dict[float, float] = {}
    best = (0.0, torch.ones(w.shape[1]), math.inf)
    for alpha in sorted({0.0, *(float(a) for a in alphas)}):
        s = smoothquant_scales(act_absmax, w, alpha)
        errors[alpha] = w8a8_error(x, w, s, quantize_act, y)
        if errors[alpha] < best[2]:
            best = (alpha, s, errors[alpha])
    return best[0], best[1], errors
