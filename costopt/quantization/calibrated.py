"""Calibrated quantization passes: GPTQ, AWQ and static INT8 (SmoothQuant), one block at a time.

`apply_plan(model, plan, cfg, calibration)` turns every block Linear named in `plan` into its quantized
module. Kinds that need data (INT4 by GPTQ or AWQ, static W8A8) are fitted on the inputs that Linear
actually sees on the calibration set *after the blocks before it were quantized*, so errors do not
compound unseen (the sequential scheme of GPTQ's reference code and llm-compressor). Per block: one
pass over the calibration batches with input hooks collects statistics (the Hessian X^T X for GPTQ, a
row sample for AWQ and SmoothQuant, per-channel max |x| for the static observer), the Linears are
replaced, and a second pass pushes the batches through the quantized block to the next one.
Linears of one block all see inputs from the float block (GPTQ's "true sequential" order inside a
block is not done: it would cost two more passes per block).

The algorithms themselves are pure tensor functions in `costopt.quantization.algorithms`.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from costopt.quantization import algorithms as calib
from costopt.quantization.capture import State, decoder, first_block_inputs, run_block, watch_inputs
from costopt.quantization.modules import Int4Linear, Int8Linear, W8A8Linear, set_module

SEQUENTIAL = True  # fit block i on the quantized blocks' outputs (GPTQ's reference); False: float inputs
MAX_ROWS = 4096  # activation rows kept per Linear for the AWQ / SmoothQuant searches (memory bound)


class Collector:
    """Statistics of one Linear's inputs over the calibration set."""

    def __init__(self, in_features: int, hessian: bool, rows: bool) -> None:
        self.hessian = calib.HessianAccumulator(in_features) if hessian else None
        self.keep_rows = rows
        self.rows: list[torch.Tensor] = []
        self.absmax = torch.zeros(in_features)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:  # x: [n, in]
        x = x.detach().float()
        if self.hessian is not None:
            self.hessian.add(x)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        if self.keep_rows:
            self.rows.append(x.clone())
        self.count += x.shape[0]

    def sample(self) -> torch.Tensor:
        """Up to MAX_ROWS rows, evenly strided over the whole set (deterministic)."""
        x = torch.cat(self.rows)
        if x.shape[0] > MAX_ROWS:
            x = x[torch.linspace(0, x.shape[0] - 1, MAX_ROWS).long()]
        return x


def _needs_data(kind: str, method: str) -> tuple[bool, bool]:
    """(Hessian, row sample) wanted for a Linear of this kind."""
    if kind == "int4":
        return method == "gptq", method == "awq"
    if kind == "w8a8_static":
        return False, True
    return False, False


def build(kind: str, lin: nn.Linear, cfg: Any, stats: Collector | None) -> nn.Module:
    """The quantized replacement of `lin` (fp32) for one plan kind."""
    w = lin.weight.detach().float()  # [out, in]
    if kind == "int8":
        return Int8Linear.from_linear(lin)
    if kind == "w8a8_dynamic":
        return W8A8Linear.from_linear(lin)
    if kind == "w8a8_static":
        return _static_w8a8(lin, w, cfg, stats)
    if kind == "int4":
        g, method = cfg.group_size, cfg.method
        if method == "gptq":
            q, scale, zero = calib.gptq_int4(w, stats.hessian.matrix(), g, damp=cfg.damp)
            return Int4Linear.from_codes(lin, q, scale, zero, g)
        if method == "awq":  # scale search, then clipping search on the scaled weights (AWQ's two steps)
            x = stats.sample()
            s = calib.awq_scales(w, x, g).scales  # [in]
            clip = calib.clip_search(w * s[None, :], x / s[None, :], g)
            q, scale, zero = calib.rtn_int4(w * s[None, :], g, clip=clip)
            return Int4Linear.from_codes(lin, q, scale, zero, g, inv_scale=1.0 / s)
        q, scale, zero = calib.rtn_int4(w, g)
        return Int4Linear.from_codes(lin, q, scale, zero, g)
    raise ValueError(f"plan kind {kind!r}: expected int4, int8, w8a8_dynamic, w8a8_static or fp32")


def _static_w8a8(lin: nn.Linear, w: torch.Tensor, cfg: Any, stats: Collector) -> W8A8Linear:
    """Static per-tensor activation scale from the min/max observer, after SmoothQuant where it helps."""
    smooth = None
    if cfg.smoothquant:
        alpha, s, _ = calib.best_smoothing(stats.sample(), w, alphas=(0.0, *cfg.alphas))
        smooth = s if alpha > 0 else None
    absmax = stats.absmax if smooth is None else stats.absmax / smooth  # [in]
    act_scale = float(absmax.max().clamp(min=1e-8)) / 127.0
    return W8A8Linear.from_linear(lin, act_scale=act_scale, smooth=smooth)


def _layer_index(name: str) -> int:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if m is None:
        raise ValueError(f"{name}: not inside a decoder block")
    return int(m.group(1))


def apply_plan(model: nn.Module, plan: dict[str, str], cfg: Any, calibration: Any,
               sequential: bool = SEQUENTIAL) -> nn.Module:
    """Replace every Linear in `plan` (full name -> kind) in place; calibrated kinds fit on `calibration`.

    sequential: block i is fitted on inputs computed through the quantized blocks before it (else
    through the float blocks, one pass per block)."""
    method = getattr(cfg, "method", "rtn")
    wanted = {n: _needs_data(k, method) for n, k in plan.items() if k != "fp32"}
    if not any(h or r for h, r in wanted.values()):
        for name in wanted:
            set_module(model, name, build(plan[name], model.get_submodule(name), cfg, None))
        return model
    _, layers, _, _ = decoder(model)
    states = first_block_inputs(model, calibration.batches, calibration.skip)
    by_layer: dict[int, list[str]] = {}
    for name in wanted:
        by_layer.setdefault(_layer_index(name), []).append(name)
    for i, layer in enumerate(tqdm(layers, desc=f"calibrate {cfg.scheme}", unit="block")):
        names = by_layer.get(i, [])
        collectors = {n: Collector(model.get_submodule(n).in_features, *wanted[n])
                      for n in names if any(wanted[n])}
        outputs = None
        if collectors:
            modules = {n: model.get_submodule(n) for n in collectors}
            with watch_inputs(modules, states, lambda n, x: collectors[n].add(x)) as select:
                outputs = []
                for j, state in enumerate(states):
                    select(j)
                    outputs.append(run_block(layer, state.hidden, state.kwargs))
        for name in names:
            set_module(model, name, build(plan[name], model.get_submodule(name), cfg, collectors.get(name)))
        collectors.clear()
        if sequential or outputs is None:
            states = [s.advance(layer) for s in states]
        else:
            states = [State(out, s.kwargs, s.mask) for out, s in zip(outputs, states)]
    return model
