"""Training the student on the teacher's precomputed targets, within a step budget, resumable.

Each step takes the next `batch` sequences of a seeded permutation (so the order is a function of the
step alone, and a resumed run sees exactly what an uninterrupted one would), computes the KD loss at
the scheduled temperature plus `hidden_weight` x the hidden-state loss, and takes an AdamW step
(linear warm-up, cosine decay to a tenth). The embeddings (tied to the head) stay frozen: they are the
teacher's, and on this CPU their gradient would cost a third of the step. Every `checkpoint_every`
steps the student, the optimizer and the history are written atomically to one file; a run given the
same folder resumes from it, and a checkpoint that cannot be read, or was written for another
configuration, is refused with its path, never silently replaced.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from costopt.distill.loss import hidden_loss, kd_loss, temperature
from costopt.distill.teacher import Targets

CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names its path."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    batch: int = 4
    lr: float = 5e-4
    warmup: int = 10
    t_start: float = 2.0  # the temperature schedule (cosine from t_start to t_end); t_start == t_end: constant
    t_end: float = 1.0
    hidden_weight: float = 1.0  # 0: logits only
    weight_decay: float = 0.0
    checkpoint_every: int = 25
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"distill.{name}: expected an integer >= 1, got {v!r}")
        if not self.lr > 0 or not self.t_start > 0 or not self.t_end > 0 or self.hidden_weight < 0:
            raise ValueError(f"distill: expected lr, t_start, t_end > 0 and hidden_weight >= 0, got {self}")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _order(n: int, cfg: TrainConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    reps = math.ceil(cfg.steps * cfg.batch / n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            raise ValueError("not a costopt distillation checkpoint")
    except Exception as exc:
        raise CheckpointError(f"{path}: the checkpoint cannot be read ({exc}); delete it to start over") from exc
    if state.get("identity") != identity:
        raise CheckpointError(f"{path}: the checkpoint was written for another student or setting "
                              f"({state.get('identity')} != {identity}); delete it to start over")
    return state


def train(student: Any, targets: Targets, student_layers: list[int], cfg: TrainConfig, checkpoint_dir: Path | None,
          identity: dict[str, Any] | None = None, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train `student` in place. `student_layers[j]` is the student block whose output is compared with
    `targets.hidden[..., j, :]`. `stop_after` ends the run early after that many steps of this call (an
    interruption, for tests). Returns {"history": [...], "resumed_from": step or None, "seconds": ...}."""
    from tqdm import tqdm

    cfg.check()
    identity = {**(identity or {}), "train": asdict(cfg)}
    student.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    history: list[dict[str, float]] = []
    start, resumed = 0, None
    path = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if path is not None and path.is_file():
        state = _load(path, identity)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, resumed, history = state["step"], state["step"], state["history"]
    order = _order(len(targets), cfg)
    captured: dict[int, torch.Tensor] = {}
    layers = student.model.layers
    handles = [layers[j].register_forward_hook(
        lambda _m, _a, out, j=j: captured.__setitem__(j, out[0] if isinstance(out, tuple) else out))
        for j in student_layers]
    def checkpoint(step: int) -> None:  # `step` steps are done
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, {"step": step, "model": student.state_dict(), "optim": opt.state_dict(),
                         "history": history, "identity": identity})

    student.train()
    t0 = time.perf_counter()
    done = 0
    try:
        with tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not progress) as bar:
            for step in range(start, cfg.steps):
                if stop_after is not None and done == stop_after:
                    checkpoint(step)
                    break
                idx = order[step * cfg.batch:(step + 1) * cfg.batch]
                attn = targets.attention_mask[idx]
                width = int(attn.sum(1).max())
                ids, attn, mask = targets.input_ids[idx, :width], attn[:, :width], targets.loss_mask[idx, :width]
                t = temperature(step, cfg.steps, cfg.t_start, cfg.t_end)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg)
                logits = student(input_ids=ids, attention_mask=attn).logits
                kd = kd_loss(logits, targets.top_logprobs[idx, :width], targets.top_ids[idx, :width], mask, t)
                loss = kd
                hid = torch.zeros(())
                if cfg.hidden_weight > 0 and student_layers:
                    teacher_h = [targets.hidden[idx, :width, j].float() for j in range(len(student_layers))]
                    hid = hidden_loss([captured[j] for j in student_layers], teacher_h, mask)
                    loss = kd + cfg.hidden_weight * hid
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                history.append({"step": step, "kd": kd.item(), "hidden": hid.item(), "temperature": t,
                                "lr": _lr_at(step, cfg)})
                done += 1
                bar.update(1)
                bar.set_postfix(kd=f"{kd.item():.3f}", hid=f"{hid.item():.3f}", T=f"{t:.2f}")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    checkpoint(step + 1)
    except KeyboardInterrupt:  # Ctrl-C or Airflow's stop: keep what was learned, then stop
        checkpoint(start + done)
        raise
    finally:
        for h in handles:
            h.remove()
        student.eval()
    return {"history": history, "resumed_from": resumed, "seconds": time.perf_counter() - t0,
            "finished": len(history) >= cfg.steps}
