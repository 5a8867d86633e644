"""`make bench`: decode speed of fp32 and every variant, measured side by side in one process.

Run it as `python -m tasks.bench [--rounds 5] [--tokens 64] [--workspace DIR]`. It reuses the
workspace's ingested model and variants (running ingest and quantize first if they are missing), plus
the search's pick when it is a mixed-precision variant, then times greedy decode at batch 1 and at
batch 8 (prefill excluded) with the same loop (`costopt.evaluation.speed`), interleaving the models round by round so drift on a shared machine hits them alike. It prints a
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


def run(ws: Workspace, params: Any, rounds: int, tokens: int, batch: int) -> dict[str, Any]:
    torch.set_num_threads(params.benchmark.threads)
    base, tok = load_model_dir(ws.model_dir)
    names = list(dict.fromkeys([*params.quantize.variants, *search_pick(ws)]))
    from tasks.benchmark import load_timed

    models = {"fp32": base, **{n: load_timed(params, ws, n)[0] for n in names}}
    one, many = encode(tok, [PROMPT]), encode(tok, [PROMPT] * batch)
    for model in models.values():
        time_decode(model, one, 4)  # warm-up: kernel build, allocator
    bs1: dict[str, list[float]] = {n: [] for n in models}
    tput: dict[str, list[float]] = {n: [] for n in models}
    for r in range(rounds):
        for name, model in models.items():
            bs1[name].append(time_decode(model, one, tokens))
            tput[name].append(time_batch(model, many, tokens))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {bs1[n][-1]:.1f}" for n in models),
              file=sys.stderr, flush=True)
    sizes = {"fp32": sum(f.stat().st_size for f in ws.model_dir.glob("*.safetensors"))}
    sizes.update({n: read_spec(ws, n).size_bytes for n in names})
    rows = {}
    for name in models:
        rows[name] = {"decode_tok_s_bs1_median": statistics.median(bs1[name]),
                      "throughput_tok_s_median": statistics.median(tput[name]),
                      "decode_tok_s_bs1_runs": bs1[name], "throughput_tok_s_runs": tput[name],
                      "size_bytes": sizes[name]}
    for name, row in rows.items():
        row["speedup_bs1"] = row["decode_tok_s_bs1_median"] / rows["fp32"]["decode_tok_s_bs1_median"]
        row["speedup_throughput"] = row["throughput_tok_s_median"] / rows["fp32"]["throughput_tok_s_median"]
        row["size_ratio"] = row["size_bytes"] / rows["fp32"]["size_bytes"]
    return {"device": device_label(params.benchmark.threads), "rounds": rounds, "new_tokens": tokens,
            "batch": batch, "prompt": PROMPT, "models": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}; {result['rounds']} rounds, {result['new_tokens']} new tokens, "
             f"second decode column at batch {result['batch']}",
             "| model | size MB | size ratio | decode tok/s bs1 (median) | x fp32 | "
             f"decode tok/s bs{result['batch']} (median) | x fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        lines.append(f"| {name} | {r['size_bytes'] / 1e6:.1f} | {r['size_ratio']:.3f} | "
                     f"{r['decode_tok_s_bs1_median']:.2f} | {r['speedup_bs1']:.2f} | "
                     f"{r['throughput_tok_s_median']:.2f} | {r['speedup_throughput']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workspace", default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians over them")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    p.add_argument("--batch", type=int, default=8, help="batch size of the second decode column")
    p.add_argument("--variants", nargs="*", default=None, help="variants to time (default: quantize.variants)")
    args = p.parse_args(argv)
    over = {"quantize": {"variants": args.variants}} if args.variants else None
    params = load_params(Path(args.params), profile="full", overrides=over)
    ws = Workspace.from_env(args.workspace)
    ensure_artifacts(params, ws)
    started = time.perf_counter()
    result = run(ws, params, args.rounds, args.tokens, args.batch)
    result["wall_s"] = time.perf_counter() - started
    out = ws.root / "artifacts" / "make-bench.json"  # not a DVC stage output: a measurement log
    write_json(out, result)
    print(table(result))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
