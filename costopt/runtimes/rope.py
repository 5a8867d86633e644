"""Llama's rotary embedding, shared by the eager engine and its compiled decode step (one definition, so
the two compute the same thing)."""
from __future__ import annotations

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama applies it: x [T, heads, hd], cos/sin [T, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
