"""The CUDA engine on a real GPU: graphs, compiled regions and the INT8/INT4 kernels against their eager
references. Marked `gpu` and skipped where no CUDA device is present (CI has none); run on the GPU machine
with `python3 -m pytest -m gpu tests/test_cuda_gpu.py` (BENCHMARKS.md section 15 gives the run and its result).

Random weights of a 4-layer SmolLM2-135M-shaped model (initializer std 0.2, so greedy tokens are far from
ties); what is checked is arithmetic, not quality."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")]

from costopt.runtimes.cuda import CudaEngine, CudaOptions  # noqa: E402
from costopt.runtimes.slots import SamplingParams, generate_all  # noqa: E402

STEPS = 24


def model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.2, rope_theta=100000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def engine(m, dtype: str, **options) -> CudaEngine:
    return CudaEngine(m, eos_token_ids=[], max_batch=8, max_len=256, device="cuda",
                      options=CudaOptions(dtype=dtype, len_bucket=64, **options))


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def bf16():
    return model(torch.bfloat16)


@pytest.fixture(scope="module")
def fp32():
    return model(torch.float32)


@pytest.mark.parametrize("kernels", ["triton", "compiled"])
def test_graphed_step_equals_the_same_step_launched_without_graphs(bf16, kernels):
    ps, params = prompts(5, 1), SamplingParams(max_new_tokens=STEPS)
    graphed = engine(bf16, "bf16", kernels=kernels)
    assert graphed.graphs and graphed.fused_rows == (8 if kernels == "triton" else 0)
    out = generate_all(graphed, ps, params)
    assert graphed.decode_steps > 0 and graphed.graph_seconds, "the decode steps ran through captured graphs"
    assert out == generate_all(engine(bf16, "bf16", graphs=False, kernels=kernels), ps, params)


@pytest.mark.parametrize("kernels", ["triton", "compiled"])
def test_graphed_fast_step_equals_the_eager_step_in_fp32(fp32, kernels):
    ps, params = prompts(5, 2), SamplingParams(max_new_tokens=STEPS)
    fast = generate_all(engine(fp32, "fp32", kernels=kernels), ps, params)
    eager = generate_all(engine(fp32, "fp32", graphs=False, compile=False, kernels="compiled"), ps, params)
    assert fast == eager


def test_engine_greedy_equals_hf_generate(fp32):
    ps = prompts(3, 3)
    ours = generate_all(engine(fp32, "fp32"), ps, SamplingParams(max_new_tokens=STEPS))
    for p, got in zip(ps, ours):
        ids = torch.tensor([p], device="cuda")
        with torch.inference_mode():
            want = fp32.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == want


def test_continuous_batching_gives_each_sequence_its_solo_tokens(fp32):
    """Sequences joining and leaving a running batch (other buckets, padding rows) get the tokens they get alone."""
    eng, ps = engine(fp32, "fp32"), prompts(6, 4)
    lengths = [5, 30, 12, 24, 8, 17]
    solo = [generate_all(eng, [p], SamplingParams(max_new_tokens=n))[0] for p, n in zip(ps, lengths)]
    got: dict[int, list[int]] = {i: [] for i in range(len(ps))}
    pending = list(range(len(ps)))
    for step in range(200):
        if pending and step % 3 == 0:  # one newcomer every third step, into a running batch
            i = pending.pop(0)
            eng.add(i, ps[i], SamplingParams(max_new_tokens=lengths[i]))
        for event in eng.step():
            if event.token_id is not None:
                got[event.seq_id].append(event.token_id)
        if not pending and not eng.has_work():
            break
    assert [got[i] for i in range(len(ps))] == solo


def _greedy_agree(fast: CudaEngine, ref: CudaEngine, seed: int) -> None:
    ps, params = prompts(4, seed), SamplingParams(max_new_tokens=STEPS)
    a, b = generate_all(fast, ps, params), generate_all(ref, ps, params)
    assert sum(x == y for x, y in zip(a, b)) >= 3, (a, b)


@pytest.mark.parametrize("weights,kernels", [("int8", "triton"), ("int8", "compiled"), ("int4", "triton"),
                                             ("int4", "compiled")])
def test_quantized_paths_equal_their_eager_reference(fp32, weights, kernels):
    """The graphed INT8 / INT4 decode paths (fused Triton kernels, or compiled regions de-quantizing inside
    the reduction) against the same codes and scales de-quantized eagerly: greedy tokens, in fp32. (In bf16
    any two summation orders part on random weights within 24 tokens: on the H100 (2026-12-05) 0 of 4
    greedy sequences stayed equal for every path, the graphed bf16 step against itself excepted.)"""
    fast = engine(fp32, "fp32", weights=weights, kernels=kernels, int4_kernel="dequant")
    assert fast.fused_rows == (8 if kernels == "triton" else 0)
    _greedy_agree(fast, engine(fp32, "fp32", weights=weights, graphs=False, compile=False, kernels="compiled",
                               int4_kernel="dequant"), seed=5)


def test_tinygemm_equals_the_reference_with_its_rounded_scales(bf16):
    """tinygemm (bf16 only) keeps each group's scale and offset in bf16 (`tinygemm_scales_and_zeros`), so its
    weights differ from the fp32-scaled reference by that rounding. Against a reference holding the same
    rounded scales and offsets, teacher-forced top-1 along four prompts and their answers must agree (a
    packing or zero-point mistake leaves almost nothing in common)."""
    from costopt.kernels.gpu_linear import Int4WeightLinear, tinygemm_scales_and_zeros

    fast = engine(bf16, "bf16", weights="int4", kernels="compiled", int4_kernel="tinygemm")
    assert not fast.int4_notes, f"every INT4 projection should take tinygemm: {fast.int4_notes}"
    ref = engine(bf16, "bf16", weights="int4", graphs=False, compile=False, kernels="compiled", int4_kernel="dequant")
    rounded = 0
    with torch.inference_mode():  # the engine's buffers are inference tensors
        for layer in ref.layers:
            for mod in [*layer.qkv, layer.o, *layer.gate_up, layer.down]:
                if isinstance(mod, Int4WeightLinear):  # w = (q - 8) s' + z' with s', z' as tinygemm stores them
                    s, z = tinygemm_scales_and_zeros(mod.scale, mod.zero).float().transpose(0, 1).unbind(-1)
                    mod.zero.copy_(8.0 - z / s)
                    mod.scale.copy_(s)
                    rounded += 1
    assert rounded >= 4 * 4  # every INT4 projection of the 4 layers
    ps = prompts(4, 5)
    answers = generate_all(ref, ps, SamplingParams(max_new_tokens=STEPS))
    same = [(fast.prompt_logits(p + a).argmax(-1) == ref.prompt_logits(p + a).argmax(-1)).float().mean().item()
            for p, a in zip(ps, answers)]
    assert min(same) >= 0.9, same
