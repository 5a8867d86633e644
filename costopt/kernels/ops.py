"""Native CPU GEMMs for quantized decode (INT8 and INT4 weight-only, W8A8), compiled on first use.

Three kernels, one C source each in `csrc/`, for small batches (decode, short prefill) on this AVX2
CPU (no AVX-512, no VNNI); above a measured row count each falls back to de-quantize + BLAS, which
wins once the work is compute-bound. `python -m costopt.kernels` (`costopt.kernels.bench`) reruns every
figure below: medians, 2 threads, the 2-core AMD EPYC (Zen 3) reference machine, whose timings drift
by 10-30% from run to run. Per call at M=1, weights hot in cache (576x576 | LM head 49152x576): fp32
`F.linear` 53 us | 15.4 ms, `int8_gemm` 38 | 2.35 ms, `int4_gemm` g=32 38 | 2.0 ms, g=64 34 | 1.66 ms,
`w8a8_gemm` 25 | 2.4 ms. One whole decode step's 211 GEMVs with cold weights, as in a real forward
(`--step`): fp32 68 ms, INT8 13.5, W8A8 14.2, INT4 g=32 12.6, g=64 9.7.

- `int8_gemm`: INT8 weights, fp32 activations. The stock `aten._weight_int8pack_mm` takes a slow
  scalar path for fp32 activations (5-10x slower than fp32 `F.linear`), its bf16 path costs accuracy
  (bf16 activations doubled KL on the built-in model) and bf16 GEMM is slow for prefill; torch.compile
  of a dequantize-and-reduce GEMV measured slower than fp32; torchao's int8 weight-only path lowers to
  the same aten op. Ours reads 4x fewer weight bytes than fp32.
- `int4_gemm`: grouped INT4 weights in the canonical storage format (see `pack_int4`), fp32
  activations, read as stored (no repacking). Maintained alternatives, measured at M=1: torch's
  `aten._weight_int4pack_mm_for_cpu` (tinygemm; also what torchao 0.18's CPU INT4 weight-only path,
  `Int4OpaqueTensor` via `PrototypeInt4WeightOnlyConfig`, calls; the non-prototype
  `Int4WeightOnlyConfig` has no CPU layout) takes a scalar path for fp32 activations on AVX2: 404 us
  on 576x576 and 59 ms on the head, 4-8x slower than fp32. Its bf16-activation path is vectorized (58
  us, 3.2 ms) but still slower than ours and rounds activations to bf16. torchao: 581 us, 34 ms.
  The scale and zero are fp32 per group, 0.25 bytes per weight at g=32 on top of the 0.5 of the codes,
  which is why g=64 decodes faster than g=32.
- `w8a8_gemm`: INT8 activations (per-token dynamic or per-tensor static scale) x INT8 weights with
  int32 accumulation through `vpmaddwd`. Alternatives: `torch._int_mm` runs on CPU for any M (M=1 too)
  but slowly here (201 us on 576x576, 19 ms on the head, before quantizing activations); torchao 0.18's
  `Int8DynamicActivationInt8WeightConfig` lowers to it plus Python-level quantization (879 us, 18 ms).
  fbgemm's `quantized::linear_dynamic` (torch.ao dynamic quantization) is the strong one: 62 us on
  576x576 and 2.4 ms on the head at M=1 (ours 25 us, 2.4 ms), and on par or faster at M=8 (75 us vs
  73, head 4.0 vs 5.9 ms), but with other numerics: per-tensor asymmetric uint8 activations and 7-bit
  reduced range, not per-token symmetric INT8.

A C source is compiled with the system C compiler into a per-user cache (keyed by a hash of the source
and the flags) the first time its kernel is needed, about a second, and loaded with ctypes. Without a
compiler or AVX2, or with COSTOPT_DISABLE_NATIVE=1, every kernel falls back to the same numerics in
torch, and `native_available()` / `native_failure()` say so. The kernels use OpenMP over output rows
with `torch.get_num_threads()` threads; when other processes hold the cores, a 2-thread call can stall
for a scheduler slice (milliseconds), as torch's own parallel ops do.

Each GEMM is also a torch custom op (`torch.ops.costopt.int8_gemm`, `.int4_gemm`, `.w8a8_gemm`, with
a fake implementation for shape propagation), so `torch.compile(fullgraph=True)` traces a model built
of costopt's quantized modules without a graph break (ctypes calls cannot be traced). The public
functions keep their signatures: under tracing they emit the op, in eager they call the kernel
directly, because a dispatcher round trip per call (~211 per decode step) would tax eager callers.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "int8_gemm.c"  # kept for callers of the single-kernel era
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_VOID, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_EXPORTS = {  # kernel (csrc/<kernel>.c) -> {C function: (argtypes, restype)}
    "int8_gemm": {"costopt_int8_gemm": ([_VOID] * 4 + [_INT] * 4, None)},  # x, w, scale, y, M, N, K, threads
    "int4_gemm": {
        "costopt_int4_gemm": ([_VOID] * 5 + [_INT] * 5, _INT),  # x, w, scale, zero, y, M, N, K, g, threads
        "costopt_int4_dequant": ([_VOID] * 4 + [_INT] * 4, None),  # w, scale, zero, out, N, K, g, threads
    },
    "w8a8_gemm": {  # x, w, wscale, act_scale, y, M, N, K, threads
        "costopt_w8a8_gemm": ([_VOID] * 3 + [_FLOAT, _VOID] + [_INT] * 4, _INT)},
}
KERNELS = tuple(_EXPORTS)

# Above these many activation rows de-quantize + BLAS wins. Figures: one decode step's 211 weight matrices
# (30 layers x 7 + the LM head), native/fallback ms, 2 threads (`python -m costopt.kernels --rows ...`).
# INT8: 102/512 at 16 rows, 269/415 at 48, 389/355 at 64, 945/588 at 128.
MAX_NATIVE_ROWS = 48
# INT4 (g=32): 107/219 at 16, 171/244 at 32, 283/295 at 48, 335/314 at 64, 682/445 at 128. The small
# matrices cross near 32 rows, the LM head (whose de-quantization alone is ~50 ms) only past 256.
INT4_MAX_NATIVE_ROWS = 48
# W8A8 (dynamic): 52/233 at 16, 140/336 at 48, 366/525 at 128, 867/946 at 256, 1477/1694 at 384. Past
# 256 only the LM head still gains; gate/up and down already lose a few percent there.
W8A8_MAX_NATIVE_ROWS = 256
W8A8_MAX_K = 2**31 // 127**2  # int32 sums of |code| <= 127 products cannot overflow below this K

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_failures: dict[str, str] = {}


def _cache_dir() -> Path:
    root = os.environ.get("COSTOPT_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "costopt", "kernels")
    return Path(root)


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _build(name: str) -> ctypes.CDLL:
    """Compile csrc/<name>.c once per (source, flags) into the cache and load it."""
    source = CSRC / f"{name}.c"
    tag = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{tag}.so"
    if not target.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc/gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        proc = subprocess.run([cc, *CFLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load half a file
    lib = ctypes.CDLL(str(target))
    for symbol, (argtypes, restype) in _EXPORTS[name].items():
        try:
            fn = getattr(lib, symbol)
        except AttributeError:
            raise RuntimeError(f"{target.name} does not export {symbol}") from None
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def native_library(name: str = "int8_gemm") -> ctypes.CDLL | None:
    """The compiled kernel `name` (one of KERNELS), or None (with `native_failure(name)` saying why)."""
    if name in _libs or name in _failures:
        return _libs.get(name)
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
    with _lock:
        if name not in _libs and name not in _failures:
            if os.environ.get("COSTOPT_DISABLE_NATIVE") == "1":
                _failures[name] = "disabled by COSTOPT_DISABLE_NATIVE=1"
            elif not _cpu_has_avx2():
                _failures[name] = "this CPU lacks AVX2/FMA"
            else:
                try:
                    _libs[name] = _build(name)
                except (RuntimeError, OSError) as exc:
                    _failures[name] = str(exc)
    return _libs.get(name)


def native_available(name: str | None = None) -> bool:
    """Whether kernel `name` (default: every kernel) runs natively here."""
    names = KERNELS if name is None else (name,)
    return all(native_library(n) is not None for n in names)


def native_failure(name: str | None = None) -> str | None:
    """Why kernel `name` (default: any kernel) is not native, or None when it is."""
    names = KERNELS if name is None else (name,)
    for n in names:
        native_library(n)
    reasons = [f"{n}: {_failures[n]}" if name is None else _failures[n] for n in names if n in _failures]
    return "; ".join(reasons) or None


def _native_for(name: str, x: torch.Tensor, max_rows: int) -> ctypes.CDLL | None:
    if x.shape[0] > max_rows or not x.is_cpu or x.dtype != torch.float32:
        return None
    return native_library(name)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A decode step makes ~200 of these calls of 10-50 us each, so the fast path skips even no-op casts.
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.float().contiguous()


def int8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x fp32 [M, K] @ (w int8 [N, K] * scale [N, 1]).T -> fp32 [M, N]."""
    if torch.compiler.is_compiling():
        return torch.ops.costopt.int8_gemm(x, w, scale)
    return _int8_gemm(x, w, scale)


@torch.library.custom_op("costopt::int8_gemm", mutates_args=())
def _int8_gemm_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _int8_gemm(x, w, scale)


@_int8_gemm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])  # [M, N], x's dtype (fp32 on the native path)


def _int8_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    lib = native_library() if M <= MAX_NATIVE_ROWS else None
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, w.to(x.dtype) * scale.to(x.dtype)[:, None])
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    lib.costopt_int8_gemm(x.data_ptr(), w.data_ptr(), scale.data_ptr(), y.data_ptr(),
                          M, N, K, torch.get_num_threads())
    return y


# ---- INT4 grouped weight-only --------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (integers 0..15) -> uint8 [N, K/2]: k = 2j in the low nibble of byte j, 2j+1 high.

    This is the canonical INT4 storage format that artifacts hold.
    """
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: need codes [N, K] with even K, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool or q.dtype.is_complex:
        raise ValueError(f"pack_int4: codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"pack_int4: codes must lie in 0..15, got {int(q.min())}..{int(q.max())}")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the canonical format -> codes uint8 [N, K] in 0..15."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: need uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _check_int4(K: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> None:
    if g <= 0 or g % 2 or K % g:
        raise ValueError(f"group_size: {g} must be even and divide K={K}")
    N = packed.shape[0]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (N, K // 2):
        raise ValueError(f"packed: need uint8 [N, {K // 2}], got {packed.dtype} {tuple(packed.shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (N, K // g):
            raise ValueError(f"{name}: need shape [{N}, {K // g}] for K={K}, g={g}, got {tuple(t.shape)}")


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Canonical INT4 -> fp32 [N, K]: w[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g].

    Natively in one pass when it can (bit-identical to the torch expression, 5-10x faster on big
    matrices, which is what large batches pay before their BLAS GEMM).
    """
    N, K = packed.shape[0], packed.shape[1] * 2
    _check_int4(K, packed, scale, zero, group_size)
    lib = native_library("int4_gemm") if group_size % 16 == 0 and packed.device.type == "cpu" else None
    if lib is None:
        q = unpack_int4(packed).float().view(N, K // group_size, group_size)  # [N, G, g]
        return ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(N, K)
    packed, scale, zero = packed.contiguous(), scale.float().contiguous(), zero.float().contiguous()
    out = torch.empty(N, K, dtype=torch.float32)
    lib.costopt_int4_dequant(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(),
                             N, K, group_size, torch.get_num_threads())
    return out


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x fp32 [M, K] @ dequantize_int4(packed, scale, zero, group_size).T -> fp32 [M, N].

    Native for M <= INT4_MAX_NATIVE_ROWS when group_size % 16 == 0; otherwise de-quantize + F.linear.
    """
    M, K = x.shape
    N = packed.shape[0]
    G = K // group_size if group_size > 0 else -1
    if not (group_size % 2 == 0 and G * group_size == K and packed.dtype == torch.uint8
            and packed.shape == (N, K // 2) and scale.shape == (N, G) and zero.shape == (N, G)):
        _check_int4(K, packed, scale, zero, group_size)  # raises, naming the problem
    if torch.compiler.is_compiling():
        return torch.ops.costopt.int4_gemm(x, packed, scale, zero, group_size)
    return _int4_gemm(x, packed, scale, zero, group_size)


@torch.library.custom_op("costopt::int4_gemm", mutates_args=())
def _int4_gemm_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    return _int4_gemm(x, packed, scale, zero, group_size)


@_int4_gemm_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])  # [M, N]


def _int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """int4_gemm after validation."""
    M, K = x.shape
    N = packed.shape[0]
    lib = _native_for("int4_gemm", x, INT4_MAX_NATIVE_ROWS) if group_size % 16 == 0 else None
    if lib is None:
        return F.linear(x, dequantize_int4(packed, scale, zero, group_size).to(x.dtype))
    x, packed, scale, zero = x.contiguous(), packed.contiguous(), _fp32(scale), _fp32(zero)
    y = x.new_empty(M, N)
    if lib.costopt_int4_gemm(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                             y.data_ptr(), M, N, K, group_size, torch.get_num_threads()):
        raise MemoryError(f"int4_gemm: no memory for a {M}x{K} activation scratch buffer")
    return y


# ---- W8A8 ----------------------------------------------------------------------------------------

def quantize_act(x: torch.Tensor, act_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [M, K] -> (codes fp32 [M, K] in -127..127, scale fp32 [M, 1]) as `w8a8_gemm` rounds them.

    act_scale None: per-row absmax / 127 (1 for an all-zero row); a float: that scale for every row.
    codes = clamp(round_half_even(x / scale), -127, 127).
    """
    x = x.float()
    if act_scale is None:
        amax = x.abs().amax(dim=1, keepdim=True)  # [M, 1]
        s = torch.where(amax > 0, amax / torch.tensor(127.0), torch.ones_like(amax))
    else:
        if not act_scale > 0:
            raise ValueError(f"act_scale: must be a positive float or None (dynamic), got {act_scale}")
        s = torch.full((x.shape[0], 1), float(act_scale), dtype=torch.float32)
    return torch.clamp(torch.round(x / s), -127, 127), s


def fake_quant_act(x: torch.Tensor, act_scale: float | None) -> torch.Tensor:
    """The activations `w8a8_gemm` actually multiplies, de-quantized: codes * scale, fp32 [M, K]."""
    codes, s = quantize_act(x, act_scale)
    return codes * s


def _w8a8_fallback(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor,
                   act_scale: float | None) -> torch.Tensor:
    # Integer codes in fp32: every product and partial sum is an integer below 2^24 (for K <= 1040, and
    # in practice well beyond), so the BLAS sum equals the native int32 sum and the results match.
    codes, s = quantize_act(x, act_scale)
    return (F.linear(codes, w.float()) * s) * wscale.float()


def w8a8_gemm(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor,
              act_scale: float | None) -> torch.Tensor:
    """y[m, n] = s_m * wscale[n] * sum_k codes[m, k] * w[n, k] for x fp32 [M, K], w int8 [N, K] -> [M, N].

    codes, s_m as `quantize_act`: act_scale None = dynamic per-token scale, a float = static per-tensor.
    Native (int32 accumulation) for M <= W8A8_MAX_NATIVE_ROWS; otherwise the same numerics via BLAS.
    """
    M, K = x.shape
    N = w.shape[0]
    if w.dtype != torch.int8 or w.shape != (N, K) or wscale.shape != (N,):
        raise ValueError(f"w8a8_gemm: need w int8 [N, {K}] and wscale [N], got w {w.dtype} "
                         f"{tuple(w.shape)}, wscale {tuple(wscale.shape)}")
    if act_scale is not None and not act_scale > 0:
        raise ValueError(f"act_scale: must be a positive float or None (dynamic), got {act_scale}")
    if torch.compiler.is_compiling():
        return torch.ops.costopt.w8a8_gemm(x, w, wscale, act_scale)
    return _w8a8_gemm(x, w, wscale, act_scale)


@torch.library.custom_op("costopt::w8a8_gemm", mutates_args=())
def _w8a8_gemm_op(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor,
                  act_scale: float | None) -> torch.Tensor:
    return _w8a8_gemm(x, w, wscale, act_scale)


@_w8a8_gemm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, act_scale: float | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])  # [M, N]


def _w8a8_gemm(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, act_scale: float | None) -> torch.Tensor:
    """w8a8_gemm after validation."""
    M, K = x.shape
    N = w.shape[0]
    lib = _native_for("w8a8_gemm", x, W8A8_MAX_NATIVE_ROWS) if K <= W8A8_MAX_K else None
    if lib is None:
        return _w8a8_fallback(x, w, wscale, act_scale).to(x.dtype)
    x, w, wscale = x.contiguous(), w.contiguous(), _fp32(wscale)
    y = x.new_empty(M, N)
    if lib.costopt_w8a8_gemm(x.data_ptr(), w.data_ptr(), wscale.data_ptr(),
                             0.0 if act_scale is None else float(act_scale), y.data_ptr(),
                             M, N, K, torch.get_num_threads()):
        raise MemoryError(f"w8a8_gemm: no memory for a {M}x{K} activation scratch buffer")
    return y

