"""Shadow judgement of one answer: the current variant teacher-forced on the canary's own tokens.

The canary answered a request with tokens a_1..a_k after prompt p. Both variants are run over p + a
in one forward each (their own runtimes: llama.cpp's logits for a GGUF variant, never a torch twin),
and at every answer position the two next-token distributions are compared: the request's mean
KL(current || canary) in nats/token and the share of positions where both put the same token first.
This is what `validate` measures against fp32 on held-out prompts, measured here on live traffic and
against the variant in service. The predictor runs it (`POST /v2/compare`); the gateway feeds the
result to `costopt.online.canary.CanaryJudge`.

    scorer = load_shadow_scorer(ws, "gguf_q8_0")
    kl, top1 = compare(answer_logits(ref, prompt, answer), answer_logits(cand, prompt, answer))
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from costopt.evaluation.metrics import token_kl, top1_match

BASELINE = "fp32"  # the ingested model, scored as is


def load_shadow_scorer(ws: Any, name: str) -> Any:
    """An HF-like causal LM (`m(input_ids=, attention_mask=).logits`) for variant `name`, on its own runtime."""
    if name == BASELINE:
        from costopt.models.source import load_model_dir

        return load_model_dir(ws.model_dir)[0]
    from costopt.runtimes.registry import load_scorer

    return load_scorer(ws, name)[0]


@torch.no_grad()
def answer_logits(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> torch.Tensor:
    """[len(answer), vocab] float32: the logits that predict each answer token, teacher-forced."""
    if not prompt_ids or not answer_ids:
        raise ValueError("answer_logits: prompt and answer need at least one token each")
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long)  # [1, T]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # [1, T, vocab]
    logits = torch.as_tensor(logits)[0].float()
    p = len(prompt_ids)
    return logits[p - 1:p - 1 + len(answer_ids)]


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || candidate) in nats/token, top-1 agreement) over the answer's positions."""
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"compare: expected two [positions, vocab] tensors of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(candidate.shape)}")
    if not (torch.isfinite(reference).all() and torch.isfinite(candidate).all()):
        raise FloatingPointError("compare: non-finite logits")
    return float(token_kl(reference, candidate).mean()), float(top1_match(reference, candidate).mean())
