"""The CUDA engine (`costopt.runtimes.cuda`) on CPU: its arithmetic, buckets, weight formats, configs and
registry entry. CUDA graphs and GPU kernels cannot run here; `python -m tasks.gpubench` checks them on
the GPU (graphed step == the same step without graphs) and measures speed."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from costopt.kernels import gpu_linear as G
from costopt.runtimes.cuda import CudaEngine, CudaOptions, CudaScorer, available
from costopt.runtimes.engine import Engine
from costopt.runtimes.slots import SamplingParams, StepEvent

GREEDY = SamplingParams(max_new_tokens=10)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")


def tiny(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    """fp32, 2 layers, GQA (4 heads over 2 KV heads), a wide init so greedy tokens are far from ties."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def cpu_engine(model, max_batch=4, max_len=64, **options) -> CudaEngine:
    opts = {"dtype": "fp32", "len_bucket": 8, **options}
    return CudaEngine(model, eos_token_ids=[], max_batch=max_batch, max_len=max_len, device="cpu",
                      options=CudaOptions(**opts))


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def drive(engine, arrivals, cancels=None):
    """Admit arrivals[k] (seq_id, prompt, params) before step k while slots are free; cancel cancels[k]."""
    tokens, reasons, queue, cancels = {}, {}, [], cancels or {}
    for step in range(300):
        for seq_id in cancels.get(step, []):
            engine.cancel(seq_id)
        queue += arrivals.get(step, [])
        while queue and engine.running < engine.max_batch:
            seq_id, prompt, params = queue.pop(0)
            engine.add(seq_id, prompt, params)
            tokens[seq_id] = []
        if not engine.has_work() and not queue and step > max([*arrivals, *cancels]):
            return tokens, reasons
        for ev in engine.step():
            if ev.token_id is not None:
                tokens[ev.seq_id].append(ev.token_id)
            if ev.finish_reason:
                reasons[ev.seq_id] = ev.finish_reason
    raise AssertionError("engine still busy after 300 steps")


PROMPTS = {f"s{i}": [(7 * i + 3 * j + 1) % 256 for j in range(1 + (5 * i) % 13)] for i in range(7)}
LENGTHS = {f"s{i}": 3 + (4 * i) % 9 for i in range(7)}
ARRIVE = {0: ["s0", "s1"], 1: ["s2"], 3: ["s3", "s4"], 6: ["s5"], 9: ["s6"]}


def staggered():
    return {k: [(s, PROMPTS[s], SamplingParams(max_new_tokens=LENGTHS[s])) for s in ids] for k, ids in ARRIVE.items()}


def test_greedy_tokens_equal_hf_generate_and_the_torch_engine_as_sequences_join_and_leave(model):
    ours, reasons = drive(cpu_engine(model, max_batch=3), staggered())
    torch_engine, _ = drive(Engine(model, eos_token_ids=[], max_batch=3, max_len=64), staggered())
    for s, prompt in PROMPTS.items():
        want = hf_greedy(model, prompt, LENGTHS[s])
        assert ours[s] == want, f"{s} ({len(prompt)}-token prompt): CUDA engine {ours[s]} != HF generate {want}"
        assert torch_engine[s] == want, f"{s}: the torch engine disagrees with HF generate"
        assert reasons[s] == "length", f"{s} finished with {reasons[s]!r}"


def test_bucket_padding_and_length_buckets_do_not_change_the_results(model):
    """Rows padded up to a bucket, and masks over longer attended lengths, leave the real rows' tokens and
    log-probs as they were; rows leaving mid-run move the step through smaller buckets."""
    prompts = [(PROMPTS["s3"], 2), (PROMPTS["s1"], 4), (PROMPTS["s5"], 6)]

    def run(**opts):
        engine = cpu_engine(model, max_batch=3, **opts)
        for i, (p, n) in enumerate(prompts):
            engine.add(i, p, SamplingParams(max_new_tokens=n, logprobs=3))
        events = []
        while engine.has_work():
            events += engine.step()
        return engine, events

    fitted, want = run()
    assert {b for b, _ in fitted.graph_seconds} == {4, 2, 1}, f"buckets used: {sorted(fitted.graph_seconds)}"
    assert {s for _, s in fitted.graph_seconds} == {16, 32}, "the attended length crossed a bucket"
    for opts in ({"buckets": (8,)}, {"len_bucket": 64}):
        engine, got = run(**opts)
        assert [(e.seq_id, e.token_id) for e in got] == [(e.seq_id, e.token_id) for e in want], f"{opts}: tokens"
        for a, b in zip(got, want):
            assert abs(a.logprobs.logprob - b.logprobs.logprob) < 1e-5, f"{opts}: log-probs moved with the padding"
    assert engine.len_buckets == (64,) and cpu_engine(model, max_batch=3, buckets=(8,)).batch_buckets == (8,)


def test_padded_rows_write_only_the_scratch_slot(model):
    engine = cpu_engine(model, max_batch=3, buckets=(4,))
    for i, p in enumerate([PROMPTS["s2"], PROMPTS["s4"]]):
        engine.add(i, p, GREEDY)
    engine.step()
    engine.pause(1)  # a paused sequence sits in the top slot (max_batch - 1 = 2), inside the padded bucket of 4
    before = engine.kv[:, :, 2].clone()
    engine.step(), engine.step()  # 1 row padded to 4: rows 1..3 are padding
    assert engine.scratch == 4 and torch.equal(engine.kv[:, :, 2], before), "padding rows wrote into a live slot"


def test_pause_resume_and_cancel_keep_every_sequence_exact(model):
    engine = cpu_engine(model, max_batch=4)
    for name in "abc":
        engine.add(name, PROMPTS[f"s{'abc'.index(name) + 2}"], SamplingParams(max_new_tokens=8))
    got = {n: [] for n in "abcd"}

    def step():
        for ev in engine.step():
            if ev.token_id is not None:
                got[ev.seq_id].append(ev.token_id)

    step(), step()
    engine.pause("a"), engine.pause("c")
    engine.add("d", PROMPTS["s6"], SamplingParams(max_new_tokens=3))
    step(), step()
    engine.cancel("c")
    engine.resume("a")
    events = engine.step()
    assert StepEvent("c", None, "cancelled") in events, f"the cancel was not reported: {events}"
    for ev in events:
        if ev.token_id is not None:
            got[ev.seq_id].append(ev.token_id)
    while engine.has_work():
        step()
    for name, prompt_key in (("a", "s2"), ("b", "s3"), ("d", "s6")):
        want = hf_greedy(model, PROMPTS[prompt_key], len(got[name]))
        assert got[name] == want, f"{name}: {got[name]} != HF's {want} after pause/resume/cancel"
    assert len(got["a"]) == 8 and len(got["c"]) == 2, f"lengths {({k: len(v) for k, v in got.items()})}"


@pytest.mark.parametrize("weights", ["none", "int4"])
def test_the_compiled_step_equals_eager_and_compiles_each_region_once(weights):
    """torch.compile (Inductor, CPU here) of the layer and head regions, fullgraph (a graph break fails):
    one layer graph serves every layer, batch >= 2 shares one graph; tokens equal the eager step's. INT4
    takes the fused de-quantize-and-reduce path there (at most gemv_rows rows)."""
    from torch._dynamo.utils import counters

    deep = tiny(seed=3)
    deep.model.layers.append(tiny(seed=4).model.layers[0])  # 3 layers: a per-layer recompile would show
    deep.config.num_hidden_layers = 3
    eager, _ = drive(cpu_engine(deep, max_batch=3, weights=weights), staggered())
    before = counters["stats"]["unique_graphs"]
    compiled_engine = cpu_engine(deep, max_batch=3, compile=True, weights=weights)
    compiled, _ = drive(compiled_engine, staggered())
    assert compiled == eager, "the compiled step chose other tokens than the eager one"
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs <= 4, f"{graphs} graphs compiled: expected the layer and the head for batch 1 and batch >= 2"
    assert compiled_engine.decode_steps > 0 and compiled_engine.graph_seconds, "no decode step went through a bucket"


def test_costopt_int8_and_int4_variants_run_their_own_codes(model):
    from costopt.quantization.schemes import preset, quantize

    for name in ("int8_weight_only", "int4_rtn_g64"):
        variant = quantize(tiny(), preset(name))
        ours, _ = drive(cpu_engine(variant, max_batch=3), staggered())
        theirs, _ = drive(Engine(variant, eos_token_ids=[], max_batch=3, max_len=64), staggered())
        assert ours == theirs, f"{name}: the CUDA engine's tokens differ from costopt's torch engine on the same codes"
    loaded = cpu_engine(model, weights="int8")
    scheme = cpu_engine(quantize(tiny(), preset("int8_weight_only")))
    for a, b in zip(loaded.layers[0].qkv[0].buffers(), scheme.layers[0].qkv[0].buffers()):
        assert torch.equal(a, b), "weights=int8 on load must give the int8_weight_only scheme's codes"


def test_int8_linear_equals_the_dequantized_matmul():
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(5, 64)
    q = G.quantize_int8(w)
    mod, _ = G.build_linear(q, torch.float32, torch.device("cpu"))
    want = x @ (q.data.float() * q.scale[:, None]).T
    assert torch.allclose(mod(x), want, atol=1e-4), "INT8: (x @ q.T) * scale != x @ dequantized.T"
    exact = x @ w.T
    assert (want - exact).abs().max() < 0.02 * exact.abs().max(), "the INT8 codes are far from the weight they quantize"


def test_int4_pack_round_trips_and_the_linear_equals_the_reference_dequantization():
    from costopt.kernels.ops import dequantize_int4, pack_int4

    torch.manual_seed(1)
    codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    assert torch.equal(G.pack_int4(codes), pack_int4(codes)), "not costopt's canonical nibble order"
    assert torch.equal(G.unpack_int4(G.pack_int4(codes)), codes), "pack/unpack does not round-trip"
    w, x = torch.randn(32, 128), torch.randn(3, 128)
    q = G.quantize_int4(w, 64)
    q.inv = torch.rand(128) + 0.5  # AWQ's activation scaling rides along
    mod, why = G.build_linear(q, torch.float32, torch.device("cpu"))
    assert mod.kernel == "dequant" and why is None, "on CPU the reference path is the INT4 path, not a fallback"
    w_hat = dequantize_int4(pack_int4(q.data), q.scale, q.zero, 64)
    assert torch.allclose(mod(x), (x * q.inv) @ w_hat.T, atol=1e-4), "INT4 linear != reference de-quantization"


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm here")
def test_tinygemm_scale_and_zero_convention_on_torchs_cpu_kernel():
    """The CUDA op cannot run here; its CPU twin takes the same [G, N, 2] scales-and-zeros, so this checks
    our (scale, zero) -> tinygemm conversion (a wrong zero convention would shift every output)."""
    torch.manual_seed(2)
    q = G.quantize_int4(torch.randn(16, 128), 32)
    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.data.int(), 1)
    x = torch.randn(3, 128).bfloat16()
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiles, 32, G.tinygemm_scales_and_zeros(q.scale, q.zero))
    want = x.float() @ G.Int4WeightLinear(q, "dequant", 8).dequantize().T
    assert (got.float() - want).abs().max() / want.abs().max() < 0.02, "tinygemm's scale/zero layout is wrong"


def test_fusion_keeps_apart_what_cannot_share_a_weight():
    torch.manual_seed(3)
    a, b = G.quantize_int4(torch.randn(8, 64), 32), G.quantize_int4(torch.randn(8, 64), 32)
    assert G.concat([a, b]).data.shape == (16, 64), "same format: one fused weight"
    b.inv = torch.full((64,), 2.0)
    assert G.concat([a, b]) is None, "different activation scaling cannot share one GEMM"


@pytest.mark.parametrize("options,field", [
    ({"dtype": "fp8"}, "dtype"), ({"weights": "int3"}, "weights"), ({"buckets": (4, 2)}, "buckets"),
    ({"buckets": ()}, "buckets"), ({"group_size": 33}, "group_size"), ({"len_bucket": 0}, "len_bucket"),
    ({"int4_kernel": "marlin"}, "int4_kernel"), ({"graphs": True}, "graphs"), ({"buckets": (1, 2)}, "max_batch"),
    ({"weights": "int4", "group_size": 48}, "group_size")])
def test_bad_settings_raise_errors_that_name_the_field(model, options, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        cpu_engine(model, max_batch=4, **options)


def test_bad_limits_and_models_name_the_field(model):
    with pytest.raises(ValueError, match="^max_len:"):
        cpu_engine(model, max_len=1000)
    with pytest.raises(ValueError, match="weights: 'int8', but model.layers.0.self_attn.q_proj is already"):
        from costopt.quantization.schemes import preset, quantize
        cpu_engine(quantize(tiny(), preset("int8_weight_only")), weights="int8")
    with pytest.raises(TypeError, match="W8A8Linear.*torch runtime"):
        from costopt.quantization.schemes import preset, quantize
        cpu_engine(quantize(tiny(), preset("int8_dynamic")))


@NO_CUDA
def test_without_cuda_it_says_why_and_never_falls_back_to_cpu(model):
    assert "no CUDA device" in (available() or ""), available()
    with pytest.raises(RuntimeError, match="^device: cuda: no CUDA device"):
        CudaEngine(model, eos_token_ids=[], max_batch=2, max_len=32, device="cuda")


def test_sampling_follows_the_requests_generator_and_logprobs_come_back(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, logprobs=2)
    alone, _ = drive(cpu_engine(model), {0: [("x", PROMPTS["s4"], params)]})
    mates, _ = drive(cpu_engine(model), {0: [("y", PROMPTS["s2"], GREEDY), ("x", PROMPTS["s4"], params)]})
    assert alone["x"] == mates["x"], "a seeded sample changed with its batch mates"
    engine = cpu_engine(model)
    engine.add("g", PROMPTS["s3"], SamplingParams(max_new_tokens=1, logprobs=2))
    (ev,) = engine.step()
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([PROMPTS["s3"]])).logits[0, -1], -1)
    assert ev.logprobs is not None and abs(ev.logprobs.logprob - float(lp[ev.token_id])) < 1e-4, ev.logprobs
    assert len(ev.logprobs.top) == 2 and ev.logprobs.top[0][0] == ev.token_id, "greedy's token is the top one"


def test_the_scorer_gives_the_models_logits_on_a_padded_batch(model):
    scorer = CudaScorer(model, device="cpu", options=CudaOptions(dtype="fp32"), max_len=64)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = scorer(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[0], want[0], atol=1e-4) and torch.allclose(got[1, :3], want[1, :3], atol=1e-4), \
        "teacher-forced logits differ from the model's own"
    assert got[1, 3:].abs().sum() == 0, "padding positions must carry no logits"


def test_the_registry_knows_cuda_and_checks_its_fields():
    from costopt.runtimes import registry

    rt = registry.get("cuda")
    definition = registry.variant_definition({"runtime": "cuda", "scheme": "int4_weight_only", "group_size": 32,
                                              "buckets": [1, 8]})
    assert definition.scheme == {"scheme": "int4_weight_only", "group_size": 32}, "group_size is the scheme's"
    assert definition.runtime_config.buckets == (1, 8) and rt.name == "cuda"
    assert not any(p.get("runtime") == "cuda" for p in registry.presets().values()), \
        "no cuda preset: the DAG form lists every preset by hand"
    from costopt.params import QuantizeParams

    documented = {"cuda_bf16": {"runtime": "cuda", "scheme": "bf16"},  # cuda_runtime's docstring
                  "cuda_int8": {"runtime": "cuda", "scheme": "int8_weight_only"},
                  "cuda_int4_gptq_g64": {"runtime": "cuda", "scheme": "int4_weight_only", "method": "gptq",
                                         "group_size": 64}}
    QuantizeParams(variants=tuple(documented), definitions=documented).check("quantize")
    for bad, needle in (({"buckets": [8, 1]}, "cuda.buckets"), ({"dtype": "int8"}, "cuda.dtype"),
                        ({"load_group_size": 5}, "cuda.load_group_size"), ({"compile": "on"}, "cuda.compile")):
        with pytest.raises(registry.RuntimeConfigError, match=needle):
            registry.variant_definition({"runtime": "cuda", "scheme": "bf16", **bad})


@NO_CUDA
def test_a_cuda_candidate_is_ruled_out_here_with_the_reason_and_the_run_goes_on(tmp_path):
    """No GPU: the benchmark phase records 'cuda: no CUDA device ...' for the candidate, validate skips it,
    and the scorer entry point raises RuntimeUnavailable (nothing is loaded or half-measured)."""
    from costopt.models.variants import VariantSpec, read_failure
    from costopt.params import load_params
    from costopt.runtimes.registry import RuntimeUnavailable, load_scorer
    from costopt.storage.layout import Workspace
    from tasks.benchmark import benchmark_variant
    from tasks.validate import validate_variant

    ws = Workspace(tmp_path)
    spec = VariantSpec(name="cuda_int8", base_model="m", base_fingerprint="f", precision="int8",
                       transforms=[{"scheme": "int8_weight_only", "config": {}}],
                       artifact="artifacts/variants/cuda_int8", runtime={"name": "cuda", "config": {"version": 1}})
    spec.save(ws.variant_dir("cuda_int8"))
    params = load_params("params.yaml", profile="quick")
    out = benchmark_variant(params, ws, "cuda_int8")
    assert out["phase"] == "benchmark" and "cuda: no CUDA device" in out["reason"], out
    assert read_failure(ws, "cuda_int8") == out, "the reason is recorded for the later phases"
    assert "ruled out by benchmark" in validate_variant(params, ws, "cuda_int8")["skipped"]
    with pytest.raises(RuntimeUnavailable, match="no CUDA device"):
        load_scorer(ws, "cuda_int8")


def test_gpubench_smoke_runs_on_cpu_and_refuses_to_pretend_without_cuda(tmp_path):
    from tasks import gpubench

    assert gpubench.main(["--device", "cpu", "--out", str(tmp_path)]) == gpubench.NO_CUDA_EXIT, "cpu needs --quick"
    if not torch.cuda.is_available():
        assert gpubench.main(["--out", str(tmp_path)]) == gpubench.NO_CUDA_EXIT, "no CUDA: exit 2, nothing measured"
    assert gpubench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["format"].removesuffix(" compiled"): r for r in results["shapes"]["tiny"]["formats"]}
    assert set(rows) == {"fp32", "int8", "int4"}, rows.keys()
    assert rows["fp32"]["agreement_vs_hf_bf16"]["teacher_forced_top1"] == 1.0, "fp32 engine != HF on CPU"
    assert all(r["decode"]["1"]["tok_s"] > 0 and r["weight_bytes"] > 0 for r in rows.values()), rows
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["fp32"]["weight_bytes"], \
        "INT4 < INT8 < fp32 bytes per step"
    assert "RANDOM" in (tmp_path / "results.md").read_text(), "random weights must be labelled"
