"""INT4 and W8A8 CPU kernels: the canonical INT4 format, results against independent references, and
the native paths agreeing with their de-quantize + BLAS fallbacks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from costopt.kernels import ops as kernels
from costopt.kernels.ops import (dequantize_int4, fake_quant_act, int4_gemm, native_available, native_failure,
                             pack_int4, unpack_int4, w8a8_gemm)

ROOT = Path(__file__).resolve().parents[1]


def int4_operands(N: int, K: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scale = torch.rand(N, K // g, generator=gen) * 0.05 + 0.01
    zero = torch.rand(N, K // g, generator=gen) * 15  # float zero points, as RTN/GPTQ produce
    return q, scale, zero


def int4_reference(x, q, scale, zero, g):
    """fp64 x @ w.T with w from the format's definition, and the fp32 error scale of each output."""
    s, z = scale.repeat_interleave(g, 1).double(), zero.repeat_interleave(g, 1).double()
    w = (q.double() - z) * s
    # The kernel sums q*x and zero*sum(x) separately, so its rounding error scales with the terms' size
    # |x| @ (15 + zero) * s. Tests allow 1e-6 of it: measured errors stay below 1e-7, while one wrong
    # code among K=384 already moves an output by 2e-5 of it.
    return x.double() @ w.T, x.abs().double() @ ((15 + z) * s).T


def test_pack_int4_is_the_canonical_layout():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]], "k=2j in the low nibble, k=2j+1 in the high"


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (37, 192), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 96), "two codes per byte"
    assert torch.equal(unpack_int4(packed), q), "unpack(pack(q)) must give q back"
    assert torch.equal(pack_int4(q.to(torch.int32)), packed), "any integer dtype packs the same"


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 7, dtype=torch.uint8), "even K"),
    (torch.full((2, 4), 16, dtype=torch.int32), "0..15"),
    (torch.full((2, 4), -1, dtype=torch.int32), "0..15"),
    (torch.zeros(2, 4), "integer"),
])
def test_pack_int4_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(bad)


def test_int4_shape_errors_are_named():
    q, scale, zero = int4_operands(8, 64, 32)
    with pytest.raises(ValueError, match="group_size"):
        int4_gemm(torch.randn(1, 64), pack_int4(q), scale, zero, 24)
    with pytest.raises(ValueError, match="scale"):
        int4_gemm(torch.randn(1, 64), pack_int4(q), scale[:, :1], zero, 32)
    with pytest.raises(ValueError, match="packed"):
        int4_gemm(torch.randn(1, 128), pack_int4(q), scale, zero, 32)


def test_dequantize_int4_follows_the_definition():
    q, scale, zero = int4_operands(5, 64, 32)
    w = dequantize_int4(pack_int4(q), scale, zero, 32)
    n, k = 3, 41
    expected = (q[n, k].float() - zero[n, k // 32]) * scale[n, k // 32]
    assert torch.allclose(w[n, k], expected), "w[n, k] = (q[n, k] - zero[n, k//g]) * scale[n, k//g]"


# K=192 with g=32/64 is not a multiple of 128; g=96 runs the kernel with a run-time group size; g=6 is
# not a multiple of 16 and takes the fallback; N odd exercises the kernel's unpaired last row.
@pytest.mark.parametrize("K, g", [(384, 32), (384, 64), (384, 128), (192, 32), (192, 64), (192, 96), (36, 6)])
@pytest.mark.parametrize("M", [1, 3, 8, 17, 48, 64])
def test_int4_gemm_matches_reference(M, K, g):
    q, scale, zero = int4_operands(37, K, g, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K + g))
    ref, size = int4_reference(x, q, scale, zero, g)
    got = int4_gemm(x, pack_int4(q), scale, zero, g)
    assert got.shape == (M, 37) and got.dtype == torch.float32, f"shape/dtype {got.shape} {got.dtype}"
    err = ((got.double() - ref).abs() / size).max().item()
    assert err < 1e-6, f"M={M} K={K} g={g}: error {err:.2e} of the terms' size"


def test_int4_native_rows_agree_with_fallback_rows():
    limit = kernels.INT4_MAX_NATIVE_ROWS
    q, scale, zero = int4_operands(64, 192, 32)
    packed = pack_int4(q)
    x = torch.randn(limit + 5, 192)
    fallback = int4_gemm(x, packed, scale, zero, 32)  # above the crossover: de-quantize + F.linear
    native = torch.cat([int4_gemm(part, packed, scale, zero, 32) for part in x.split(limit)])
    _, size = int4_reference(x, q, scale, zero, 32)
    err = ((native - fallback).abs().double() / size).max().item()
    assert err < 1e-6, f"native and fallback differ by {err:.2e} of the terms' size"


def w8a8_reference(x, w, wscale, act_scale):
    """Independent fp64 reference of the W8A8 semantics."""
    if act_scale is None:
        s = x.abs().amax(dim=1, keepdim=True) / 127
    else:
        s = torch.full((x.shape[0], 1), act_scale)
    codes = torch.clamp(torch.round(x / s), -127, 127)
    return (codes.double() @ w.double().T) * s.double() * wscale.double()


@pytest.mark.parametrize("act_scale", [None, 0.02])
@pytest.mark.parametrize("M, K", [(1, 576), (3, 100), (8, 576), (17, 1536), (48, 64)])
def test_w8a8_gemm_matches_reference(M, K, act_scale):
    gen = torch.Generator().manual_seed(M * K)
    w = torch.randint(-127, 128, (37, K), generator=gen, dtype=torch.int8)
    wscale = torch.rand(37, generator=gen) * 1e-2
    x = torch.randn(M, K, generator=gen) * 2  # static 0.02: |x| > 127 * 0.02 gets clamped
    got = w8a8_gemm(x, w, wscale, act_scale)
    ref = w8a8_reference(x, w, wscale, act_scale)
    # Same codes and an exact integer sum; only the two final fp32 multiplies round (<= 2 ulps).
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-9), \
        f"M={M} K={K} act_scale={act_scale}: max err {(got.double() - ref).abs().max():.3g}"


def test_fake_quant_act_reproduces_w8a8():
    w = torch.randint(-127, 128, (40, 256), dtype=torch.int8)
    wscale = torch.rand(40) * 1e-2
    wf = w.float() * wscale[:, None]
    x = torch.randn(5, 256)
    for act_scale in (None, 0.01):
        fq = fake_quant_act(x, act_scale)
        emulated = torch.nn.functional.linear(fq, wf)
        size = fq.abs() @ wf.abs().T  # fp32 GEMM error scales with this; one code off moves ~4e-5 of it
        err = ((w8a8_gemm(x, w, wscale, act_scale) - emulated).abs() / size).max().item()
        assert err < 1e-6, f"act_scale={act_scale}: fake-quant emulation differs by {err:.2e} of the terms"
    codes = fake_quant_act(x, 0.01) / 0.01
    assert codes.abs().max() <= 127 + 1e-3, "static codes are clamped to [-127, 127]"


def test_w8a8_zero_row_and_bad_scale():
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    y = w8a8_gemm(torch.zeros(2, 32), w, torch.ones(8), None)
    assert torch.equal(y, torch.zeros(2, 8)), "an all-zero row gives zeros, not NaN"
    with pytest.raises(ValueError, match="act_scale"):
        w8a8_gemm(torch.randn(1, 32), w, torch.ones(8), 0.0)


def test_w8a8_native_equals_fallback_exactly():
    limit = kernels.W8A8_MAX_NATIVE_ROWS
    w = torch.randint(-127, 128, (50, 576), dtype=torch.int8)
    wscale = torch.rand(50) * 1e-2
    x = torch.randn(limit + 3, 576)
    for act_scale in (None, 0.03):
        fallback = w8a8_gemm(x, w, wscale, act_scale)  # above the crossover
        native = torch.cat([w8a8_gemm(part, w, wscale, act_scale) for part in x.split(limit)])
        # Integer codes summed in fp32 stay exact below 2^24 (K * 127^2 < 2^24 for K <= 1040).
        assert torch.equal(native, fallback), f"act_scale={act_scale}: native and fallback must agree exactly"


def test_native_kernels_build_here():
    assert native_available(), f"the AVX2 kernels must compile on the reference machine: {native_failure()}"
    assert native_failure() is None, "no failure is reported when every kernel built"


def test_disabled_native_falls_back_with_same_results(tmp_path):
    """COSTOPT_DISABLE_NATIVE=1 in a fresh process: every kernel reports why, and results still match."""
    q, scale, zero = int4_operands(33, 192, 64)
    w8 = torch.randint(-127, 128, (33, 192), dtype=torch.int8)
    x = torch.randn(2, 192)
    torch.save({"q": q, "scale": scale, "zero": zero, "w8": w8, "x": x}, tmp_path / "in.pt")
    code = (
        "import sys, torch; from costopt.kernels import ops as k; d = torch.load(sys.argv[1]);"
        "assert not k.native_available() and 'COSTOPT_DISABLE_NATIVE' in k.native_failure('int4_gemm');"
        "torch.save({'int4': k.int4_gemm(d['x'], k.pack_int4(d['q']), d['scale'], d['zero'], 64),"
        " 'deq': k.dequantize_int4(k.pack_int4(d['q']), d['scale'], d['zero'], 64),"
        " 'w8a8': k.w8a8_gemm(d['x'], d['w8'], torch.ones(33), None)}, sys.argv[2])")
    env = {**os.environ, "COSTOPT_DISABLE_NATIVE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"fallback process failed: {proc.stderr[-800:]}"
    out = torch.load(tmp_path / "out.pt")
    _, size = int4_reference(x, q, scale, zero, 64)
    native4 = int4_gemm(x, pack_int4(q), scale, zero, 64)
    assert ((out["int4"] - native4).abs().double() / size).max() < 1e-6, "INT4 fallback differs from native"
    w8a8_native = w8a8_gemm(x, w8, torch.ones(33), None)
    assert torch.equal(out["w8a8"], w8a8_native), "W8A8 fallback differs from native"
    assert torch.equal(out["deq"], dequantize_int4(pack_int4(q), scale, zero, 64)), \
        "native de-quantization must equal the torch expression bit for bit"
