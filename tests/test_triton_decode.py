"""The fused decode kernels (`costopt.kernels.triton_decode`) against plain torch, on every weight format.

They need Triton: on the GPU machine they run compiled on CUDA (`python3 -m pytest -m gpu`); anywhere
Triton is installed, `TRITON_INTERPRET=1` runs the same kernels on CPU tensors through Triton's
interpreter (fp32 activations: the interpreter has no bf16 scalars). Skipped where Triton is missing
(CI's environments have none), so these are marked `gpu`."""
from __future__ import annotations

import os

import pytest
import torch

from costopt.kernels import triton_decode as T
from costopt.kernels.gpu_linear import quantize_int4, quantize_int8, unpack_int4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(T.available() is not None, reason=str(T.available()))]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICE, DTYPE, TOL = "cuda", torch.bfloat16, 2e-2
elif INTERPRET:
    DEVICE, DTYPE, TOL = "cpu", torch.float32, 1e-4
else:
    pytestmark.append(pytest.mark.skip(reason="Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"))
    DEVICE, DTYPE, TOL = "cpu", torch.float32, 0.0


def weight(fmt: str, n: int, k: int, seed: int) -> tuple[T.KernelWeight, torch.Tensor]:
    """(the kernels' weight, its de-quantized fp32 [N, K] reference)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if fmt == "dense":
        kw = T.KernelWeight(T.DENSE, w.to(DEVICE, DTYPE).contiguous())
        return kw, kw.data.float().cpu()
    if fmt == "int8":
        q = quantize_int8(w)
        return (T.KernelWeight(T.INT8, q.data.to(DEVICE).contiguous(), q.scale.to(DEVICE).float()),
                q.data.float() * q.scale[:, None])
    q = quantize_int4(w, 32)
    packed = (q.data[:, 0::2] | (q.data[:, 1::2] << 4)).to(torch.uint8)
    assert torch.equal(unpack_int4(packed), q.data.to(torch.uint8))
    ref = ((q.data.float().view(n, -1, 32) - q.zero[..., None]) * q.scale[..., None]).view(n, k)
    return T.KernelWeight(T.INT4, packed.to(DEVICE).contiguous(), q.scale.to(DEVICE).float().contiguous(),
                          q.zero.to(DEVICE).float().contiguous(), 32), ref


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got.float().cpu() - want).abs().max() / want.abs().max())
    assert err <= TOL, err


def act(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_with_norm_and_residual(fmt, rows):
    w, ref = weight(fmt, 40, 96, seed=1)  # K not a multiple of the block: masked tails
    x, res, nw = act(rows, 96, 2), act(rows, 40, 3), act(1, 96, 4)[0]
    close(T.gemv(x, w), x.float().cpu() @ ref.T)
    close(T.gemv(x, w, residual=res), x.float().cpu() @ ref.T + res.float().cpu())
    close(T.gemv(x, w, norm=nw), rms(x.float().cpu(), nw.float().cpu()) @ ref.T)


@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
def test_gate_up(fmt):
    w, ref = weight(fmt, 2 * 48, 64, seed=5)
    x, nw = act(2, 64, 6), act(1, 64, 7)[0]
    y = rms(x.float().cpu(), nw.float().cpu()) @ ref.T
    close(T.gate_up(x, nw, 1e-5, w), torch.nn.functional.silu(y[:, :48]) * y[:, 48:])


@pytest.mark.parametrize("fmt", ["dense", "int4"])
def test_qkv_rope_writes_q_and_the_cache(fmt):
    n_q, n_kv, hd, k, slots, max_len = 4, 2, 16, 64, 5, 12
    w, ref = weight(fmt, (n_q + 2 * n_kv) * hd, k, seed=8)
    x, nw = act(2, k, 9), act(1, k, 10)[0]
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(max_len)[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    pos, slot = torch.tensor([3, 7]), torch.tensor([1, 4])
    kv = torch.zeros(2, slots, n_kv, max_len, hd, dtype=DTYPE, device=DEVICE)
    q = T.qkv_rope(x, nw, 1e-5, w, cos.to(DEVICE, DTYPE), sin.to(DEVICE, DTYPE), pos.to(DEVICE), slot.to(DEVICE),
                   kv, n_q, n_kv)
    y = rms(x.float().cpu(), nw.float().cpu()) @ ref.T
    qr, kr, vr = y.split([n_q * hd, n_kv * hd, n_kv * hd], -1)

    def rope(t, heads):
        t = t.view(2, heads, hd)
        c, s = cos[pos][:, None], sin[pos][:, None]
        return t * c + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * s

    close(q, rope(qr, n_q))
    for i in range(2):
        close(kv[0, slot[i], :, pos[i]], rope(kr, n_kv)[i])
        close(kv[1, slot[i], :, pos[i]], vr.view(2, n_kv, hd)[i])
    written = torch.zeros(slots, max_len, dtype=torch.bool)
    written[slot, pos] = True
    assert not kv.transpose(2, 3)[:, ~written.to(kv.device)].any(), "nothing but (slot, pos) is written"


def test_bad_input_is_named():
    w, _ = weight("dense", 8, 32, seed=11)
    with pytest.raises(ValueError, match="x: 9 rows"):
        T.gemv(act(9, 32, 1), w)
    with pytest.raises(ValueError, match="INT4 group 48"):
        T.KernelWeight(T.INT4, torch.zeros(4, 48, dtype=torch.uint8), group=48).check("o_proj")


@pytest.mark.parametrize("weights", ["none", "int8", "int4"])
def test_engine_on_the_fused_kernels_equals_its_eager_step(weights):
    """The CUDA engine's decode step on the fused kernels gives the greedy tokens of its eager step (same
    weights, same format), sequences joining a running batch included. fp32 activations on every device:
    in bf16 the fused kernels round once where the eager step rounds after every op, and on random
    weights that alone flipped one of five greedy sequences on the H100 (2026-12-05)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from costopt.runtimes.cuda import CudaEngine, CudaOptions
    from costopt.runtimes.slots import SamplingParams, generate_all

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE, torch.float32)
    make = lambda kernels: CudaEngine(  # noqa: E731
        model, eos_token_ids=[], max_batch=4, max_len=64, device=DEVICE,
        options=CudaOptions(dtype="fp32", weights=weights, len_bucket=16,
                            group_size=32, kernels=kernels, graphs=False, compile=False, int4_kernel="dequant"))
    fast, eager = make("triton"), make("compiled")
    assert fast.fused_rows == 4 and eager.fused_rows == 0
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7)]
    params = SamplingParams(max_new_tokens=8)
    a, b = generate_all(fast, prompts, params), generate_all(eager, prompts, params)
    assert sum(x == y for x, y in zip(a, b)) >= 4, (a, b)


@pytest.mark.parametrize("n_q,n_kv", [(4, 4), (6, 2)])
def test_attention_reads_each_rows_own_slot_up_to_its_position(n_q, n_kv):
    hd, slots, max_len = 16, 4, 80
    gen = torch.Generator().manual_seed(12)
    kv = torch.randn(2, slots, n_kv, max_len, hd, generator=gen).to(DEVICE, DTYPE)
    q = torch.randn(3, n_q, hd, generator=gen).to(DEVICE, DTYPE)
    pos = torch.tensor([0, 70, 33])
    got = T.attention(q, kv, pos.to(DEVICE), block=32)
    for i, p in enumerate(pos.tolist()):
        k, v = kv[0, i, :, :p + 1].float().cpu(), kv[1, i, :, :p + 1].float().cpu()  # [n_kv, S, hd]
        k, v = k.repeat_interleave(n_q // n_kv, 0), v.repeat_interleave(n_q // n_kv, 0)
        w = torch.softmax(q[i].float().cpu()[:, None, :] @ k.transpose(1, 2) / hd ** 0.5, -1)  # [n_q, 1, S]
        close(got[i].view(n_q, hd), (w @ v)[:, 0])
