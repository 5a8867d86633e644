"""Phase 1b/4b, benchmark: decode speed, throughput, trace latency and cost of fp32 or of every variant.

`python -m tasks.benchmark` measures the fp32 baseline (artifacts/bench/baseline.json);
`python -m tasks.benchmark --variants` measures each quantized variant (artifacts/bench/variants/).
Decode speeds: torch variants run the lean greedy loop, variants on another runtime (llama.cpp, the
compiled torch step) run through that runtime's own engine. Cost: every record's is its served cost,
the `serving-v1` trace replayed on the continuous-batching engine deploy would serve it with
(costopt.evaluation.served); fp32 also times the naive path (batch 1, one request at a time), the
baseline every cost is compared to. Each record names the runtime it measured.
"""
from __future__ import annotations

import json
from typing import Any

from tqdm import tqdm

from costopt.storage.layout import Workspace, write_json
from costopt.models.source import load_model_dir
from costopt.params import Params
from costopt.evaluation.served import SERVED_MAX_LEN
from costopt.evaluation.speed import EngineDecoder, measure
from costopt.runtimes.slots import DEFAULT_PREFIX_CACHE
from costopt.models.variants import load_torch_variant, read_failure, read_spec, record_failure
from costopt.runtimes.registry import RuntimeFailure, spec_runtime


def held_out_prompts(ws: Workspace) -> list[str]:
    path = ws.data_dir / "prompts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the evaldata phase first")
    with open(path) as fh:
        return [json.loads(line)["messages"][-1]["content"] for line in fh if line.strip()]


def _measure(timed: Any, tok: Any, name: str, params: Params, prompts: list[str], engine: Any,
             naive: bool = False, device: str = "cpu") -> dict[str, Any]:
    from costopt.evaluation.cost import price_per_hour

    cfg = params.benchmark
    total = cfg.served_requests + (cfg.trace_requests if naive else 0)
    with tqdm(total=total, desc=f"benchmark {name}", unit="req") as bar:
        return measure(timed, tok, prompts, cfg, price_per_hour(params, device), name, engine, bar, naive=naive)


def _torch_engine(model: Any, params: Params) -> Any:
    from costopt.runtimes.engine import Engine

    return Engine(model, eos_token_ids=[], max_batch=params.benchmark.served_concurrency, max_len=SERVED_MAX_LEN)


def benchmark_baseline(params: Params, ws: Workspace) -> dict[str, Any]:
    """Measure fp32 (served on the torch engine, and the naive batch-1 path): artifacts/bench/baseline.json."""
    model, tok = load_model_dir(ws.model_dir)
    record = {**_measure(model, tok, "fp32", params, held_out_prompts(ws), _torch_engine(model, params), naive=True),
              "runtime": "torch"}
    write_json(ws.bench_dir / "baseline.json", record)
    return record


def load_timed(params: Params, ws: Workspace, name: str, served: bool = True) -> tuple[Any, Any, str, Any]:
    """(what `measure` times, tokenizer, runtime label, the engine it is served with) of a variant: its
    torch model and the torch engine, or its runtime's engine (llama.cpp's twice: timed without, served
    with the prefix cache the server keeps); `served=False`: no served engine (None)."""
    from transformers import AutoTokenizer


    spec = read_spec(ws, name)
    runtime, cfg = spec_runtime(spec)
    label = runtime.name + ("+compile" if getattr(cfg, "compile", False) else "")
    if label == "torch":
        model, tok = load_torch_variant(ws, spec)
        return model, tok, label, _torch_engine(model, params) if served else None
    cfg_b = params.benchmark
    build = lambda **extra: runtime.engine(ws, spec, eos_token_ids=[], threads=cfg_b.threads,  # noqa: E731
                                           max_len=SERVED_MAX_LEN, **extra,
                                           max_batch=max(cfg_b.decode_batch, cfg_b.served_concurrency, 1))
    engine = build()
    serving = None
    if served:  # runtimes with a prefix cache serve with it on; the others with the timed engine itself
        serving = build(prefix_cache=DEFAULT_PREFIX_CACHE) if runtime.prefix_cache else engine
    if getattr(engine, "compile_error", None):  # asked for compile, runs eager: the speed is eager's, say so
        label = f"torch (compile failed, eager: {engine.compile_error})"
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    return EngineDecoder(engine), tok, label, serving


def benchmark_variant(params: Params, ws: Workspace, name: str) -> dict[str, Any]:
    """Measure one variant into artifacts/bench/variants/<name>.json (search candidates: artifacts/search/bench/)."""
    failed = read_failure(ws, name)
    if failed:
        return {"variant": name, "skipped": f"ruled out by {failed['phase']}: {failed['reason']}"}
    try:
        timed, tok, runtime, engine = load_timed(params, ws, name)
        device = spec_runtime(read_spec(ws, name))[0].device  # a GPU runtime's cost is GPU-hours
        record = {**_measure(timed, tok, name, params, held_out_prompts(ws), engine, device=device),
                  "runtime": runtime}
    except RuntimeFailure as exc:
        return record_failure(ws, name, "benchmark", exc)
    write_json(ws.bench_file(name), record)
    return {k: record[k] for k in ("variant", "decode_tok_s_bs1", "decode_tok_s_batch", "p95_ms",
                                   "cost_per_1m_requests_usd")}


def benchmark_variants(params: Params, ws: Workspace) -> dict[str, Any]:
    """Measure every variant of quantize.variants (the DVC stage and `--variants`)."""
    return {name: benchmark_variant(params, ws, name) for name in params.quantize.variants}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import execute, parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--variants", action="store_true", help="measure the quantized variants instead of fp32")
    p.add_argument("--variant", help="measure only this variant")
    args = p.parse_args(argv)
    if args.variant:
        return execute(lambda params, ws: benchmark_variant(params, ws, args.variant), args, f"benchmark_variant-{args.variant}")
    return execute(benchmark_variants if args.variants else benchmark_baseline, args)


if __name__ == "__main__":
    raise SystemExit(main())
