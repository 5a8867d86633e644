"""A measured cost model for mixed precision: microseconds per decode step of each block part.

Batch-1 decode time is the sum of its GEMVs plus a fixed overhead (attention over the cache, norms,
Python). The GEMVs are what precision changes, so we time each distinct Linear shape of the model on
this machine with each kernel (fp32 `F.linear`, the INT8 and INT4 kernels of `costopt.kernels.ops`) and
add them up per part. The search only needs the ordering and the ratios right; the cost it reports
for its pick is measured end to end like every other variant's (`tasks.benchmark`).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from costopt.quantization.schemes import parts

REPEATS = 30  # timed calls per shape and kernel; the fastest is kept


def _time_us(fn, repeats: int = REPEATS) -> float:
    """The fastest of `repeats` calls, us. Not the median: when another process holds a core, an
    OpenMP parallel region can wait a whole scheduler slice for its second thread (measured: 8 ms
    instead of 70 us per call while a test run shared the 2 cores), and the minimum is the estimate
    least disturbed by that."""
    fn()  # warm-up (and the first-call kernel build)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return min(times)


def shape_timings(shapes: set[tuple[int, int]], group_size: int, threads: int) -> dict[str, dict[str, float]]:
    """{"<in>x<out>": {"fp32": us, "int8": us, "int4": us}} at batch 1 for every (in, out) shape."""
    from costopt.quantization.algorithms import rtn_int4
    from costopt.kernels.ops import int4_gemm, int8_gemm, pack_int4
    from costopt.quantization.modules import quantize_per_channel

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for k, n in sorted(shapes):
        w = torch.randn(n, k, generator=gen) * 0.02
        x = torch.randn(1, k, generator=gen)
        q8, s8 = quantize_per_channel(w)
        q4, s4, z4 = rtn_int4(w, group_size)
        packed = pack_int4(q4)
        out[f"{k}x{n}"] = {
            "fp32": _time_us(lambda: F.linear(x, w)),
            "int8": _time_us(lambda: int8_gemm(x, q8, s8)),
            "int4": _time_us(lambda: int4_gemm(x, packed, s4, z4, group_size)),
        }
    return out


def part_costs(model: nn.Module, group_size: int, threads: int) -> dict[str, Any]:
    """{"parts": {part: {precision: us}}, "shapes": shape timings} for every block part of `model`."""
    units = parts(model)
    linears = {n: model.get_submodule(n) for names in units.values() for n in names}
    shapes = {(m.in_features, m.out_features) for m in linears.values()}
    timings = shape_timings(shapes, group_size, threads)
    table = {part: {prec: sum(timings[f"{linears[n].in_features}x{linears[n].out_features}"][prec]
                              for n in names) for prec in ("fp32", "int8", "int4")}
             for part, names in units.items()}
    return {"parts": table, "shapes": timings, "unit": "microseconds per decode step (batch 1)"}
