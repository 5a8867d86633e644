"""`make bench`: decode speed of fp32 and every variant, measured side by side in one process.

Run it as `python -m tasks.bench [--rounds 5] [--tokens 64] [--workspace DIR] [--no-compile]`. It reuses
the workspace's ingested model and variants (running ingest and quantize first if they are missing),
plus the search's pick when it is a mixed-precision variant, then times greedy decode at batch 1 and
at batch 8 (prefill excluded), interleaving the models round by round so drift on a shared machine
hits them alike. Every (precision x runtime) gets a row: each variant on its own runtime (torch
variants through the lean greedy loop, llama.cpp variants through costopt's llama.cpp engine), the
torch ones again on the compiled decode step, and each GGUF through llama.cpp's own `Llama.generate`,
the figure a user of llama.cpp would see. The machine's streaming read bandwidth is measured before
and after; each row's share of the memory roofline is tok/s x weight bytes / bandwidth. It prints a
Markdown table of medians and ratios to fp32 and writes `artifacts/make-bench.json`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from costopt.storage.layout import Workspace, read_json, write_json
from costopt.models.source import load_model_dir
from costopt.params import load_params
from costopt.evaluation.speed import device_label, encode, greedy_decode
from costopt.models.variants import read_spec

PROMPT = "Explain in a few sentences why the sky is blue."


def ensure_artifacts(params: Any, ws: Workspace) -> None:
    from tasks.evaldata import evaldata
    from tasks.ingest import ingest
    from tasks.quantize import quantize_variant

    if not (ws.model_dir / "model.safetensors").is_file():
        ingest(params, ws)
    evaldata(params, ws)  # cached; calibrated variants read its calibration set
    for name in params.quantize.variants:
        if not (ws.variant_dir(name) / "spec.json").is_file():
            quantize_variant(params, ws, name)


def time_decode(model: Any, enc: dict, tokens: int) -> float:
    _, _, dt = greedy_decode(model, enc["input_ids"], enc["attention_mask"], tokens)
    return (tokens - 1) / dt  # tok/s, prefill excluded


def time_batch(model: Any, enc: dict, tokens: int) -> float:
    _, _, dt = greedy_decode(model, enc["input_ids"], enc["attention_mask"], tokens)
    return enc["input_ids"].shape[0] * (tokens - 1) / dt  # new tok/s summed over the batch, prefill excluded


def search_pick(ws: Workspace) -> list[str]:
    """The search's pick when it is a mixed-precision variant (not among quantize.variants), else []."""
    path = ws.search_dir / "search.json"
    picked = read_json(path).get("picked") if path.is_file() else None
    return [picked] if picked and (ws.variant_dir(picked) / "spec.json").is_file() else []


def _compiled_rows(ws: Workspace, params: Any, names: list[str], batch: int) -> dict[str, tuple[Any, int]]:
    """The torch variants again on the compiled decode step (costopt.runtimes.engine), where it compiles."""
    from costopt.evaluation.speed import EngineDecoder
    from costopt.models.variants import load_torch_variant
    from costopt.runtimes.engine import Engine
    from costopt.runtimes.registry import spec_runtime

    out = {}
    for name in ["fp32", *names]:
        if name == "fp32":
            model, size = load_model_dir(ws.model_dir)[0], _fp32_size(ws)
        else:
            spec = read_spec(ws, name)
            if spec_runtime(spec)[0].name != "torch":
                continue
            model, size = load_torch_variant(ws, spec)[0], spec.size_bytes
        engine = Engine(model, eos_token_ids=[], max_batch=batch, max_len=512, compile=True)
        if not engine.compiled:
            print(f"{name}: the compiled step fell back to eager ({engine.compile_error}); left out", file=sys.stderr)
            continue
        out[f"{name}+compile"] = (EngineDecoder(engine), size)
    return out


def _fp32_size(ws: Workspace) -> int:
    return sum(f.stat().st_size for f in ws.model_dir.glob("*.safetensors"))


def _llamacpp_own_rows(ws: Workspace, params: Any, names: list[str]) -> dict[str, tuple[Any, int]]:
    """llama.cpp's own decode loop (llama-cpp-python's `Llama.generate`) on each GGUF variant's file."""
    from costopt.runtimes.llamacpp_runtime import LlamaGenerate, config_of, gguf_file
    from costopt.runtimes.registry import spec_runtime

    out = {}
    for name in names:
        spec = read_spec(ws, name)
        if spec_runtime(spec)[0].name == "llamacpp":
            gen = LlamaGenerate(gguf_file(ws, spec), params.benchmark.threads, flash_attn=config_of(spec).flash_attn)
            out[f"{name} (llama.cpp generate)"] = (gen,
                                                   spec.size_bytes)
    return out


def run(ws: Workspace, params: Any, rounds: int, tokens: int, batch: int, compiled: bool = True) -> dict[str, Any]:
    from costopt.evaluation.speed import read_bandwidth_gb_s, roofline_share
    from tasks.benchmark import load_timed

    torch.set_num_threads(params.benchmark.threads)
    bandwidth = [read_bandwidth_gb_s(threads=params.benchmark.threads)]
    base, tok = load_model_dir(ws.model_dir)
    names = list(dict.fromkeys([*params.quantize.variants, *search_pick(ws)]))
    timed: dict[str, tuple[Any, int]] = {"fp32": (base, _fp32_size(ws))}
    runtimes = {"fp32": "torch"}
    for n in names:
        obj, _, label, _ = load_timed(params, ws, n, served=False)
        timed[n], runtimes[n] = (obj, read_spec(ws, n).size_bytes), label
    for extra, label in ((_compiled_rows(ws, params, names, batch) if compiled else {}, "torch+compile"),
                         (_llamacpp_own_rows(ws, params, names), "llama.cpp generate")):
        timed.update(extra)
        runtimes.update({k: label for k in extra})
    one, many = encode(tok, [PROMPT]), encode(tok, [PROMPT] * batch)
    for model, _ in timed.values():
        time_decode(model, one, 4)  # warm-up: kernel build, allocator, compile
    bs1: dict[str, list[float]] = {n: [] for n in timed}
    tput: dict[str, list[float]] = {n: [] for n in timed}
    for r in range(rounds):
        for name, (model, _) in timed.items():
            bs1[name].append(time_decode(model, one, tokens))
            if getattr(model, "batched", True):
                tput[name].append(time_batch(model, many, tokens))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {bs1[n][-1]:.1f}" for n in timed),
              file=sys.stderr, flush=True)
    bandwidth.append(read_bandwidth_gb_s(threads=params.benchmark.threads))
    bw = statistics.median(bandwidth)
    rows = {}
    for name, (_, size) in timed.items():
        med = statistics.median(bs1[name])
        rows[name] = {"runtime": runtimes[name], "decode_tok_s_bs1_median": med,
                      "throughput_tok_s_median": statistics.median(tput[name]) if tput[name] else None,
                      "decode_tok_s_bs1_runs": bs1[name], "throughput_tok_s_runs": tput[name],
                      "size_bytes": size, "roofline_share_bs1": roofline_share(med, size, bw)}
    ref = rows["fp32"]
    for row in rows.values():
        row["speedup_bs1"] = row["decode_tok_s_bs1_median"] / ref["decode_tok_s_bs1_median"]
        row["speedup_throughput"] = (row["throughput_tok_s_median"] / ref["throughput_tok_s_median"]
                                     if row["throughput_tok_s_median"] else None)
        row["size_ratio"] = row["size_bytes"] / ref["size_bytes"]
    return {"device": device_label(params.benchmark.threads), "rounds": rounds, "new_tokens": tokens,
            "batch": batch, "prompt": PROMPT, "read_bandwidth_gb_s": bw, "read_bandwidth_runs": bandwidth,
            "models": rows}


def table(result: dict[str, Any]) -> str:
    bw = result["read_bandwidth_gb_s"]
    lines = [f"device: {result['device']}; {result['rounds']} rounds, {result['new_tokens']} new tokens, "
             f"second decode column at batch {result['batch']}; streaming read bandwidth {bw:.1f} GB/s "
             "(roofline: bandwidth / weight bytes per token)",
             "| model | runtime | size MB | size ratio | decode tok/s bs1 (median) | x fp32 | share of roofline | "
             f"decode tok/s bs{result['batch']} (median) | x fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x: float | None, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    for name, r in result["models"].items():
        lines.append(f"| {name} | {r['runtime']} | {r['size_bytes'] / 1e6:.1f} | {r['size_ratio']:.3f} | "
                     f"{r['decode_tok_s_bs1_median']:.2f} | {r['speedup_bs1']:.2f} | "
                     f"{r['roofline_share_bs1']:.0%} | {fmt(r['throughput_tok_s_median'], '.2f')} | "
                     f"{fmt(r['speedup_throughput'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workspace", default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians over them")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    p.add_argument("--batch", type=int, default=8, help="batch size of the second decode column")
    p.add_argument("--variants", nargs="*", default=None, help="variants to time (default: quantize.variants)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled torch step's rows")
    args = p.parse_args(argv)
    over = {"quantize": {"variants": args.variants}} if args.variants else None
    params = load_params(Path(args.params), profile="full", overrides=over)
    ws = Workspace.from_env(args.workspace)
    ensure_artifacts(params, ws)
    started = time.perf_counter()
    result = run(ws, params, args.rounds, args.tokens, args.batch, compiled=not args.no_compile)
    result["wall_s"] = time.perf_counter() - started
    out = ws.root / "artifacts" / "make-bench.json"  # not a DVC stage output: a measurement log
    write_json(out, result)
    print(table(result))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
