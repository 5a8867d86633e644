"""Schedules the engine tests drive on every runtime's engine: the engines share their slot
bookkeeping (`costopt.runtimes.slots.SlotEngine`), so one scenario checks both."""
from __future__ import annotations

import pytest

from costopt.runtimes.slots import SamplingParams, SlotEngine


def wide_llama(dtype=None):
    """A tiny random Llama with a wide init (tokens vary) and untied head, for engine scenarios; float64
    (`dtype`) makes batched and solo arithmetic unable to flip an argmax."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval()
    return model.to(dtype) if dtype is not None else model


def solo_greedy(model, prompt, n, stops=()):
    """The reference: one prompt alone, a plain greedy loop over the model's own forward and cache."""
    import torch

    out, cache, ids = [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            res = model(input_ids=ids, cache=cache, use_cache=True)
            cache, tok = res.cache, int(res.logits[0, -1].argmax())
            out.append(tok)
            if tok in stops:
                break
            ids = torch.tensor([[tok]])
    return out


def drive(engine, schedule, cancels=None, max_steps=400):
    """A driver: before step k, cancel cancels[k], queue arrivals schedule[k] = [(seq_id, prompt, params)]
    and admit queued ones first come first served while slots are free (max_batch - running).

    Returns ({seq_id: tokens}, {seq_id: finish_reason}, [events per step]).
    """
    cancels = cancels or {}
    tokens, reasons, log, queue = {}, {}, [], []
    last_arrival = max(list(schedule) + list(cancels), default=0)
    for step in range(max_steps):
        for seq_id in cancels.get(step, []):
            engine.cancel(seq_id)
        queue += schedule.get(step, [])
        while queue and engine.running < engine.max_batch:
            seq_id, prompt, params = queue.pop(0)
            engine.add(seq_id, prompt, params)
            tokens[seq_id] = []
        if not engine.has_work() and not queue and step > last_arrival:
            return tokens, reasons, log
        events = engine.step()
        log.append(events)
        for ev in events:
            assert ev.seq_id not in reasons, f"event {ev} after {ev.seq_id} finished ({reasons[ev.seq_id]})"
            if ev.token_id is not None:
                tokens.setdefault(ev.seq_id, []).append(ev.token_id)
            if ev.finish_reason is not None:
                reasons[ev.seq_id] = ev.finish_reason
    raise AssertionError(f"engine still busy after {max_steps} steps")


def pause_resume(engine: SlotEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Run a, b, c (12 tokens each); pause a and c after two steps (they keep their slots and are not
    stepped), let d (3 tokens) join and run meanwhile, cancel c, resume a, and run to the end.
    Returns every sequence's tokens; the caller compares them with each prompt's solo run."""
    for name in "abc":
        engine.add(name, prompts[name], SamplingParams(max_new_tokens=12))
    got: dict[str, list[int]] = {name: [] for name in prompts}

    def step() -> None:
        for ev in engine.step():
            if ev.token_id is not None:
                got[ev.seq_id].append(ev.token_id)

    step(), step()
    engine.pause("a")
    engine.pause("c")
    assert (engine.running, engine.paused) == (3, 2), "paused sequences keep their slots"
    with pytest.raises(ValueError, match="pause: 'a' is not a running"):
        engine.pause("a")
    engine.add("d", prompts["d"], SamplingParams(max_new_tokens=3))
    step(), step(), step()
    assert len(got["a"]) == 2 and len(got["c"]) == 2, "paused sequences are not stepped"
    engine.cancel("c")
    engine.resume("a")
    with pytest.raises(ValueError, match="resume: 'c' is not paused"):
        engine.resume("c")
    while engine.has_work():
        step()
    return got
