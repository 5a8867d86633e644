"""Run a decoder-only model one block at a time, for calibration and sensitivity.

Calibrated schemes (GPTQ, AWQ, static INT8) and the per-layer sensitivity scan need the inputs of each
block on real text, and need them again after the blocks before it were quantized. Running the whole
model for every block costs O(layers^2) forwards; instead we capture the first block's inputs once (a
pre-hook that stops the forward there), keep the hidden states of every calibration batch in memory
and push them through one block at a time, as GPTQ's reference code and llm-compressor do. Layer
kwargs (causal mask, rotary position embeddings) are the same for every block of one batch, so they
are captured once at block 0 and reused.

Works for Llama-style models from transformers (`model.model.layers`, `.norm`, `.rotary_emb`,
`model.lm_head`), which covers the built-in SmolLM2 and most open decoders; other layouts raise a
ValueError naming what is missing.

    batches = encode(tok, texts, max_len=128, batch=8)
    states = first_block_inputs(model, batches)        # [State], one per batch
    for i, layer in enumerate(blocks(model)):
        with collect_inputs(layer_linears, states) as seen: ...
        states = [s.advance(layer) for s in states]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the capture hook to end a forward at block 0."""


@dataclass
class State:
    """One calibration batch at some depth: hidden states, the layer kwargs, and the real-token mask."""
    hidden: torch.Tensor  # [B, T, H]
    kwargs: dict[str, Any]  # attention_mask, position_embeddings, position_ids ... as the model passes them
    mask: torch.Tensor  # [B, T] bool, True at real (non-pad) tokens

    def advance(self, layer: nn.Module) -> "State":
        return State(run_block(layer, self.hidden, self.kwargs), self.kwargs, self.mask)


def decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """(embedding, blocks, final norm, LM head) of a Llama-style causal LM."""
    inner = getattr(model, "model", None)
    missing = [n for n, ok in (("model.model", inner is not None),
                               ("model.model.layers", hasattr(inner, "layers")),
                               ("model.model.norm", hasattr(inner, "norm")),
                               ("model.lm_head", hasattr(model, "lm_head"))) if not ok]
    if missing:
        raise ValueError(f"{type(model).__name__}: expected a Llama-style decoder; missing {missing}")
    return model.get_input_embeddings(), inner.layers, inner.norm, model.lm_head


def encode(tok: Any, texts: list[str], max_len: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches of `texts`, truncated to `max_len` tokens."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return [tok(texts[i:i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
            for i in range(0, len(texts), batch)]


def run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


def first_block_inputs(model: nn.Module, batches: list[dict[str, torch.Tensor]], skip: int = 0) -> list[State]:
    """The inputs of block 0 for every batch (embedding output plus kwargs), without running the rest.

    The first `skip` positions (a prefix every sequence shares, such as a chat template's system block)
    still flow through attention but are left out of `State.mask`, so statistics do not weight one
    repeated context once per sequence."""
    _, layers, _, _ = decoder(model)
    seen: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    states = []
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for enc in batches:
            with torch.inference_mode(), contextlib.suppress(_Stop):
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
            mask = enc["attention_mask"].bool().clone()
            mask[:, :skip] = False
            states.append(State(seen["hidden"], seen["kwargs"], mask))
    finally:
        handle.remove()
    return states


def head_logits(model: nn.Module, state: State) -> torch.Tensor:
    """Logits at the real tokens of a batch whose hidden states passed every block: [N, vocab]."""
    _, _, norm, head = decoder(model)
    with torch.inference_mode():
        return head(norm(state.hidden[state.mask])).float()


@contextlib.contextmanager
def watch_inputs(modules: dict[str, nn.Module], states: list[State],
                 sink: Callable[[str, torch.Tensor], None]) -> Iterator[Callable[[int], None]]:
    """Call `sink(name, x)` with each module's input rows at real tokens ([n, in_features]).

    Yields `select(i)`: call it before running batch i so the hooks know which tokens are real.
    """
    current: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(_module, args):
            x = args[0]
            sink(name, x[current["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]

    def select(i: int) -> None:
        current["mask"] = states[i].mask

    try:
        yield select
    finally:
        for h in handles:
            h.remove()
