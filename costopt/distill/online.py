"""Distillation on a GPU with the teacher live: more data and many more steps than the CPU can afford.

The CPU path (`costopt.distill.train`) precomputes the teacher's top-k log-probs once, because running
the 134.5M-parameter teacher every step would cost as much as the student's own step. On a GPU the
teacher's forward pass is cheap next to the student's backward pass, so this path runs it in every
step and takes the loss over the **full** vocabulary (no top-k truncation), on **fresh data the teacher
writes there**:

- its greedy answer and sampled answers (T = 0.7 and 1.0) to each training prompt (the same rows the
  CPU path uses: none from a held-out set), and
- conversations it writes itself: a user turn sampled at T = 1 from the chat template's opening, then
  its answer to it (greedy or at T = 0.7), and
- plain text with no template (greedy or at T = 1), from a document start alone or from a training
  prompt's first words (completion prompts, as the labeled task items are, take that form): the
  model's own distribution, no dataset download. This source was added after the measured runs
  (BENCHMARKS.md section 17) and has not run on a GPU yet.

The loss is the seed paper's pair, as on the CPU: T^2 KL(teacher_T || student_T) under the cosine
temperature schedule, plus `hidden_weight` x the relative hidden-state error at the supervised blocks.
The run is bounded in wall time (`train_seconds`) unless `steps` fixes its length: it measures its step
time over the warm-up steps (the first ten excluded: on an H100 they took twice as long, and the first
run stopped at 47% of its budget when they were counted), then fixes the step count, and with it the
learning-rate and temperature schedules, to fill the budget. It checkpoints (student, optimizer, step,
the fixed step count) every `checkpoint_seconds` and resumes from that file; a step's batch is a
function of the step alone, so a resumed run takes the steps an uninterrupted one would. The embeddings
(tied to the head) stay the teacher's, as on the CPU; that also keeps what must travel back to 35.4M
parameters (`costopt.distill.transfer`).

A slice of the prompts (by prompt, `holdout`) is never trained on; the run reports the student's KL and
top-1 agreement with the teacher on those sequences before and after, to show what generalizes. The
gate metrics themselves are measured back on the CPU against the fp32 reference (`python -m
tasks.distill --import-student`).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from costopt.distill.loss import full_kd_loss, hidden_loss, temperature


@dataclass(frozen=True)
class OnlineConfig:
    train_seconds: float = 330.0  # wall budget for the optimizer steps (when `steps` is 0)
    steps: int = 0  # a fixed step count instead of the budget (0: as many as fit train_seconds)
    gen_seconds: float = 150.0  # wall budget for the teacher's data
    batch: int = 64  # sequences per step
    max_len: int = 256  # tokens per sequence
    lr: float = 5e-4
    warmup: int = 50
    t_start: float = 2.0
    t_end: float = 1.0
    hidden_weight: float = 1.0
    samples_per_prompt: int = 6  # sampled answers per training prompt (half at T = 0.7, half at 1.0), plus the greedy one
    answer_tokens: int = 160
    gen_batch: int = 384
    gen_rounds: int = 1000  # at most this many rounds after the greedy answers (sampled, self-written, plain)
    holdout: float = 0.03  # share of the prompts never trained on (the generalization check)
    checkpoint_seconds: float = 60.0
    seed: int = 0


def _lr(step: int, total: int, cfg: OnlineConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def generate(teacher: Any, tok: Any, prompts: list[str], temperature_: float, max_new: int, batch: int,
             device: str, deadline: float, seed: int, stop: tuple[str, ...] = ("<|im_end|>",)) -> list[list[int]]:
    """The teacher's continuation of each prompt (text already templated), prompt ids + new ids up to and
    including its end token (the tokenizer's end, or one of `stop`); T = 0 is greedy. Stops early at
    `deadline` (time.monotonic())."""
    tok.padding_side = "left"
    out: list[list[int]] = []
    ends = (tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in stop))
    end_ids = {i for i in ends if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch):
        if time.monotonic() > deadline:
            break
        enc = tok(prompts[start:start + batch], return_tensors="pt", padding=True).to(device)
        kw: dict[str, Any] = {"do_sample": temperature_ > 0, "max_new_tokens": max_new,
                              "pad_token_id": tok.pad_token_id, "eos_token_id": sorted(end_ids)}
        if temperature_ > 0:
            kw.update(temperature=temperature_, top_k=0, top_p=1.0)
        gen = teacher.generate(**enc, **kw).cpu()
        width = enc["input_ids"].shape[1]
        for row, mask in zip(gen, enc["attention_mask"].cpu()):
            ids = row[width - int(mask.sum()):].tolist()  # drop the left padding
            new = ids[int(mask.sum()):]
            cut = next((k + 1 for k, t in enumerate(new) if t in end_ids), len(new))
            out.append(ids[:int(mask.sum()) + cut])
    return out


def teacher_data(teacher: Any, tok: Any, conversations: list[list[dict]], cfg: OnlineConfig, device: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Training and held-out sequences (token ids) written by the teacher within `cfg.gen_seconds`."""
    rng = random.Random(cfg.seed)
    order = list(range(len(conversations)))
    rng.shuffle(order)
    n_hold = max(1, round(cfg.holdout * len(order)))
    hold, train = order[:n_hold], order[n_hold:]
    text = lambda i: tok.apply_chat_template(conversations[i], tokenize=False, add_generation_prompt=True)
    opening = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False).split("\x00")[0]
    answer_opening = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                             add_generation_prompt=True).split("\x00")[1]  # "<|im_end|>\n<|im_start|>assistant\n"
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_opening = answer_opening[len("<|im_end|>"):] if answer_opening.startswith("<|im_end|>") else answer_opening
    chat_skip = len(tok(opening)["input_ids"])  # the template's shared opening is not supervised
    t0 = time.monotonic()
    deadline = t0 + cfg.gen_seconds
    seqs: dict[str, list[list[int]]] = {"train": [], "holdout": []}
    seqs["holdout"] = generate(teacher, tok, [text(i) for i in hold], 0.0, cfg.answer_tokens, cfg.gen_batch,
                               device, math.inf, cfg.seed)
    seqs["train"] += generate(teacher, tok, [text(i) for i in train], 0.0, cfg.answer_tokens, cfg.gen_batch,
                              device, deadline, cfg.seed)
    log(f"greedy answers: {len(seqs['train'])} train, {len(seqs['holdout'])} held out, {time.monotonic() - t0:.0f} s")
    counts = {"greedy": len(seqs["train"]), "sampled": 0, "self_written": 0, "plain_text": 0}
    skips = [chat_skip] * len(seqs["train"])
    doc = tok.convert_tokens_to_ids("<|endoftext|>")
    doc_start = "<|endoftext|>" if isinstance(doc, int) and doc >= 0 and doc != tok.unk_token_id else ""
    words = [conversations[i][-1]["content"].split() for i in train]
    rounds = 0
    while time.monotonic() < deadline and rounds < cfg.gen_rounds:
        temp = 0.7 if rounds % 2 == 0 else 1.0
        if rounds < cfg.samples_per_prompt:
            got = generate(teacher, tok, [text(i) for i in train], temp, cfg.answer_tokens, cfg.gen_batch,
                           device, deadline, cfg.seed + 1 + rounds)
            counts["sampled"] += len(got)
            skips += [chat_skip] * len(got)
        elif (rounds - cfg.samples_per_prompt) % 2 == 0:  # the teacher writes the user's turn, then answers it
            users = generate(teacher, tok, [opening] * (cfg.gen_batch * 2), 1.0, 96, cfg.gen_batch, device,
                             deadline, cfg.seed + 1 + rounds)
            prompts = [tok.decode(u, skip_special_tokens=False) + answer_opening for u in users if u[-1] == turn_end]
            got = generate(teacher, tok, prompts, 0.0 if rounds % 4 < 2 else 0.7, cfg.answer_tokens, cfg.gen_batch,
                           device, deadline, cfg.seed + 1 + rounds)
            counts["self_written"] += len(got)
            skips += [chat_skip] * len(got)
        else:  # plain text, no template: from a document start alone, or from a prompt's first words
            prompts = [doc_start + (" ".join(w[:rng.randint(1, 4)]) if k % 2 and w else "")
                       for k, w in enumerate(rng.choices(words, k=cfg.gen_batch * 2))]
            got = generate(teacher, tok, prompts, 0.0 if rounds % 4 < 2 else 1.0, cfg.max_len - 8, cfg.gen_batch,
                           device, deadline, cfg.seed + 1 + rounds, stop=("<|endoftext|>", "<|im_end|>"))
            counts["plain_text"] += len(got)
            skips += [0] * len(got)
        seqs["train"] += got
        rounds += 1
    kept = [k for k, s in enumerate(seqs["train"]) if len(s) > 1]
    seqs["train"] = [seqs["train"][k][:cfg.max_len] for k in kept]
    tokens = sum(len(s) for s in seqs["train"])
    log(f"teacher data: {len(seqs['train'])} sequences, {tokens} tokens ({counts}), {time.monotonic() - t0:.0f} s")
    return {**seqs, "counts": counts, "tokens": tokens, "seconds": time.monotonic() - t0,
            "skip": chat_skip, "train_skip": [skips[k] for k in kept]}


def _batch(seqs: list[list[int]], idx: list[int], pad: int, skip: int | list[int], device: str
           ) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and loss mask of `seqs[idx]`; the first `skip` positions of a row
    (one number, or one per sequence) are not supervised."""
    width = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
        attn[r, :len(seqs[i])] = 1
    mask = attn.bool().clone()
    for r, i in enumerate(idx):
        mask[r, :skip if isinstance(skip, int) else skip[i]] = False
    mask[:, :-1] &= attn[:, 1:].bool()  # the last real token predicts nothing
    mask[:, -1] = False
    return ids.to(device), attn.to(device), mask.to(device)


class _Hidden:
    """Forward hooks that keep the outputs of some blocks."""

    def __init__(self, model: Any, blocks: list[int]) -> None:
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [model.model.layers[b].register_forward_hook(
            lambda _m, _a, o, b=b: self.out.__setitem__(b, o[0] if isinstance(o, tuple) else o)) for b in blocks]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def agreement(teacher: Any, student: Any, seqs: list[list[int]], pad: int, skip: int, device: str,
              batch: int = 64) -> dict[str, float]:
    """Mean full-vocabulary KL(teacher || student) at T = 1 and top-1 agreement over `seqs`' supervised positions."""
    kl_sum, agree, n = 0.0, 0, 0
    for start in range(0, len(seqs), batch):
        ids, attn, mask = _batch(seqs, list(range(start, min(len(seqs), start + batch))), pad, skip, device)
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            t = teacher(input_ids=ids, attention_mask=attn).logits[mask].float()
            s = student(input_ids=ids, attention_mask=attn).logits[mask].float()
        kl_sum += float(full_kd_loss(s, t, torch.ones(len(s), dtype=torch.bool, device=s.device), 1.0)) * len(s)
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        n += len(s)
    return {"kl_mean": kl_sum / max(1, n), "top1_agreement": agree / max(1, n), "positions": n}


def train_online(teacher: Any, student: Any, data: dict[str, Any], pad: int, teacher_blocks: list[int],
                 student_blocks: list[int], cfg: OnlineConfig, device: str, checkpoint: Path | None,
                 log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[str, Any]:
    """Train `student` in place against the live `teacher` on `data["train"]` for `cfg.steps` steps or
    `cfg.train_seconds` (see the module docstring); student block `student_blocks[j]` is compared with
    teacher block `teacher_blocks[j]`. `stop_after` ends this call after that many steps (an
    interruption, for tests). Returns the history, the steps, the tokens seen and the seconds."""
    seqs, skip = data["train"], data.get("train_skip", data["skip"])
    student.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.startswith("cuda"))
    step, total, history, tokens, spent = 0, cfg.steps or None, [], 0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("config") != asdict(cfg):
            raise RuntimeError(f"{checkpoint}: written for another setting ({state.get('config')}); delete it to start over")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, total, history, tokens, spent = state["step"], state["total"], state["history"], state["tokens"], state["seconds"]
        log(f"resumed at step {step} of {total}")

    def save() -> None:
        if checkpoint is None:
            return
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "model": student.state_dict(), "optim": opt.state_dict(), "step": step,
                    "total": total, "history": history, "tokens": tokens, "seconds": spent}, tmp)
        os.replace(tmp, checkpoint)

    hs, ht = _Hidden(student, student_blocks), _Hidden(teacher, teacher_blocks)
    cuda = device.startswith("cuda")
    student.train()
    t_start = time.monotonic() - spent
    done = 0
    first, first_spent = 10, 0.0  # the step time is measured over warm-up steps first .. first + warmup
    last_ckpt = time.monotonic()
    try:
        while (total is None or step < total) and (stop_after is None or done < stop_after):
            g = random.Random(cfg.seed * 1_000_003 + step)  # a step's batch is a function of the step alone
            ids, attn, mask = _batch(seqs, g.sample(range(len(seqs)), min(cfg.batch, len(seqs))), pad, skip, device)
            t = temperature(step, total or 10 ** 9, cfg.t_start, cfg.t_end) if total else cfg.t_start
            for group in opt.param_groups:
                group["lr"] = _lr(step, total or 10 ** 9, cfg)
            with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                t_logits = teacher(input_ids=ids, attention_mask=attn).logits
            with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                s_logits = student(input_ids=ids, attention_mask=attn).logits
            kd = full_kd_loss(s_logits, t_logits, mask, t)
            hid = kd.new_zeros(())
            if cfg.hidden_weight > 0 and student_blocks:
                hid = hidden_loss([hs.out[b] for b in student_blocks], [ht.out[b] for b in teacher_blocks], mask)
            loss = kd + cfg.hidden_weight * hid
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            done += 1
            tokens += int(mask.sum())
            spent = time.monotonic() - t_start
            if step % 10 == 0 or step == 1:
                history.append({"step": step, "kd": kd.item(), "hidden": hid.item(), "temperature": t,
                                "lr": _lr(step - 1, total or 10 ** 9, cfg), "seconds": round(spent, 1)})
            if total is None and step == first:
                first_spent = spent
            if total is None and step == first + cfg.warmup:  # fix the schedule to fill the budget
                per_step = (spent - first_spent) / cfg.warmup  # the first steps (kernel choice, allocator) excluded
                total = max(step + 1, step + int((cfg.train_seconds - spent) / per_step))
                log(f"{per_step * 1000:.0f} ms a step: {total} steps in {cfg.train_seconds:.0f} s")
            if step % 50 == 0:
                log(f"step {step}/{total}: kd {kd.item():.4f} hidden {hid.item():.4f} T {t:.2f} "
                    f"{tokens / spent:.0f} tok/s")
            if time.monotonic() - last_ckpt > cfg.checkpoint_seconds:
                save()
                last_ckpt = time.monotonic()
    finally:
        hs.remove()
        ht.remove()
        student.eval()
    save()
    return {"history": history, "steps": step, "total": total, "tokens": tokens, "seconds": spent}
