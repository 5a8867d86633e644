"""GPU benchmark of the CUDA engine (`costopt.runtimes.cuda`) on random-weight SmolLM2-shaped models.

Run it from the repository root on the GPU machine as
`PYTHONPATH=. python3 -m tasks.gpubench --out DIR [--shapes 1.7b,135m,360m] [--quick] [--budget-s 390]`.
It needs only torch (with CUDA), transformers and costopt's `runtimes.cuda`/`runtimes.slots` (no
kserve, no Airflow, no network), and writes DIR/results.json and DIR/results.md after every unit, so a
run cut short keeps what it measured. Without a CUDA device it exits with code 2, except
`--device cpu --quick`, a smoke test of the same code path on a tiny model (fp32, eager).

Measured in one process, per shape (SmolLM2-135M, -360M, -1.7B configs; RANDOM weights, initializer
std 0.2 so greedy tokens are not near-ties; speed does not depend on the values), for bf16, INT8 and
INT4 (g=64) weight-only:
- decode tok/s at batch 1, 8 and 64 (prompts of 32 tokens, 64 steps, median of 5, CUDA events around
  the engine's own `step()`, host bookkeeping included) and the GPU time of one graph replay;
- prefill tok/s of one 512-token prompt; model FLOPs utilization (2 x multiplied weights x tok/s over
  the card's dense bf16 peak from NVIDIA's datasheet, or --peak-tflops; attention FLOPs left out);
- the share of the HBM roofline at batch 1: (weight bytes + K/V bytes read per step) / step time,
  over the device-to-device copy bandwidth measured first ((read + written bytes) / time);
- the baseline: HF `generate`, eager, batch 1, on the same bf16 model;
- agreement: teacher-forced top-1 of the engine's logits against HF's forward (bf16: HF bf16; INT8/INT4:
  the same HF bf16 model, so it includes the quantization error), and greedy tokens against HF's;
- checks on the first shape: the CUDA-graphed step's greedy tokens equal the same compiled
  step launched without graphs, compiled against eager agreement, and CUDA kernels per decode step.
Units run in the order given (1.7B first: the issue's targets), and a unit that would start after
--budget-s is skipped and recorded as such, so the run ends within about 8 minutes on one H100.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from costopt.kernels.triton_decode import interpreting as triton_interpreting
from costopt.runtimes.cuda import CudaEngine, CudaOptions, available, capture_graph
from costopt.runtimes.slots import SamplingParams, generate_all

SHAPES = {  # SmolLM2 configs (Hugging Face model cards' config.json); vocab 49152, tied embeddings
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, rope_theta=100000.0),
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, rope_theta=100000.0),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, rope_theta=130000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, rope_theta=10000.0, vocab_size=256),  # the CPU smoke test's
}
FORMATS = {"bf16": "none", "int8": "int8", "int4": "int4"}  # label -> CudaOptions.weights
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.4))  # NVIDIA datasheets, dense (no sparsity); first name match wins
NO_CUDA_EXIT = 2


class Plan:
    """Sizes of one run: the GPU's, or the CPU smoke test's."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        cpu = device.type == "cpu"
        self.dtype = "fp32" if cpu else "bf16"
        self.batches = (1, 2) if cpu else (1, 8, 64)
        self.prompt_len, self.steps, self.repeats = (8, 6, 2) if cpu else (32, 64, 5)
        self.prefill_len, self.hf_tokens = (24, 6) if cpu else (512, 64)
        self.agree_prompts, self.agree_tokens = (2, 6) if cpu else (3, 32)
        self.max_len = 64 if cpu else 640
        self.len_bucket = 16 if cpu else 128
        self.compile_mode = "default"  # --autotune: max-autotune-no-cudagraphs


# -- measuring -------------------------------------------------------------------------------------------
def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds `fn` takes: CUDA events on a GPU (everything it launched has finished), else wall time."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def graphed(device: torch.device, fn: Callable[[], Any], times: int) -> Callable[[], Any]:
    """`fn` run `times` times, captured once as a CUDA graph on a GPU: launched from Python, a small kernel
    times the CPU's launch overhead instead (the first sweep, 2026-12-05, read 270 GB/s for an 8 MB
    projection that way), whereas the engine replays its kernels from graphs."""
    if device.type != "cuda":
        return lambda: [fn() for _ in range(times)]
    graph, _ = capture_graph(fn, device)
    return lambda: [graph.replay() for _ in range(times)]


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Device-to-device copy bandwidth, bytes/s counting what is read plus what is written (median of 10)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / statistics.median(timed(device, lambda: dst.copy_(src)) for _ in range(10))


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops}"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{key} datasheet, dense bf16: {tflops} TFLOPS"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def decode_rate(engine: CudaEngine, batch: int, plan: Plan) -> dict[str, float]:
    """Median decode tok/s of `batch` sequences (after their prefill step), and the GPU time of one replay."""
    rates = []
    for r in range(plan.repeats):
        for i, p in enumerate(prompts(batch, plan.prompt_len, engine.vocab_size, seed=r)):
            engine.add(i, p, SamplingParams(max_new_tokens=plan.steps + 1))
        engine.step()  # prefill + first tokens
        seconds = timed(engine.device, lambda: [engine.step() for _ in range(plan.steps)])
        rates.append(batch * plan.steps / seconds)
        assert not engine.has_work(), "every sequence ends on the last timed step"
    out = {"tok_s": statistics.median(rates), "ms_per_step": 1e3 * batch / statistics.median(rates)}
    graph = engine.decode_graph(*engine.bucket(batch, plan.prompt_len + plan.steps))
    if graph.graph is not None:  # the step's GPU time alone: replays of the last step's inputs, rewriting equal K/V
        out["gpu_ms_per_step"] = 1e3 * timed(engine.device, lambda: [graph.graph.replay() for _ in range(20)]) / 20
    return out


def prefill_rate(engine: CudaEngine, plan: Plan) -> float:
    """Median prompt tok/s of one prompt of plan.prefill_len tokens (eager prefill + its first token)."""
    rates = []
    for r in range(3):
        prompt = prompts(1, plan.prefill_len, engine.vocab_size, seed=100 + r)[0]
        engine.add("p", prompt, SamplingParams(max_new_tokens=1))
        rates.append(plan.prefill_len / timed(engine.device, engine.step))
    return statistics.median(rates)


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def hf_generate_rate(model: Any, plan: Plan, device: torch.device) -> float:
    """HF `generate`, eager, batch 1: new tok/s (its short prefill included)."""
    p = prompts(1, plan.prompt_len, model.config.vocab_size, seed=7)[0]
    hf_greedy(model, p, 4)  # warm-up
    return statistics.median(plan.hf_tokens / timed(device, lambda: hf_greedy(model, p, plan.hf_tokens))
                             for _ in range(3))


def agreement(engine: CudaEngine, model: Any, plan: Plan) -> dict[str, Any]:
    """Teacher-forced top-1 of the engine's logits against HF's forward, and greedy tokens against HF's."""
    ps = prompts(plan.agree_prompts, plan.prompt_len, engine.vocab_size, seed=11)
    top1, worst = [], 0.0
    for p in ps:
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([p], device=model.device)).logits[0].float()
        got = engine.prompt_logits(p).float()
        top1.append(float((got.argmax(-1) == want.argmax(-1)).float().mean()))
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    ours = generate_all(engine, ps, SamplingParams(max_new_tokens=plan.agree_tokens))
    theirs = [hf_greedy(model, p, plan.agree_tokens) for p in ps]
    lead = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
    return {"teacher_forced_top1": round(statistics.mean(top1), 4), "max_rel_logit_diff": round(worst, 4),
            "greedy_identical": sum(x == y for x, y in zip(ours, theirs)), "greedy_prompts": len(ps),
            "greedy_leading_match_mean": round(statistics.mean(lead), 2), "greedy_tokens": plan.agree_tokens}


def kernels_per_step(engine: CudaEngine, plan: Plan) -> dict[str, Any]:
    """CUDA kernels one batch-1 decode step launches (an engine without graphs, so each is seen): their
    count, their summed GPU time, and the ten names that take the most of it."""
    from torch.profiler import ProfilerActivity, profile

    engine.add("k", prompts(1, plan.prompt_len, engine.vocab_size, seed=5)[0], SamplingParams(max_new_tokens=3))
    engine.step(), engine.step()  # prefill, then a decode step that compiles nothing new
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)  # microseconds
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    return {"kernels": len(kernels), "kernel_us_sum": round(sum(e.device_time for e in kernels), 1),
            "top": [{"name": n, "count": len(t), "us_sum": round(sum(t), 1)} for n, t in top]}


# -- one shape -------------------------------------------------------------------------------------------
def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{"vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                         "rms_norm_eps": 1e-5, "initializer_range": 0.2, **SHAPES[shape]})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: run every sequence to its length
    model.generation_config.pad_token_id = 0
    return model


def engine_for(model: Any, plan: Plan, device: torch.device, weights: str, **changes: Any) -> CudaEngine:
    options = replace(CudaOptions(dtype=plan.dtype, weights=weights, len_bucket=plan.len_bucket,
                                  compile_mode=plan.compile_mode), **changes)
    return CudaEngine(model, eos_token_ids=[], max_batch=max(plan.batches), max_len=plan.max_len, device=device,
                      options=options)


def run_format(model: Any, label: str, plan: Plan, device: torch.device, bandwidth: float,
               peak: float | None, **changes: Any) -> dict[str, Any]:
    """Every figure of one weight format on one shape (`changes`: CudaOptions fields to override)."""
    t0 = time.perf_counter()
    engine = engine_for(model, plan, device, FORMATS[label], **changes)
    built = time.perf_counter() - t0
    length = engine.bucket(1, plan.prompt_len + plan.steps)[1]
    warm = engine.warmup(batches=plan.batches, lengths=[length])  # compile + capture, before any timing
    decode = {b: decode_rate(engine, b, plan) for b in plan.batches}
    prefill = prefill_rate(engine, plan)
    step_bytes = engine.weight_bytes() + engine.kv_bytes(1, length)
    flops_per_token = 2 * engine.matmul_params()
    name = f"{plan.dtype if label == 'bf16' else label} {changes.get('kernels', 'auto')}" + \
        (" (not compiled)" if changes.get("compile") is False else "")
    row = {"format": name, "build_s": round(built, 1), "compile_and_capture_s": round(warm, 1),
           "weight_bytes": engine.weight_bytes(), "kv_bytes_bs1": engine.kv_bytes(1, length), "attended_length": length,
           "decode": {str(b): {k: round(v, 3) for k, v in d.items()} for b, d in decode.items()},
           "prefill_tok_s": round(prefill, 1), "roofline_tok_s_bs1": round(bandwidth / step_bytes, 1),
           "roofline_share_bs1": round(decode[1]["tok_s"] * step_bytes / bandwidth, 4),
           "int4_notes": dict(list(engine.int4_notes.items())[:3]), "int4_dequantized_layers": len(engine.int4_notes),
           "fused_rows": engine.fused_rows, "kernels_note": engine.kernels_note,
           "agreement_vs_hf_bf16": agreement(engine, model, plan)}
    if peak:
        row["mfu"] = {str(b): round(flops_per_token * d["tok_s"] / peak, 5) for b, d in decode.items()}
        row["mfu_prefill"] = round(flops_per_token * prefill / peak, 4)
    del engine
    release(device)
    return row


def run_checks(model: Any, plan: Plan, device: torch.device) -> dict[str, Any]:
    """Graphs change nothing (same compiled step with and without them); compiled vs eager; kernels per step."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    ps = prompts(4, plan.prompt_len, model.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=plan.agree_tokens)

    def tokens_and_step(graphs: bool, kernels: str, compile: bool = True) -> tuple[list, Any]:
        engine = engine_for(model, plan, device, "none", graphs=graphs, kernels=kernels, compile=compile)
        out = generate_all(engine, ps, params), (None if graphs or not compile else kernels_per_step(engine, plan))
        del engine
        release(device)
        return out

    eager, _ = tokens_and_step(False, "compiled", compile=False)
    out: dict[str, Any] = {"prompts": len(ps), "decode_step_bs1": {}}
    for kernels in ("triton", "compiled"):
        graphed, _ = tokens_and_step(True, kernels)
        launched, out["decode_step_bs1"][kernels] = tokens_and_step(False, kernels)
        out[f"{kernels}_graph_equals_no_graph"] = graphed == launched
        out[f"{kernels}_vs_eager_identical_prompts"] = sum(a == b for a, b in zip(launched, eager))
    return out


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:600]}"


def release(device: torch.device) -> None:
    """Free a dropped engine's device memory now (its graphs and it reference each other: a cycle)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the run ---------------------------------------------------------------------------------------------
def environment(device: torch.device, bandwidth: float, peak_note: str) -> dict[str, Any]:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "peak": peak_note,
           "weights": "RANDOM (initializer std 0.2), SmolLM2-shaped configs; not the real model"}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError as exc:
            env["triton"] = f"not importable: {exc}"
    return env


def write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# CUDA engine benchmark: {env.get('card', env['device'])}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, triton {env.get('triton', '-')}; "
             f"copy bandwidth {env['copy_bandwidth_gb_s']} GB/s (read + written); MFU peak: {env['peak']}.",
             f"Weights: {env['weights']}.", ""]
    for shape, res in results["shapes"].items():
        bs = results["plan"]["batches"]
        lines += [f"## {shape}", "", f"HF `generate` eager, batch 1: {res.get('hf_generate_tok_s', '-')} tok/s", "",
                  f"| format | decode tok/s bs{' / bs'.join(map(str, bs))} | GPU ms/step bs1 | roofline share bs1 "
                  f"| MFU bs1 / bs{bs[-1]} | prefill tok/s | compile+capture s | top-1 vs HF | greedy identical |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in res["formats"]:
            if "skipped" in row or "error" in row:
                lines.append(f"| {row['format']} | {row.get('skipped') or row.get('error')} |||||||")
                continue
            d, mfu, ag = row["decode"], row.get("mfu", {}), row["agreement_vs_hf_bf16"]
            keys = list(d)
            lines.append(f"| {row['format']} | {' / '.join(str(round(d[k]['tok_s'])) for k in keys)} "
                         f"| {d[keys[0]].get('gpu_ms_per_step', '-')} | {row['roofline_share_bs1']:.1%} "
                         f"| {mfu.get(keys[0], '-')} / {mfu.get(keys[-1], '-')} | {row['prefill_tok_s']} "
                         f"| {row['compile_and_capture_s']} | {ag['teacher_forced_top1']} "
                         f"| {ag['greedy_identical']}/{ag['greedy_prompts']} |")
        lines.append("")
    lines += ["## Checks", "", "```", json.dumps(results.get("checks", {}), indent=2), "```", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    plan, t_start = Plan(device, args.quick), time.perf_counter()
    if args.autotune:
        plan.compile_mode = "max-autotune-no-cudagraphs"
    bandwidth = copy_bandwidth(device, 64 if device.type == "cpu" else 2048)
    peak, peak_note = peak_flops(device, args.peak_tflops)
    results: dict[str, Any] = {"environment": environment(device, bandwidth, peak_note), "shapes": {},
                               "plan": vars(plan), "budget_s": args.budget_s}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for shape in args.shapes:
        model = build_model(shape, device, dtype)
        res = results["shapes"][shape] = {"config": SHAPES[shape], "formats": []}
        res["hf_generate_tok_s"] = round(hf_generate_rate(model, plan, device), 1)
        if "checks" not in results:
            try:
                results["checks"] = run_checks(model, plan, device)
            except (RuntimeError, ValueError) as exc:  # e.g. a compile failure: recorded, the figures still run
                results["checks"] = {"error": _failure(exc)}
            release(device)
        for kernels in args.kernels:
            for label in args.formats:
                unit = f"{label} {kernels}"
                if time.perf_counter() - t_start > args.budget_s:
                    res["formats"].append({"format": unit, "skipped": f"time budget of {args.budget_s} s spent"})
                    continue
                try:
                    res["formats"].append(run_format(model, label, plan, device, bandwidth, peak, kernels=kernels))
                except (RuntimeError, ValueError) as exc:  # one unit's failure: recorded, then the same
                    res["formats"].append({"format": unit, "error": _failure(exc)})  # step uncompiled, in graphs
                    release(device)
                    if device.type == "cuda" and kernels == "compiled":
                        try:
                            res["formats"].append(run_format(model, label, plan, device, bandwidth, peak,
                                                             kernels=kernels, compile=False))
                        except (RuntimeError, ValueError) as again:
                            res["formats"].append({"format": f"{unit} (not compiled)", "error": _failure(again)})
                write(args.out, results)
        del model
        release(device)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    write(args.out, results)
    return results


# -- the serving trace through the engine -----------------------------------------------------------------
def serve_replay(trace: Path, shape: str, device: torch.device, concurrencies: list[int], price_per_hour: float,
                 label: str = "bf16") -> dict[str, Any]:
    """The `serving-v1` trace's requests (prompt ids and max_tokens, tokenized on CPU by the real model's
    tokenizer: `python -m tasks.gpubench --write-trace FILE --workspace W`) through one CudaEngine, closed
    loop: `concurrency` clients, each sending its next request when its last one finishes. Random weights
    and no EOS, so every request runs to its max_tokens (the real model stops earlier on some: this
    over-counts work). The engine alone: no HTTP, no admission, no tokenization."""
    data = json.loads(trace.read_text())
    model = build_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab = model.config.vocab_size  # the CPU smoke test's tiny model has fewer ids
    reqs = [([t % vocab for t in ids], int(m)) for ids, m in data["requests"]]
    longest = max(len(ids) + m for ids, m in reqs)
    max_len = 1 << (longest - 1).bit_length()
    out: dict[str, Any] = {"trace": data["meta"], "shape": shape, "config": SHAPES[shape], "format": label,
                           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "date": time.strftime("%Y-%m-%d"), "price_per_hour_usd": price_per_hour,
                           "note": "engine only (no HTTP, no admission); random weights run every request to max_tokens",
                           "runs": {}}
    engine = CudaEngine(model, eos_token_ids=[], max_batch=max(concurrencies), max_len=max_len, device=device,
                        options=CudaOptions(dtype="bf16" if device.type == "cuda" else "fp32",
                                            weights=FORMATS[label]))
    out["warmup_s"] = round(engine.warmup(), 1)
    for c in concurrencies:
        n = min(len(reqs), 4 * c)
        todo, started, latency, tokens = iter(range(n)), {}, [], 0

        def admit() -> None:
            i = next(todo, None)
            if i is not None:
                engine.add(i, reqs[i][0], SamplingParams(max_new_tokens=reqs[i][1]))
                started[i] = time.perf_counter()

        t0 = time.perf_counter()
        for _ in range(c):
            admit()
        while engine.has_work():
            for e in engine.step():
                tokens += e.token_id is not None
                if e.finish_reason is not None:
                    latency.append(time.perf_counter() - started[e.seq_id])
                    admit()
        seconds = time.perf_counter() - t0
        latency.sort()
        req_s = n / seconds
        out["runs"][str(c)] = {"requests": n, "tokens": tokens, "seconds": round(seconds, 2),
                               "tok_s": round(tokens / seconds, 1), "req_s": round(req_s, 2),
                               "p50_ms": round(1e3 * latency[len(latency) // 2], 1),
                               "p99_ms": round(1e3 * latency[min(len(latency) - 1, int(0.99 * len(latency)))], 1),
                               "usd_per_1m_requests": round(price_per_hour / 3600 / req_s * 1e6, 3)}
    del engine, model
    release(device)
    return out


def write_trace(path: Path, workspace: Path, n: int = 512) -> None:
    """The serving trace's first n requests as prompt ids (the workspace's tokenizer and chat template) and
    max_tokens, for `--serve` on a machine without the model."""
    from transformers import AutoTokenizer

    from costopt.evaluation.served import serving_requests
    from tasks.servebench import TRACE_SEED

    reqs, meta = serving_requests(AutoTokenizer.from_pretrained(workspace / "artifacts" / "model"), n, TRACE_SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "seed": TRACE_SEED, "requests": [[ids, m] for ids, m in reqs]}))


# -- the fused kernels' block sizes -------------------------------------------------------------------------
def sweep_tiles(shape: str, device: torch.device, budget_s: float) -> dict[str, Any]:
    """Each fused kernel of one layer (and the head) of `shape`, batch 1, timed over block sizes: GB/s of
    weight read per launch for every candidate, the best first. Launches rotate over enough weight copies
    (>= 512 MB) that L2 cannot hold them, as in a real step. Random weights; bf16, then INT4, then INT8."""
    from costopt.kernels import triton_decode as T
    from costopt.kernels.gpu_linear import pack_int4, quantize_int4, quantize_int8

    cfg, t0 = SHAPES[shape], time.perf_counter()
    d, inter, n_q, n_kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"]
    hd = d // n_q
    kinds = {"qkv": ((n_q + 2 * n_kv) * hd, d), "o": (d, n_q * hd), "gate_up": (2 * inter, d),
             "down": (d, inter), "head": (cfg.get("vocab_size", 49152), d)}
    gen = torch.Generator(device=device).manual_seed(0)

    def weights(fmt: str, n: int, k: int) -> T.KernelWeight:
        w = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        if fmt == "dense":
            return T.KernelWeight(T.DENSE, w)
        if fmt == "int8":
            q = quantize_int8(w)
            return T.KernelWeight(T.INT8, q.data.contiguous(), q.scale.float())
        q = quantize_int4(w, 64)
        return T.KernelWeight(T.INT4, pack_int4(q.data), q.scale.float().contiguous(), q.zero.float().contiguous(), 64)

    x = torch.randn(1, max(d, inter, n_q * hd), device=device, dtype=torch.bfloat16)
    nw = torch.ones(d, device=device, dtype=torch.bfloat16)
    kv = torch.zeros(2, 2, n_kv, 64, hd, device=device, dtype=torch.bfloat16)
    cos = torch.ones(64, hd, device=device, dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    candidates = [T.Tiles(bn, bk, warps) for bn in (2, 4, 8, 16, 32) for bk in (256, 512, 1024, 2048)
                  for warps in (4, 8) if 512 <= bn * bk <= 16384]
    if device.type == "cpu":  # Triton's interpreter: a smoke test of the sweep itself
        candidates = candidates[:1]
    out: dict[str, Any] = {"shape": shape, "rows": 1, "kinds": {}}
    for fmt in ("dense", "int4", "int8"):
        for kind, (n, k) in kinds.items():
            if time.perf_counter() - t0 > budget_s:
                out["kinds"][f"{kind} {fmt}"] = {"skipped": f"sweep budget of {budget_s} s spent"}
                continue
            first = weights(fmt, n, k)
            nbytes = sum(t.numel() * t.element_size() for t in (first.data, first.scale, first.zero) if t is not None)
            copies = [first] + [weights(fmt, n, k) for _ in range(min(64, max(1, (512 << 20) // nbytes)) - 1)]
            xs = x[:, :k].contiguous()

            def launch(w: T.KernelWeight, t: T.Tiles) -> None:
                if kind == "qkv":
                    T.qkv_rope(xs, nw, 1e-5, w, cos, cos, zero, zero, kv[:, :], n_q, n_kv, tiles=t)
                elif kind == "gate_up":
                    T.gate_up(xs, nw, 1e-5, w, tiles=t)
                elif kind == "head":
                    T.gemv(xs, w, norm=nw, tiles=t)
                else:
                    T.gemv(xs, w, residual=x[:, :n], tiles=t)

            rows = []
            for t in [T.default_tiles(1, n // 2 if kind == "gate_up" else n, k, first), *candidates]:
                if fmt == "int4" and t.bk < 64:
                    continue
                try:
                    for w in copies[:2]:
                        launch(w, t)  # compile
                    seconds = timed(device, graphed(device, lambda: [launch(w, t) for w in copies], 3))
                    rows.append({"bn": t.bn, "bk": t.bk, "warps": t.warps,
                                 "gb_s": round(3 * len(copies) * nbytes / seconds / 1e9, 1)})
                except Exception as exc:  # noqa: BLE001 - a block size the compiler rejects is recorded, not fatal
                    rows.append({"bn": t.bn, "bk": t.bk, "warps": t.warps, "error": _failure(exc)[:200]})
            default = rows[0] if rows else None  # default_tiles' choice, measured first
            rows.sort(key=lambda r: -r.get("gb_s", 0))
            out["kinds"][f"{kind} {fmt}"] = {"n": n, "k": k, "bytes": nbytes, "default": default, "best": rows[:5]}
            del copies, first
            release(device)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def set_tiles(sweep: dict[str, Any]) -> None:
    """Use a sweep's best block sizes (`--sweep`'s sweep.json) for every (kind, format) it measured."""
    from costopt.kernels import triton_decode as T

    for name, r in sweep["kinds"].items():
        kind, fmt = name.split()
        if r.get("best") and "gb_s" in r["best"][0]:
            b = r["best"][0]
            T.TILES[(kind, T.FORMATS[fmt])] = T.Tiles(b["bn"], b["bk"], b["warps"])


def tiles_table() -> dict:
    from costopt.kernels import triton_decode as T

    return dict(T.TILES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--shapes", default="1.7b,135m,360m", help=f"comma-separated, in run order, of {sorted(SHAPES)}")
    p.add_argument("--formats", default="bf16,int8,int4", help=f"comma-separated, of {list(FORMATS)}")
    p.add_argument("--kernels", default="triton,compiled",
                   help="small-batch decode paths to measure, in order: triton (fused kernels), compiled (Inductor "
                        "regions + cuBLAS); batches above CudaOptions.fused_rows always run compiled")
    p.add_argument("--serve", type=Path, help="replay this trace file (--write-trace) through the engine instead "
                   "(DIR/serve.json), on the first shape and format")
    p.add_argument("--concurrency", default="16,64", help="--serve: comma-separated client counts")
    p.add_argument("--gpu-price", type=float, default=3.50, help="--serve: USD per GPU-hour (params.yaml gpu.price_per_hour_usd)")
    p.add_argument("--write-trace", type=Path, help="write the serving trace's prompt ids to this file and stop")
    p.add_argument("--workspace", type=Path, default=Path("."), help="--write-trace: the workspace whose tokenizer to use")
    p.add_argument("--tiles-from", type=Path, help="a --sweep's sweep.json: use its best block sizes")
    p.add_argument("--sweep", action="store_true",
                   help="time the fused kernels' block sizes on the first shape instead (DIR/sweep.json)")
    p.add_argument("--quick", action="store_true", help="135M only (tiny with --device cpu): a smoke test")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--budget-s", type=float, default=390.0, help="start no unit after this many seconds")
    p.add_argument("--autotune", action="store_true",
                   help="compile with max-autotune (Triton GEMMs with the de-quantization fused; compiles far longer)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU, if the card is not in the table")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for name, values, known in (("--shapes", args.shapes, SHAPES), ("--formats", args.formats, FORMATS),
                                ("--kernels", args.kernels, ("triton", "compiled"))):
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            p.error(f"{name}: unknown {unknown or 'empty list'}; expected some of {sorted(known)}")
    if args.write_trace:
        write_trace(args.write_trace, args.workspace)
        return 0
    if args.device == "cpu":
        if not args.quick:
            print("gpubench: --device cpu runs only the smoke test; add --quick", file=sys.stderr)
            return NO_CUDA_EXIT
        args.shapes = ["tiny"]
        if not triton_interpreting():
            args.kernels = ["compiled"]  # the fused kernels need CUDA, or Triton's interpreter
    elif available():
        print(f"gpubench: {available()}. This benchmark measures a GPU; for a CPU smoke test of its code "
              f"path run `python -m tasks.gpubench --device cpu --quick --out DIR`.", file=sys.stderr)
        return NO_CUDA_EXIT
    elif args.quick:
        args.shapes = ["135m"]
    if args.serve:
        if args.device == "cpu":
            args.shapes = ["tiny"]
        result = serve_replay(args.serve, args.shapes[0], torch.device(args.device),
                              [int(c) for c in args.concurrency.split(",")], args.gpu_price, args.formats[0])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["runs"], indent=1))
        return 0
    if args.sweep:
        if args.device == "cpu":
            args.shapes = ["tiny"]
        result = sweep_tiles(args.shapes[0], torch.device(args.device), args.budget_s)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        for kind, r in result["kinds"].items():
            print(kind, r.get("skipped") or [(b["bn"], b["bk"], b["warps"], b.get("gb_s")) for b in r["best"][:3]])
        return 0
    if args.tiles_from:
        set_tiles(json.loads(args.tiles_from.read_text()))
    results = run(args, torch.device(args.device))
    results["tiles"] = {f"{k} {f}": vars(t) for (k, f), t in tiles_table().items()}
    write(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
