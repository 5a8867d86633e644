"""Fused Triton kernels for the CUDA engine's decode step at small batch: five kernels a layer.

At batch 1 a decode step of a SmolLM2-1.7B-shaped model reads 3.4 GB of bf16 weights; at the H200's
~4.3 TB/s that is ~0.8 ms. Inductor's compiled regions plus cuBLAS launch about ten kernels a layer
(norm, QKV GEMV, RoPE, two cache writes, attention, O GEMV, add+norm, gate/up GEMV, SiLU*mul, down
GEMV), and each small kernel costs a few microseconds even inside a CUDA graph: 24 layers x ~7 small
kernels is ~0.4 ms, half the roofline again. These kernels fold every elementwise stage into the GEMV
that feeds or follows it:

1. `qkv_rope`: RMSNorm, the fused q/k/v GEMV, RoPE on q and k, and K/V written straight into the cache
   at (slot, pos). RMSNorm's 1/rms is one factor per row of every product, so each program sums x^2 in
   the same pass as its products and scales the sums at the end (no pre-pass over the row);
2. `attention`: each row's query heads over its cache slot up to its position (read on the device, so
   one captured graph serves every length), online softmax;
3. `gemv(..., residual=)`: the O projection with the residual add in its epilogue;
4. `gate_up`: RMSNorm, the fused gate/up GEMV and SiLU(gate) * up, writing only the product;
5. `gemv(..., residual=)`: the down projection with the residual add.
The LM head is `gemv(..., norm=)`. Each kernel reads its weights once, in their stored format: bf16/fp16,
INT8 per output channel (scale in the epilogue) or INT4 grouped asymmetric in costopt's canonical
packing (two codes a byte along K, de-quantized per group inside the reduction as
sum_g s_g (sum_k x_k q_k - z_g sum_k x_k)), so INT8 and INT4 move a half and about a third of bf16's bytes.

The products are multiply-and-sum over a [rows, BN, BK] block on the CUDA cores, not tensor-core dots:
at a few rows the step is bound by weight bytes, and a dot tile would waste 15 of its 16 rows. More
rows than `MAX_ROWS` go to the engine's compiled path (cuBLAS GEMMs). Written here rather than taken
from a library because no maintained kernel on the GPU machine fuses these epilogues (torchao and
gpt-fast rely on Inductor, which keeps the GEMV, RoPE and the cache writes apart); the speed that
decided it is in BENCHMARKS.md section 15. With TRITON_INTERPRET=1 the kernels run on CPU tensors
(the tests' reference check); without Triton, `available()` says why and the engine keeps its
compiled path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # CI and the CPU environments have no Triton
    triton, tl, _IMPORT_ERROR = None, None, exc
else:
    _IMPORT_ERROR = None

DENSE, INT8, INT4 = 0, 1, 2
FORMATS = {"dense": DENSE, "int8": INT8, "int4": INT4}
MAX_ROWS = 8  # batch rows the multiply-and-sum kernels take; more go to GEMMs
REGISTER_BUDGET = 4096  # fp32 products a program holds per K block (rows x BN x BK) before it would spill


def available() -> str | None:
    """None when the kernels can run, else why not."""
    if triton is None:
        return f"Triton is not importable ({_IMPORT_ERROR})"
    return None


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): the kernels run on CPU tensors, slowly (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class KernelWeight:
    """One projection's weights as the kernels read them (on the device)."""
    fmt: int  # DENSE | INT8 | INT4
    data: torch.Tensor  # dense [N, K]; int8 [N, K]; int4 uint8 [N, K/2], k = 2j low nibble of byte j
    scale: torch.Tensor | None = None  # int8: fp32 [N]; int4: fp32 [N, K/group]
    zero: torch.Tensor | None = None  # int4: fp32 [N, K/group]
    group: int = 1  # int4: input channels per scale and zero

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def k(self) -> int:
        return self.data.shape[1] * (2 if self.fmt == INT4 else 1)

    def check(self, name: str) -> None:
        if self.fmt == INT4 and (self.group < 2 or self.group & (self.group - 1) or self.k % self.group):
            raise ValueError(f"{name}: INT4 group {self.group} must be a power of two >= 2 dividing K={self.k}")
        for t in (self.data, self.scale, self.zero):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name}: weights must be contiguous")


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel launch: BN output rows a program, BK input channels a step."""
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3


KINDS = ("qkv", "o", "gate_up", "down", "head")  # the step's projections, for per-kind block sizes
TILES: dict[tuple[str, int], Tiles] = {}  # (kind, format) -> block sizes overriding `default_tiles` (a sweep's best)


def tiles_for(kind: str, rows: int, n: int, k: int, w: KernelWeight) -> Tiles:
    """The block sizes of one launch: `TILES`' entry for (kind, format) when set, else `default_tiles`."""
    t = TILES.get((kind, w.fmt))
    if t is not None and (w.fmt != INT4 or t.bk % w.group == 0):
        return t
    return default_tiles(rows, n, k, w)


def default_tiles(rows: int, n: int, k: int, w: KernelWeight, sms: int = 132) -> Tiles:
    """Enough programs to keep every SM streaming (about four each), and a K block that fits registers."""
    bn = 32
    while bn > 2 and n // bn < 4 * sms:
        bn //= 2
    bk = max(64, min(1024, REGISTER_BUDGET // (_pow2(rows) * bn)))
    bk = 1 << (bk.bit_length() - 1)  # tl.arange takes powers of two
    if w.fmt == INT4:
        bk = max(bk, w.group)  # whole groups a block (both powers of two)
    return Tiles(bn, bk)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


if triton is not None:
    @triton.jit
    def _x_block(x_ptr, nw_ptr, M, K, kk, NORM: tl.constexpr, MP: tl.constexpr):
        """(rows of x at channels kk times the norm weight if NORM: [MP, len(kk)] fp32; their x^2 summed
        per row: [MP]). RMSNorm's 1/rms is a per-row factor of every product, so the caller applies it
        to the sums at the end: one pass over x and W, no pre-pass for the norm."""
        m = tl.arange(0, MP)
        x = tl.load(x_ptr + m[:, None] * K + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        ss = tl.sum(x * x, axis=1)
        if NORM:
            x = x * tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
        return x, ss

    @triton.jit
    def _dense_part(x, w_ptr, rows, N, K, kk):
        """[MP, BN]: x [MP, BK] times W[rows, kk] (dense or INT8 codes; INT8's scale is applied after the loop)."""
        w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < N) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)  # [BN, BK]
        return tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    @triton.jit
    def _int4_part(xe, xo, xs, w_ptr, s_ptr, z_ptr, rows, N, K, j, k0, GROUP: tl.constexpr, MP: tl.constexpr,
                   BN: tl.constexpr, NG: tl.constexpr):
        """[MP, BN]: sum over the block's groups g of s_g (sum_k x_k q_k - z_g sum_k x_k), the packed
        bytes j of rows holding channels 2j (low nibble) and 2j + 1 (high)."""
        rmask = rows < N
        p = tl.load(w_ptr + rows[:, None] * (K // 2) + j[None, :], mask=rmask[:, None] & (j[None, :] < K // 2),
                    other=0)
        lo = (p & 15).to(tl.float32)
        hi = (p >> 4).to(tl.float32)
        qx = xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :]  # [MP, BN, BK/2]
        qs = tl.sum(tl.reshape(qx, (MP, BN, NG, GROUP // 2)), axis=3)  # [MP, BN, NG]
        g = k0 // GROUP + tl.arange(0, NG)
        gm = rmask[:, None] & (g[None, :] < K // GROUP)
        s = tl.load(s_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=gm, other=0.0)  # [BN, NG]
        z = tl.load(z_ptr + rows[:, None] * (K // GROUP) + g[None, :], mask=gm, other=0.0)
        return tl.sum(s[None, :, :] * (qs - z[None, :, :] * xs[:, None, :]), axis=2)

    @triton.jit
    def _dot(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, rows_a, rows_b, M, N, K,
             NORM: tl.constexpr, PAIR: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, MP: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr):
        """(x' @ W[rows_a].T, x' @ W[rows_b].T if PAIR), each [MP, BN] fp32, in one pass over K: x' is x,
        or RMSNorm(x) * norm weight when NORM. W in format FMT, de-quantized."""
        acc_a = tl.zeros((MP, BN), tl.float32)
        acc_b = tl.zeros((MP, BN), tl.float32)
        ss = tl.zeros((MP,), tl.float32)
        if FMT == 2:
            NG: tl.constexpr = BK // GROUP
            HK: tl.constexpr = BK // 2
            for k0 in range(0, K, BK):
                j = k0 // 2 + tl.arange(0, HK)  # bytes of the packed rows
                xe, se = _x_block(x_ptr, nw_ptr, M, K, 2 * j, NORM, MP)  # [MP, HK]: the low nibbles' channels
                xo, so = _x_block(x_ptr, nw_ptr, M, K, 2 * j + 1, NORM, MP)
                ss += se + so
                xs = tl.sum(tl.reshape(xe + xo, (MP, NG, GROUP // 2)), axis=2)  # [MP, NG]
                acc_a += _int4_part(xe, xo, xs, w_ptr, s_ptr, z_ptr, rows_a, N, K, j, k0, GROUP, MP, BN, NG)
                if PAIR:
                    acc_b += _int4_part(xe, xo, xs, w_ptr, s_ptr, z_ptr, rows_b, N, K, j, k0, GROUP, MP, BN, NG)
        else:
            for k0 in range(0, K, BK):
                kk = k0 + tl.arange(0, BK)
                x, sk = _x_block(x_ptr, nw_ptr, M, K, kk, NORM, MP)  # [MP, BK]
                ss += sk
                acc_a += _dense_part(x, w_ptr, rows_a, N, K, kk)
                if PAIR:
                    acc_b += _dense_part(x, w_ptr, rows_b, N, K, kk)
            if FMT == 1:
                acc_a = acc_a * tl.load(s_ptr + rows_a, mask=rows_a < N, other=0.0)[None, :]
                if PAIR:
                    acc_b = acc_b * tl.load(s_ptr + rows_b, mask=rows_b < N, other=0.0)[None, :]
        if NORM:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc_a = acc_a * rstd[:, None]
            acc_b = acc_b * rstd[:, None]
        return acc_a, acc_b

    @triton.jit
    def _gemv_kernel(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, res_ptr, out_ptr, M, N, K,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
                     MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out [M, N] = x @ W.T (x RMS-normalized first if NORM), plus res [M, N] if RESIDUAL."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        acc, _ = _dot(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, rows, rows, M, N, K, NORM, False, FMT, GROUP, MP,
                      BN, BK)
        m = tl.arange(0, MP)
        where = m[:, None] * N + rows[None, :]
        mask = (m[:, None] < M) & (rows[None, :] < N)
        y = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:
            y = (y.to(tl.float32) + tl.load(res_ptr + where, mask=mask, other=0.0).to(tl.float32))
            y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + where, y, mask=mask)

    @triton.jit
    def _gate_up_kernel(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, out_ptr, M, I, K,
                        FMT: tl.constexpr, GROUP: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
        """out [M, I] = SiLU(norm(x) @ Wg.T) * (norm(x) @ Wu.T), W = [Wg; Wu] stacked [2I, K]."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        g, u = _dot(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, rows, rows + I, M, 2 * I, K, True, True, FMT, GROUP,
                    MP, BN, BK)
        dt = out_ptr.dtype.element_ty
        g = g.to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u.to(dt).to(tl.float32)
        m = tl.arange(0, MP)
        mask = (m[:, None] < M) & (rows[None, :] < I)
        tl.store(out_ptr + m[:, None] * I + rows[None, :], a.to(dt), mask=mask)

    @triton.jit
    def _qkv_rope_kernel(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
                         q_ptr, kv_ptr, M, K, NQ, NKV, s_kv, s_slot, s_head, s_pos,
                         HD: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, MP: tl.constexpr,
                         BP: tl.constexpr, BK: tl.constexpr):
        """Program (head, chunk): rows [c, c + BP) and [c + HD/2, ...) of one head of norm(x) @ Wqkv.T,
        rotated (q and k heads) and stored: q to q [M, NQ, HD], k/v to the cache at (slot, pos)."""
        HALF: tl.constexpr = HD // 2
        chunks: tl.constexpr = HALF // BP
        pid = tl.program_id(0)
        head = pid // chunks
        c = (pid % chunks) * BP + tl.arange(0, BP)
        n = (NQ + 2 * NKV) * HD
        a1, a2 = _dot(x_ptr, nw_ptr, eps, w_ptr, s_ptr, z_ptr, head * HD + c, head * HD + HALF + c, M, n, K, True,
                      True, FMT, GROUP, MP, BP, BK)
        dt = q_ptr.dtype.element_ty
        a1 = a1.to(dt).to(tl.float32)
        a2 = a2.to(dt).to(tl.float32)
        m = tl.arange(0, MP)
        mm = m < M
        mask = mm[:, None] & (c[None, :] < HALF)
        pos = tl.load(pos_ptr + m, mask=mm, other=0)
        if head < NQ + NKV:  # rotate: out = x * cos + rotate_half(x) * sin
            c1 = tl.load(cos_ptr + pos[:, None] * HD + c[None, :], mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + pos[:, None] * HD + HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + pos[:, None] * HD + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + pos[:, None] * HD + HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
            o1 = a1 * c1 - a2 * s1
            o2 = a2 * c2 + a1 * s2
        else:
            o1 = a1
            o2 = a2
        if head < NQ:
            where = m[:, None] * (NQ * HD) + head * HD + c[None, :]
            tl.store(q_ptr + where, o1.to(dt), mask=mask)
            tl.store(q_ptr + where + HALF, o2.to(dt), mask=mask)
        else:
            is_v = (head >= NQ + NKV).to(tl.int32)
            kvh = head - NQ - is_v * NKV
            slot = tl.load(slot_ptr + m, mask=mm, other=0)
            base = is_v * s_kv + slot * s_slot + kvh * s_head + pos * s_pos  # [MP]
            tl.store(kv_ptr + base[:, None] + c[None, :], o1.to(dt), mask=mask)
            tl.store(kv_ptr + base[:, None] + HALF + c[None, :], o2.to(dt), mask=mask)

    @triton.jit
    def _attention_kernel(q_ptr, kv_ptr, pos_ptr, out_ptr, scale, NQ, NKV, s_kv, s_slot, s_head, s_pos,
                          G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr):
        """Program (row, kv head): the G query heads of that KV head attend to positions 0..pos[row] of
        the row's cache slot (slot = row, the engine's invariant), online softmax over blocks of BS."""
        pid = tl.program_id(0)
        row = pid // NKV
        kvh = pid % NKV
        length = tl.load(pos_ptr + row) + 1
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        heads = kvh * G + g
        q = tl.load(q_ptr + row * (NQ * HD) + heads[:, None] * HD + d[None, :], mask=g[:, None] < G,
                    other=0.0).to(tl.float32)  # [GP, HD]
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, HD), tl.float32)
        k_base = kv_ptr + row * s_slot + kvh * s_head
        for s0 in range(0, length, BS):
            sp = s0 + tl.arange(0, BS)
            live = sp < length
            k = tl.load(k_base + sp[:, None] * s_pos + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            v = tl.load(k_base + s_kv + sp[:, None] * s_pos + d[None, :], mask=live[:, None],
                        other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GP, BS]
            scores = tl.where(live[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * (NQ * HD) + heads[:, None] * HD + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g[:, None] < G)


def _check_ready(x: torch.Tensor) -> int:
    if triton is None:
        raise RuntimeError(f"kernels: {available()}")
    rows = x.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x: {rows} rows; the fused decode kernels take 1..{MAX_ROWS}")
    if not x.is_contiguous():
        raise ValueError("x: must be contiguous")
    return rows


def _wargs(w: KernelWeight) -> tuple:
    dummy = w.data
    return w.data, dummy if w.scale is None else w.scale, dummy if w.zero is None else w.zero


def gemv(x: torch.Tensor, w: KernelWeight, *, residual: torch.Tensor | None = None,
         norm: torch.Tensor | None = None, eps: float = 1e-5, tiles: Tiles | None = None,
         kind: str = "o") -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype; RMSNorm(x; norm) first when `norm` is given; + residual
    [M, N] when given. `kind` picks the block sizes (`tiles_for`) unless `tiles` is given."""
    m = _check_ready(x)
    t = tiles or tiles_for(kind, m, w.n, w.k, w)
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(w.n, t.bn),)](
        x, x if norm is None else norm, eps, *_wargs(w), x if residual is None else residual, out, m, w.n, w.k,
        NORM=norm is not None, RESIDUAL=residual is not None, FMT=w.fmt, GROUP=w.group, MP=_pow2(m),
        BN=t.bn, BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    return out


def gate_up(x: torch.Tensor, norm: torch.Tensor, eps: float, w: KernelWeight,
            tiles: Tiles | None = None) -> torch.Tensor:
    """SiLU(gate) * up of RMSNorm(x) [M, K] through the stacked [gate; up] weight [2I, K] -> [M, I]."""
    m = _check_ready(x)
    inter = w.n // 2
    t = tiles or tiles_for("gate_up", m, inter, w.k, w)
    out = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(triton.cdiv(inter, t.bn),)](
        x, norm, eps, *_wargs(w), out, m, inter, w.k, FMT=w.fmt, GROUP=w.group, MP=_pow2(m), BN=t.bn,
        BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    return out


def qkv_rope(x: torch.Tensor, norm: torch.Tensor, eps: float, w: KernelWeight, cos: torch.Tensor,
             sin: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, kv_l: torch.Tensor, n_q: int, n_kv: int,
             tiles: Tiles | None = None) -> torch.Tensor:
    """q [M, n_q, hd] of RMSNorm(x) [M, K] through the stacked [q; k; v] weight, rotated; k (rotated) and
    v written to kv_l [2, slots, n_kv, max_len, hd] at (slot[i], pos[i]). cos/sin: [max_len, hd]."""
    m = _check_ready(x)
    hd = kv_l.shape[-1]
    if w.n != (n_q + 2 * n_kv) * hd:
        raise ValueError(f"w: {w.n} rows; expected (n_q + 2 n_kv) x head_dim = {(n_q + 2 * n_kv) * hd}")
    t = tiles or tiles_for("qkv", m, w.n, w.k, w)
    bp = min(t.bn, hd // 2)
    q = torch.empty(m, n_q, hd, dtype=x.dtype, device=x.device)
    s = kv_l.stride()
    _qkv_rope_kernel[((n_q + 2 * n_kv) * (hd // 2 // bp),)](
        x, norm, eps, *_wargs(w), cos, sin, pos, slot, q, kv_l, m, w.k, n_q, n_kv, s[0], s[1], s[2], s[3],
        HD=hd, FMT=w.fmt, GROUP=w.group, MP=_pow2(m), BP=bp, BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    return q


def attention(q: torch.Tensor, kv_l: torch.Tensor, pos: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Decode attention: q [M, n_q, hd] (row i in cache slot i, its new K/V already written at pos[i])
    over kv_l [2, slots, n_kv, max_len, hd], positions 0..pos[i] -> [M, n_q * hd]. The length comes from
    `pos` on the device, so one captured graph serves every length."""
    m = _check_ready(q)
    n_q, hd = q.shape[1], q.shape[2]
    n_kv = kv_l.shape[2]
    if n_q % n_kv or hd & (hd - 1):
        raise ValueError(f"q: {n_q} heads over {n_kv} KV heads of size {hd}; expected a multiple, and a power of two")
    out = torch.empty(m, n_q * hd, dtype=q.dtype, device=q.device)
    s = kv_l.stride()
    group = n_q // n_kv
    _attention_kernel[(m * n_kv,)](q, kv_l, pos, out, hd ** -0.5, n_q, n_kv, s[0], s[1], s[2], s[3],
                                   G=group, GP=_pow2(group), HD=hd, BS=block)
    return out
