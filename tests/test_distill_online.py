"""The GPU distillation path's parts, run on the CPU with tiny models: the weight transfer format
(round trip, part sizes, every refusal), the full-vocabulary loss against hand-computed values, and
online training (it lowers the loss against a live teacher, resumes from its checkpoint, and refuses a
checkpoint of another setting)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from costopt.distill import loss as L
from costopt.distill.online import OnlineConfig, agreement, train_online
from costopt.distill.student import StudentShape, build, importance, plan
from costopt.distill.transfer import TransferError, pack, unpack
from tests.test_distill import batch, tiny


def test_pack_round_trips_to_bf16_in_parts_no_larger_than_asked(tmp_path):
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(64, 96) for i in range(6)}
    state["scalar_like"] = torch.randn(3)
    files = pack(state, tmp_path, max_bytes=20_000, prefix="p")
    assert len(files) > 1 and [f.name for f in files][0] == f"p01-of-{len(files):02d}.safetensors"
    back = unpack(files, dtype=torch.float32)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v.to(torch.bfloat16).float()), f"{k}: not the bf16 rounding of the original"
    packed = sum(f.stat().st_size for f in files)
    assert packed < 0.85 * sum(v.numel() * 2 for v in state.values()) + 4096 * len(files), "the high bytes compress"


def test_unpack_refuses_a_missing_part_a_foreign_file_and_a_damaged_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    state = {f"w{i}": torch.randn(32, 32) for i in range(4)}
    files = pack(state, tmp_path / "a", max_bytes=3000)
    with pytest.raises(TransferError, match=f"{len(files) - 1} part files given, the set has {len(files)}"):
        unpack(files[:-1])
    with pytest.raises(TransferError, match="no part files"):
        unpack([])
    foreign = tmp_path / "x01-of-01.safetensors"
    save_file({"t": torch.zeros(2)}, str(foreign))
    with pytest.raises(TransferError, match=f"{foreign}.*format"):
        unpack([foreign])
    meta = safe_open(str(files[0]), "pt").metadata()
    tensors = load_file(str(files[0]))
    name = next(k for k in tensors if k.endswith("::lo"))
    tensors[name] = tensors[name][:-5]  # a truncated tensor
    save_file(tensors, str(files[0]), metadata=meta)
    with pytest.raises(TransferError, match=f"{files[0]}.*{name.split('::')[0]}"):
        unpack(files)


def test_full_kd_loss_equals_hand_computed_values_and_the_top_k_loss_when_k_covers_the_vocabulary():
    student = torch.tensor([[[1.0, 0.0, -1.0]]])
    teacher = torch.tensor([[[0.5, 0.2, -2.0]]])
    mask = torch.tensor([[True]])
    for t in (1.0, 2.0):
        p = torch.softmax(teacher[0, 0] / t, -1)
        q = torch.softmax(student[0, 0] / t, -1)
        want = float((p * (p.log() - q.log())).sum()) * t * t
        assert math.isclose(float(L.full_kd_loss(student, teacher, mask, t)), want, rel_tol=1e-5)
        top_lp, top_id = teacher.log_softmax(-1).topk(3, -1)
        assert math.isclose(float(L.kd_loss(student, top_lp, top_id, mask, t)), want, rel_tol=1e-5)
    assert float(L.full_kd_loss(student, teacher, torch.tensor([[False]]), 1.0)) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        L.full_kd_loss(student, teacher, mask, 0.0)


def _setup():
    teacher = tiny()
    ids, attn = batch()
    p = plan(importance(teacher, [{"input_ids": ids, "attention_mask": attn}]), StudentShape(2, 32))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(6, 14, (24,), generator=g)]
    return teacher, p, {"train": seqs[:20], "holdout": seqs[20:], "skip": 1}


def test_online_training_against_the_live_teacher_lowers_the_loss():
    teacher, p, data = _setup()
    student = build(teacher, p)
    cfg = OnlineConfig(steps=40, batch=4, lr=3e-3, warmup=2, t_start=1.0, t_end=1.0)
    before = agreement(teacher, student, data["train"], 0, 1, "cpu")
    out = train_online(teacher, student, data, 0, [p["kept_layers"][1]], [1], cfg, "cpu", None, log=lambda m: None)
    first = out["history"][0]["kd"]
    last = sum(h["kd"] for h in out["history"][-2:]) / 2
    assert out["steps"] == 40 and last < 0.8 * first, out["history"]
    assert out["history"][-1]["hidden"] < out["history"][0]["hidden"], "hidden-state loss must fall too"
    after = agreement(teacher, student, data["train"], 0, 1, "cpu")
    assert after["kl_mean"] < 0.8 * before["kl_mean"], (before, after)


def test_online_training_resumes_from_its_checkpoint_and_refuses_another_setting(tmp_path):
    teacher, p, data = _setup()
    ckpt = tmp_path / "checkpoint.pt"
    cfg = OnlineConfig(steps=12, batch=4, lr=1e-3, warmup=2, checkpoint_seconds=1e9)
    args = (data, 0, [p["kept_layers"][1]], [1])
    straight = build(teacher, p)
    train_online(teacher, straight, *args, cfg, "cpu", None, log=lambda m: None)
    first = train_online(teacher, build(teacher, p), *args, cfg, "cpu", ckpt, log=lambda m: None, stop_after=5)
    assert first["steps"] == 5 and ckpt.is_file()
    again = build(teacher, p)  # a new process: the weights and the optimizer come from the checkpoint
    out = train_online(teacher, again, *args, cfg, "cpu", ckpt, log=lambda m: None)
    assert out["steps"] == 12 and len(out["history"]) == len(first["history"]) + 1, out["history"]
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), f"{name}: resumed training differs from an uninterrupted run"
    with pytest.raises(RuntimeError, match="another setting"):
        train_online(teacher, build(teacher, p), *args, OnlineConfig(steps=12, batch=4, lr=2e-3), "cpu", ckpt,
                     log=lambda m: None)
