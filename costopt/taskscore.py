"""Multiple-choice scoring by log-likelihood, as lm-eval scores it.

For an item `{"context": ..., "choices": [" a", " b", ...], "answer": i}` the model reads
context + choice, and the choice's score is the summed log-probability of its own tokens. The
highest score wins (`predict`); accuracy is compared with `chance_accuracy`, the expected accuracy of
guessing. Context and choice are tokenized separately and their ids concatenated, so the choice's
tokens are exactly known even where BPE would merge across the boundary.

Works for any causal LM whose forward returns `.logits` (fp32, bf16, quantized): logits are cast to
float32 before the softmax.

    lls = choice_logliks(model, tok, items)          # [[ll per choice] per item]
    acc = sum(p == it["answer"] for p, it in zip(predict(lls), items)) / len(items)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class _Seq:
    item: int  # index into items
    choice: int  # index into the item's choices
    ids: list[int]  # context ids + choice ids
    n_choice: int  # the last n_choice ids are the scored choice tokens


def encode_items(tokenizer: Any, items: Sequence[dict]) -> list[_Seq]:
    """One sequence per (item, choice); the context gets the tokenizer's usual special tokens (e.g. BOS)."""
    seqs = []
    for i, item in enumerate(items):
        ctx = tokenizer(item["context"], add_special_tokens=True)["input_ids"]
        if not ctx:
            raise ValueError(f"taskscore: item {item.get('id', i)} has an empty context; the first choice "
                             f"token needs at least one token to condition on")
        for j, choice in enumerate(item["choices"]):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"taskscore: item {item.get('id', i)} choice {j} ({choice!r}) has no tokens")
            seqs.append(_Seq(i, j, list(ctx) + list(cont), len(cont)))
    return seqs


def _device(model: Any) -> Any:
    import torch

    device = getattr(model, "device", None)
    if device is not None:
        return device
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _score_batch(model: Any, batch: list[_Seq], pad_id: int) -> list[float]:
    """Summed choice log-probs for one right-padded batch (right padding keeps positions 0..n-1)."""
    import torch

    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for b, s in enumerate(batch):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        mask[b, :len(s.ids)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
    out = []
    for b, s in enumerate(batch):
        n = len(s.ids)
        # the logits at position t predict token t+1, so choice tokens n-c..n-1 read rows n-c-1..n-2
        rows = logits[b, n - s.n_choice - 1:n - 1].float().log_softmax(dim=-1)  # [c, V]
        targets = ids[b, n - s.n_choice:n].to(rows.device)  # [c]
        out.append(float(rows.gather(-1, targets[:, None]).sum()))
    return out


def choice_logliks(model: Any, tokenizer: Any, items: Sequence[dict], batch_size: int = 16,
                   progress: bool = True) -> list[list[float]]:
    """Summed log-probability (nats) of each choice's tokens given the item's context."""
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"taskscore: batch_size must be >= 1, got {batch_size}")
    seqs = encode_items(tokenizer, items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda k: (-len(seqs[k].ids), k))  # similar lengths share a batch
    scores: list[float] = [0.0] * len(seqs)
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="score tasks", unit="batch", disable=not progress):
            chunk = order[start:start + batch_size]
            for k, value in zip(chunk, _score_batch(model, [seqs[k] for k in chunk], pad_id)):
                scores[k] = value
    out: list[list[float]] = [[0.0] * len(item["choices"]) for item in items]
    for s, value in zip(seqs, scores):
        out[s.item][s.choice] = value
    return out


def predict(logliks: Sequence[Sequence[float]]) -> list[int]:
    """Index of the highest log-likelihood per item; ties go to the first such choice."""
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in logliks]


def chance_accuracy(items: Sequence[dict]) -> float:
    """Expected accuracy of a uniform guess: the mean of 1 / number of choices."""
    if not items:
        raise ValueError("taskscore: chance_accuracy needs at least one item")
    return sum(1.0 / len(item["choices"]) for item in items) / len(items)
