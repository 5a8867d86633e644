"""The teacher's targets, computed once so training never runs the teacher: for every training sequence
(a prompt and the teacher's own greedy answer) its top-k log-probabilities at every position, and its
hidden states at the outputs of the blocks the student keeps and supervises.

Training prompts never come from the held-out sets: the calibration prompts (whose fp32 answers the
eval data already holds), the serving request log's prompts when it has any, then the chat pool past
the held-out and calibration prompts (`costopt.evaluation.evaldata.chat_pool`). Every prompt is
checked against the held-out and crosscheck sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

TOP_K = 32


@dataclass
class Targets:
    """Padded training sequences and what the teacher says about them."""
    input_ids: torch.Tensor  # [N, S] int64, right-padded
    attention_mask: torch.Tensor  # [N, S] int64
    loss_mask: torch.Tensor  # [N, S] bool: positions whose next token is supervised (not padding, not the shared prefix)
    top_logprobs: torch.Tensor  # [N, S, K] float32, the teacher's log-probs at T = 1
    top_ids: torch.Tensor  # [N, S, K] int64
    hidden: torch.Tensor  # [N, S, L, H] float16: teacher block outputs at the supervised layers
    hidden_layers: list[int]  # teacher block indices of `hidden`'s L axis
    mass: float  # mean probability the top k hold

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "loss_mask": self.loss_mask, "top_logprobs": self.top_logprobs, "top_ids": self.top_ids,
                "hidden": self.hidden, "hidden_layers": torch.tensor(self.hidden_layers),
                "mass": torch.tensor(self.mass)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Targets":
        return cls(t["input_ids"], t["attention_mask"], t["loss_mask"].bool(), t["top_logprobs"], t["top_ids"],
                   t["hidden"], t["hidden_layers"].tolist(), float(t["mass"]))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def training_conversations(seed: int, used: int, held_out: Iterable[dict], excluded: Iterable[dict],
                           calibration: Iterable[dict], log_rows: Iterable[dict], n: int) -> list[dict]:
    """Up to `n` training rows {"messages", "reference"?}: the calibration rows (their fp32 answers are
    already made), then request-log prompts (real traffic), then pool prompts past the first `used`;
    none equal to a held-out or excluded (crosscheck) prompt, no duplicates."""
    from costopt.evaluation.evaldata import chat_pool

    def user(messages: list[dict]) -> str:
        return _norm(" ".join(m["content"] for m in messages if m["role"] == "user"))

    banned = {user(r["messages"]) for r in [*held_out, *excluded]}
    out: list[dict] = []
    seen: set[str] = set()
    candidates: list[dict] = [{"messages": r["messages"], "reference": r.get("reference")} for r in calibration]
    candidates += [{"messages": r["messages"]} for r in log_rows if r.get("messages")]
    candidates += [{"messages": m} for _, m in chat_pool(seed)[used:]]
    for row in candidates:
        key = user(row["messages"])
        if key in banned or key in seen or not key:
            continue
        seen.add(key)
        out.append(row)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def compute(teacher: Any, tok: Any, texts: list[str], hidden_layers: list[int], max_len: int, skip: int,
            k: int = TOP_K, batch: int = 8, progress: bool = True) -> Targets:
    """The teacher's top-k log-probs and the outputs of `hidden_layers` (teacher block indices) for each
    text, truncated to `max_len` tokens; the first `skip` positions (the template's shared prefix) are
    not supervised."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    return compute_ids(teacher, enc["input_ids"], enc["attention_mask"], hidden_layers, skip, k, batch, progress)


@torch.no_grad()
def compute_ids(teacher: Any, ids: torch.Tensor, attn: torch.Tensor, hidden_layers: list[int], skip: int,
                k: int = TOP_K, batch: int = 8, progress: bool = True) -> Targets:
    """`compute` on token ids already padded on the right ([N, S] each)."""
    from tqdm import tqdm

    n, s = ids.shape
    k = min(k, teacher.config.vocab_size)
    top_lp = torch.zeros(n, s, k)
    top_id = torch.zeros(n, s, k, dtype=torch.long)
    hidden = torch.zeros(n, s, len(hidden_layers), teacher.config.hidden_size, dtype=torch.float16)
    mass_sum, mass_n = 0.0, 0
    captured: dict[int, torch.Tensor] = {}
    layers = teacher.model.layers
    handles = [layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in hidden_layers]
    try:
        for start in tqdm(range(0, n, batch), desc="teacher targets", unit="batch", disable=not progress):
            sl = slice(start, start + batch)
            logits = teacher(input_ids=ids[sl], attention_mask=attn[sl]).logits.float()
            lp = logits.log_softmax(-1)
            v, i = lp.topk(k, dim=-1)
            top_lp[sl], top_id[sl] = v, i
            m = attn[sl].bool()
            mass_sum += float(v.exp().sum(-1)[m].sum())
            mass_n += int(m.sum())
            for j, layer in enumerate(hidden_layers):
                hidden[sl, :, j] = captured[layer].to(torch.float16)
    finally:
        for h in handles:
            h.remove()
    loss_mask = attn.bool().clone()
    loss_mask[:, :skip] = False
    loss_mask[:, :-1] &= attn[:, 1:].bool()  # the last real token has no next token to predict
    loss_mask[:, -1] = False
    return Targets(ids, attn, loss_mask, top_lp, top_id, hidden, list(hidden_layers), mass_sum / max(1, mass_n))
