"""Times the quantized CPU kernels of `costopt.kernels.ops` on the built-in model's Linear shapes.

    python -m costopt.kernels                     # M in {1, 8}: median us per call, ours and maintained ones
    python -m costopt.kernels --rows 16,32,48,64  # crossover: native vs BLAS fallback per decode step
    python -m costopt.kernels --json out.json     # also write the numbers
    python -m costopt.kernels --step              # one whole decode step's 211 GEMVs, weights cold
    python -m costopt.kernels --stat min          # fastest batch instead of the median (busy machines)

The shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 3 KV heads of 64, tied 49152-row head).
Each figure is the median over `--repeats` timed batches of calls (a batch lasts at least 5 ms);
compare ratios within one run. When other processes compete for the cores, 2-thread OpenMP calls stall
for whole scheduler slices (medians grow 10-100x); `--stat min` then still shows what the kernels do.
Maintained alternatives are timed on the same data: `aten._weight_int4pack_mm_for_cpu` (fp32 and bf16
activations), `aten._weight_int8pack_mm`, raw `torch._int_mm` (codes already int8, so a lower bound
for a W8A8 built on it), fbgemm's dynamic quantized linear, and torchao 0.18's CPU configs when
torchao is importable (it is not a dependency; put a wheel's install dir on PYTHONPATH to include it).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from costopt.kernels import ops as K

SHAPES = {  # name: (N out, K in, matrices per decode step); 30 decoder layers plus the tied LM head
    "q/o 576x576": (576, 576, 60),
    "k/v 192x576": (192, 576, 60),
    "gate/up 1536x576": (1536, 576, 60),
    "down 576x1536": (576, 1536, 30),
    "head 49152x576": (49152, 576, 1),
}
GROUPS = (32, 64, 128)


STAT = {"median": statistics.median, "min": min}
Timer = Callable[[Callable[[], object]], float]  # fn -> microseconds per call


def time_us(fn: Callable[[], object], repeats: int, stat: str = "median") -> float:
    """Microseconds per call: the median (or `--stat min`) over `repeats` batches of at least 5 ms."""
    fn()
    t0 = time.perf_counter()
    fn()
    per_batch = max(1, int(0.005 / max(time.perf_counter() - t0, 1e-7)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        times.append((time.perf_counter() - t0) / per_batch * 1e6)
    return STAT[stat](times)


def _int4_data(N: int, Kin: int, g: int, gen: torch.Generator):
    q = torch.randint(0, 16, (N, Kin), generator=gen, dtype=torch.uint8)
    scale = torch.rand(N, Kin // g, generator=gen) * 0.01
    zero = torch.rand(N, Kin // g, generator=gen) * 15
    return q, K.pack_int4(q), scale, zero


def _aten_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """Canonical codes/scale/zero -> tinygemm CPU operands: w = (q - 8) * s + zp, zp = (8 - zero) * s."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return packed, sz


def _fbgemm_dynamic(w: torch.Tensor):
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    qw = torch.quantize_per_channel(w, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0,
                                    torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def _torchao_linears(w: torch.Tensor) -> dict[str, torch.nn.Module]:
    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return {}
    out = {}
    configs = {"torchao_w8a8_dyn": Int8DynamicActivationInt8WeightConfig(),
               "torchao_int4_g32": PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False)}
    for name, cfg in configs.items():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        quantize_(lin, cfg)
        out[name] = lin
    return out


def shape_row(N: int, Kin: int, M: int, timer: Timer, alternatives: bool) -> dict[str, float | None]:
    """{kernel: median us} for one weight shape [N, Kin] and M activation rows."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, Kin, generator=gen) * 0.02
    x = torch.randn(M, Kin, generator=gen)
    w8 = torch.randint(-127, 128, (N, Kin), generator=gen, dtype=torch.int8)
    s8 = torch.rand(N, generator=gen) * 1e-3
    row: dict[str, float | None] = {"fp32": timer(lambda: F.linear(x, w)),
                                    "int8_gemm": timer(lambda: K.int8_gemm(x, w8, s8))}
    for g in GROUPS:
        if Kin % g:
            row[f"int4_gemm_g{g}"] = None
            continue
        _, packed, scale, zero = _int4_data(N, Kin, g, gen)
        row[f"int4_gemm_g{g}"] = timer(lambda: K.int4_gemm(x, packed, scale, zero, g))
    row["w8a8_dyn"] = timer(lambda: K.w8a8_gemm(x, w8, s8, None))
    row["w8a8_static"] = timer(lambda: K.w8a8_gemm(x, w8, s8, 0.05))
    if alternatives:
        row.update(alternative_row(w, x, w8, s8, gen, timer))
    return row


def alternative_row(w, x, w8, s8, gen, timer: Timer) -> dict[str, float]:
    """The maintained kernels on the same shape (see the module docstring)."""
    N, Kin = w.shape
    q, _, scale, zero = _int4_data(N, Kin, 32, gen)
    packed, sz = _aten_int4(q, scale, zero)
    xb, szb = x.bfloat16(), sz.bfloat16()
    xi = torch.randint(-127, 128, x.shape, generator=gen, dtype=torch.int8)
    w8t, fb = w8.t(), _fbgemm_dynamic(w)
    int4mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    row = {
        "aten_int4_g32_fp32": timer(lambda: int4mm(x, packed, 32, sz)),
        "aten_int4_g32_bf16": timer(lambda: int4mm(xb, packed, 32, szb)),
        "aten_int8pack_fp32": timer(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8)),
        "torch__int_mm": timer(lambda: torch._int_mm(xi, w8t)),
        "fbgemm_dynamic": timer(lambda: torch.ops.quantized.linear_dynamic(x, fb, True)),
    }
    with torch.no_grad():
        for name, lin in _torchao_linears(w).items():
            row[name] = timer(lambda: lin(x))
    return row


def crossover_row(N: int, Kin: int, M: int, timer: Timer) -> dict[str, float]:
    """Native kernel vs its de-quantize + BLAS fallback at M rows, us per call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, Kin, generator=gen)
    w8 = torch.randint(-127, 128, (N, Kin), generator=gen, dtype=torch.int8)
    s8 = torch.rand(N, generator=gen) * 1e-3
    _, packed, scale, zero = _int4_data(N, Kin, 32, gen)
    lib4, lib8 = K.native_library("int4_gemm"), K.native_library("w8a8_gemm")

    def int4_native():
        y = torch.empty(M, N)
        lib4.costopt_int4_gemm(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                               y.data_ptr(), M, N, Kin, 32, torch.get_num_threads())

    def w8a8_native():
        y = torch.empty(M, N)
        lib8.costopt_w8a8_gemm(x.data_ptr(), w8.data_ptr(), s8.data_ptr(), 0.0, y.data_ptr(), M, N, Kin,
                               torch.get_num_threads())

    return {
        "int4_native": timer(int4_native),
        "int4_blas": timer(lambda: F.linear(x, K.dequantize_int4(packed, scale, zero, 32))),
        "w8a8_native": timer(w8a8_native),
        "w8a8_blas": timer(lambda: K._w8a8_fallback(x, w8, s8, None)),
    }


def decode_step(shapes: dict, timer: Timer) -> list[dict]:
    """ms for one decode step's GEMVs (M = 1) with every matrix distinct, as in a real forward pass.

    The per-shape table calls one matrix again and again, so all but the LM head stay in cache; a real
    step reads each of the 135M parameters once, from DRAM. That is where fewer weight bytes pay off.
    """
    gen = torch.Generator().manual_seed(0)
    mats = [(N, Kin) for N, Kin, count in shapes.values() for _ in range(count)]
    xs = {Kin: torch.randn(1, Kin, generator=gen) for _, Kin in mats}
    row: dict = {"shape": "decode step, cold weights (ms)", "M": 1}
    w32 = [torch.randn(N, Kin, generator=gen) for N, Kin in mats]  # 540 MB for the whole model
    row["fp32"] = timer(lambda: [F.linear(xs[w.shape[1]], w) for w in w32]) / 1000
    del w32
    w8 = [(torch.randint(-127, 128, (N, Kin), generator=gen, dtype=torch.int8), torch.rand(N, generator=gen))
          for N, Kin in mats]
    row["int8_gemm"] = timer(lambda: [K.int8_gemm(xs[w.shape[1]], w, sc) for w, sc in w8]) / 1000
    row["w8a8_dyn"] = timer(lambda: [K.w8a8_gemm(xs[w.shape[1]], w, sc, None) for w, sc in w8]) / 1000
    del w8
    for g in (32, 64):
        w4 = [(torch.randint(0, 256, (N, Kin // 2), generator=gen, dtype=torch.uint8),
               torch.rand(N, Kin // g, generator=gen), torch.rand(N, Kin // g, generator=gen) * 15)
              for N, Kin in mats]
        row[f"int4_gemm_g{g}"] = timer(lambda: [K.int4_gemm(xs[p.shape[1] * 2], p, sc, z, g)
                                                for p, sc, z in w4]) / 1000
    return [row]


def _table(rows: list[dict], keys: list[str]) -> str:
    head = ["shape", "M"] + keys
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["shape"], str(r["M"])] + ["-" if r.get(k) is None else f"{r[k]:.1f}" for k in keys]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def crossover_sweep(shapes: dict, Ms: list[int], timer: Timer) -> list[dict]:
    """Per shape and M, native vs fallback; plus their sum over one decode step's matrices (ms)."""
    rows = []
    for M in Ms:
        step = dict.fromkeys(("int4_native", "int4_blas", "w8a8_native", "w8a8_blas"), 0.0)
        for name, (N, Kin, count) in shapes.items():
            r = crossover_row(N, Kin, M, timer)
            rows.append({"shape": name, "M": M, **r})
            for k in step:
                step[k] += count * r[k] / 1000
        label = "decode step (ms)" if len(shapes) == len(SHAPES) else "these shapes' share of a step (ms)"
        rows.append({"shape": label, "M": M, **step})
        print(_table(rows[-1:], list(step)).splitlines()[-1], flush=True)
    return rows


def kernel_table(shapes: dict, timer: Timer, alternatives: bool) -> list[dict]:
    """Every kernel (and the maintained alternatives) per shape at M = 1 and 8."""
    rows = []
    for name, (N, Kin, _) in shapes.items():
        for M in (1, 8):
            rows.append({"shape": name, "M": M, **shape_row(N, Kin, M, timer, alternatives)})
            print(f"{name} M={M}: " + ", ".join(f"{k}={v:.1f}" for k, v in rows[-1].items()
                                                if isinstance(v, float)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads")
    ap.add_argument("--repeats", type=int, default=9, help="timed batches per figure")
    ap.add_argument("--stat", choices=sorted(STAT), default="median", help="figure kept over the batches")
    ap.add_argument("--rows", default="", help="comma-separated M values: run the crossover sweep instead")
    ap.add_argument("--step", action="store_true", help="time whole decode steps with cold weights instead")
    ap.add_argument("--no-alternatives", action="store_true", help="skip the maintained kernels (slow)")
    names = [n.split()[0] for n in SHAPES]
    ap.add_argument("--shapes", default="", help=f"comma-separated subset of {names}")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    timer = functools.partial(time_us, repeats=args.repeats, stat=args.stat)
    wanted = set(args.shapes.split(",")) if args.shapes else set(names)
    if wanted - set(names):
        ap.error(f"--shapes: unknown {sorted(wanted - set(names))}; choose from {names}")
    shapes = {n: v for n, v in SHAPES.items() if n.split()[0] in wanted}
    if not K.native_available():
        print(f"warning: native kernels unavailable ({K.native_failure()}); timing the fallbacks")
    if args.rows:
        rows = crossover_sweep(shapes, [int(v) for v in args.rows.split(",")], timer)
    elif args.step:
        rows = decode_step(shapes, timer)
    else:
        rows = kernel_table(shapes, timer, not args.no_alternatives)
    keys = [k for k in rows[0] if k not in ("shape", "M")]
    print(f"\n{args.stat} of {args.repeats} batches, {args.threads} threads; microseconds per call unless the "
          f"row says ms\n" + _table(rows, keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"unit": f"microseconds per call ({args.stat})", "threads": args.threads,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
