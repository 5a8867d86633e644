"""The distillation loss: KL to the teacher's logits under a temperature schedule, plus hidden-state
supervision on mapped layers (the seed paper's two techniques).

- **Logits.** The teacher's distribution is stored as its top-k log-probabilities per position (k = 32
  by default; `Targets.mass` records the share of probability they hold, and the distill phase reports
  it). At temperature T both sides are softened: the teacher's top-k renormalized
  at T, the student's full softmax at T read at the same ids. The loss is T^2 * KL(teacher_T || student_T)
  (Hinton's scaling keeps gradients comparable as T moves), averaged over the real positions.
- **Schedule.** T falls from `t_start` to `t_end` over training (cosine): soft targets first, the
  exact distribution at the end.
- **Hidden states.** Student block j is teacher block `kept[j]`, so their outputs are compared: the
  squared error relative to the teacher's norm, ||s - t||^2 / ||t||^2 per position (scale-free: the
  residual stream grows along depth), averaged over positions and the mapped layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def temperature(step: int, total: int, t_start: float, t_end: float) -> float:
    """Cosine from t_start (step 0) to t_end (the last step)."""
    if total <= 1:
        return t_end
    frac = min(1.0, max(0.0, step / (total - 1)))
    return t_end + (t_start - t_end) * 0.5 * (1 + math.cos(math.pi * frac))


def kd_loss(student_logits: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor,
            mask: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) over the positions where `mask` is true.

    student_logits [B, S, V]; top_logprobs, top_ids [B, S, K] (the teacher's log-probs at T = 1);
    mask [B, S] bool."""
    if t <= 0:
        raise ValueError(f"temperature: expected > 0, got {t}")
    s = student_logits[mask].float() / t  # [N, V]
    s_logp = s.log_softmax(-1).gather(-1, top_ids[mask])  # [N, K]
    p_logp = (top_logprobs[mask].float() / t).log_softmax(-1)  # renormalized over the top k at T
    kl = (p_logp.exp() * (p_logp - s_logp)).sum(-1)
    return kl.mean() * t * t if kl.numel() else student_logits.sum() * 0


def full_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 t: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) over the full vocabulary at the positions where `mask` is true:
    the GPU path's loss, where the teacher runs live (`costopt.distill.online`). Equals `kd_loss` when
    the teacher's top k hold all of its probability."""
    if t <= 0:
        raise ValueError(f"temperature: expected > 0, got {t}")
    p_logp = (teacher_logits[mask].float() / t).log_softmax(-1)
    s_logp = (student_logits[mask].float() / t).log_softmax(-1)
    kl = (p_logp.exp() * (p_logp - s_logp)).sum(-1)
    return kl.mean() * t * t if kl.numel() else student_logits.sum() * 0


def hidden_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
    """Mean over mapped layers of ||s - t||^2 / ||t||^2 over the positions where `mask` is true."""
    if not student_hidden:
        raise ValueError("hidden_loss: no mapped layers")
    total = student_hidden[0].new_zeros(())
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        s, t = s[mask].float(), t[mask].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / len(student_hidden)


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position at T = 1 over the full vocabulary: the validation metric."""
    p = F.log_softmax(teacher_logits.float(), -1)
    q = F.log_softmax(student_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)
