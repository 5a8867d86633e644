"""Per-part quantization sensitivity: the KL divergence from fp32 when one part alone is quantized.

A *part* is the attention or the MLP of one decoder block (`costopt.quantization.schemes.parts`), 60 for SmolLM2-135M.
For each part and each precision (INT4 round-to-nearest at the search's group size, INT8 per channel)
we quantize that part only, run the sensitivity prompts from that block onwards and measure the mean
token KL against fp32. Hidden states entering every block are cached from one fp32 pass
(`costopt.quantization.capture`), so a part at depth i costs (layers - i) blocks plus the head, not a full forward.

The quantized weights are simulated in fp32 (de-quantized into an ordinary Linear): the numbers equal
the INT4/INT8 kernels' up to summation order, and every forward here is a large batch where the
kernels de-quantize anyway. INT4 is measured with RTN, not GPTQ: the scan then ranks parts by how much
rounding hurts them, and its absolute KL over-estimates what GPTQ leaves, which errs on the safe side
when the search adds part KLs up to predict a mixed variant.

    scan = sensitivity_scan(model, batches, skip, precisions=("int4", "int8"), group_size=64)
    scan["parts"]["layers.3.mlp"]["int4"]  # nats/token
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from costopt.quantization.capture import State, decoder, first_block_inputs, head_logits
from costopt.evaluation.metrics import Reference
from costopt.quantization.modules import set_module
from costopt.quantization.schemes import parts

def simulated(linear: nn.Linear, precision: str, group_size: int) -> nn.Linear:
    """An fp32 Linear holding `linear`'s weight after INT4 (RTN, grouped) or INT8 (per channel) rounding."""
    from costopt.quantization.algorithms import dequant_int4, rtn_int4
    from costopt.quantization.modules import quantize_per_channel

    w = linear.weight.detach().float()
    if precision == "int4":
        q, scale, zero = rtn_int4(w, group_size)
        w_hat = dequant_int4(q, scale, zero, group_size)
    elif precision == "int8":
        q8, s8 = quantize_per_channel(w)
        w_hat = q8.float() * s8[:, None]
    else:
        raise ValueError(f"precision {precision!r}: expected 'int4' or 'int8'")
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.weight = nn.Parameter(w_hat, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily put `replacements` (full module name -> module) into the model."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_module(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            set_module(model, name, module)


def _layer_of(part: str) -> int:
    return int(part.split(".")[1])


def _run_from(model: nn.Module, layers: nn.ModuleList, start: int, state: State) -> torch.Tensor:
    for layer in layers[start:]:
        state = state.advance(layer)
    return head_logits(model, state)


def sensitivity_scan(model: nn.Module, batches: list[dict[str, torch.Tensor]], skip: int,
                     precisions: tuple[str, ...], group_size: int) -> dict[str, Any]:
    """{"parts": {part: {precision: mean KL nats/token}}, "tokens": n, "seconds": s}."""
    t0 = time.perf_counter()
    _, layers, _, _ = decoder(model)
    depth = [first_block_inputs(model, batches, skip)]  # depth[i]: the states entering block i
    for layer in layers:
        depth.append([s.advance(layer) for s in depth[-1]])
    refs = [Reference(head_logits(model, s)) for s in depth[-1]]  # fp32 log-probs, [n, vocab] per batch
    tokens = sum(int(r.top1.shape[0]) for r in refs)
    table: dict[str, dict[str, float]] = {}
    units = parts(model)
    jobs = [(part, prec) for part in units for prec in precisions]
    for part, prec in tqdm(jobs, desc="sensitivity", unit="part"):
        start = _layer_of(part)
        repl = {n: simulated(model.get_submodule(n), prec, group_size) for n in units[part]}
        total = 0.0
        with swapped(model, repl):
            for state, ref in zip(depth[start], refs):
                total += float(ref.kl(_run_from(model, layers, start, state)).double().sum())
        table.setdefault(part, {})[prec] = total / max(tokens, 1)
    return {"parts": table, "tokens": tokens, "precisions": list(precisions), "group_size": group_size,
            "int4_method": "rtn", "seconds": round(time.perf_counter() - t0, 1)}


def ranking(scan: dict[str, Any], precision: str) -> list[str]:
    """Parts from most to least sensitive at `precision`."""
    table = scan["parts"]
    return sorted(table, key=lambda p: table[p][precision], reverse=True)
