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


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_kernels_equal_their_eager_reference(bf16, weights):
    """The compiled, graphed INT8 (fused reduction) and INT4 (tinygemm) paths against the same codes
    de-quantized eagerly: teacher-forced top-1 and greedy tokens."""
    fast = engine(bf16, "bf16", weights=weights)
    assert not fast.int4_notes, f"every INT4 projection should take tinygemm: {fast.int4_notes}"
    ref = engine(bf16, "bf16", weights=weights, graphs=False, compile=False, int4_kernel="dequant")
    ps, params = prompts(4, 5), SamplingParams(max_new_tokens=STEPS)
    a, b = generate_all(fast, ps, params), generate_all(ref, ps, params)
    assert sum(x == y for x, y in zip(a, b)) >= 3, (a, b)
    p = ps[0] + a[0]
    top1 = (fast.prompt_logits(p).argmax(-1) == ref.prompt_logits(p).argmax(-1)).float().mean()
    assert top1 >= 0.95
