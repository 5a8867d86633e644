"""Multiple-choice scoring by log-likelihood, as lm-eval scores it.

For an item `{"context": ..., "choices": [" a", " b", ...], "answer": i}` the model reads
context + choice, and the choice's score is the summed log-probability of its own tokens. The
highest score wins (`predict`); accuracy is compared with `chance_accuracy`, the expected accuracy of
guessing. Context and choice are tokenized separately and their ids concatenated, so the choice's
tokens are exactly known even where BPE would merge across the boundary. Choices that share a
prefix share one forward pass (`plan_sequences`): the same numbers for about a quarter of the tokens.

Works for any causal LM whose forward returns `.logits` (fp32, bf16, quantized): logits are cast to
float32 before the softmax.

    lls = choice_logliks(model, tok, items)          # [[ll per choice] per item]
    acc = sum(p == it["answer"] for p, it in zip(predict(lls), items)) / len(items)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class _Choice:
    item: int  # index into items
    choice: int  # index into the item's choices
    seq: int  # index of the sequence whose logits score it
    start: int  # position of the choice's first token (= context length)
    tokens: tuple[int, ...]  # the choice's token ids


def plan_sequences(tokenizer: Any, items: Sequence[dict]) -> tuple[list[list[int]], list[_Choice]]:
    """The forward passes needed to score every choice, and where each choice reads its log-probs.

    Choice tokens c1..ck are predicted by the logits at positions len(ctx)-1 .. len(ctx)+k-2, so the
    model only needs to read context + c1..c(k-1); and since attention is causal, a sequence that is a
    prefix of another needs no pass of its own. Single-token choices (" Paris") thus share one
    context-only pass, and " 15" vs " 16" share context + " 1": about a quarter of lm-eval's tokens.
    """
    seqs: list[list[int]] = []
    choices: list[_Choice] = []
    for i, item in enumerate(items):
        ctx = list(tokenizer(item["context"], add_special_tokens=True)["input_ids"])
        if not ctx:
            raise ValueError(f"taskscore: item {item.get('id', i)} has an empty context; the first choice "
                             f"token needs at least one token to condition on")
        conts = [tuple(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in item["choices"]]
        for j, cont in enumerate(conts):
            if not cont:
                raise ValueError(f"taskscore: item {item.get('id', i)} choice {j} "
                                 f"({item['choices'][j]!r}) has no tokens")
        mine: list[int] = []  # this item's sequence indices, longest first
        for j in sorted(range(len(conts)), key=lambda j: (-len(conts[j]), j)):
            need = ctx + list(conts[j][:-1])
            host = next((k for k in mine if seqs[k][:len(need)] == need), None)
            if host is None:
                host = len(seqs)
                seqs.append(need)
                mine.append(host)
            choices.append(_Choice(i, j, host, len(ctx), conts[j]))
    return seqs, choices


def _device(model: Any) -> Any:
    import torch

    device = getattr(model, "device", None)
    if device is not None:
        return device
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _forward(model: Any, batch: list[list[int]], pad_id: int) -> Any:
    """Logits [B, T, V] for a right-padded batch (right padding keeps every position at 0..n-1)."""
    import torch

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for b, s in enumerate(batch):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    device = _device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


def _choice_loglik(logits_row: Any, c: _Choice) -> float:
    """Summed log-prob of c.tokens; logits_row [T, V] is its host sequence's logits."""
    import torch

    rows = logits_row[c.start - 1:c.start - 1 + len(c.tokens)].float().log_softmax(dim=-1)  # [k, V]
    targets = torch.tensor(c.tokens, device=rows.device)  # [k]
    return float(rows.gather(-1, targets[:, None]).sum())


def choice_logliks(model: Any, tokenizer: Any, items: Sequence[dict], batch_size: int = 16,
                   progress: bool = True) -> list[list[float]]:
    """Summed log-probability (nats) of each choice's tokens given the item's context."""
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"taskscore: batch_size must be >= 1, got {batch_size}")
    seqs, choices = plan_sequences(tokenizer, items)
    by_seq: dict[int, list[_Choice]] = {}
    for c in choices:
        by_seq.setdefault(c.seq, []).append(c)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda k: (-len(seqs[k]), k))  # similar lengths share a batch
    out: list[list[float]] = [[0.0] * len(item["choices"]) for item in items]
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="score tasks", unit="batch",
                          disable=not progress):
            chunk = order[start:start + batch_size]
            logits = _forward(model, [seqs[k] for k in chunk], pad_id)  # [B, T, V]
            for b, k in enumerate(chunk):
                for c in by_seq[k]:
                    out[c.item][c.choice] = _choice_loglik(logits[b], c)
    return out


def predict(logliks: Sequence[Sequence[float]]) -> list[int]:
    """Index of the highest log-likelihood per item; ties go to the first such choice."""
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in logliks]


def chance_accuracy(items: Sequence[dict]) -> float:
    """Expected accuracy of a uniform guess: the mean of 1 / number of choices."""
    if not items:
        raise ValueError("taskscore: chance_accuracy needs at least one item")
    return sum(1.0 / len(item["choices"]) for item in items) / len(items)


def generated_correct(text: str, item: dict) -> bool:
    """Whether a generated continuation of the item's context answers it: its first word (after spaces)
    is the right choice, case-insensitive, the choice not merely a prefix of a longer word or number
    (" 1" does not answer " 12"). For judging generated answers, where `predict` ranks given choices."""
    answer = item["choices"][item["answer"]].strip().lower()
    said = text.lstrip().lower()
    if not answer or not said.startswith(answer):
        return False
    rest = said[len(answer):]
    return not rest or not rest[0].isalnum()
