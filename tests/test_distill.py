"""Distillation's parts on tiny models: the losses against hand-computed values, the student's shape
checks and build, importance, training lowering the loss, and resuming from a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from costopt.distill import loss as L
from costopt.distill.student import StudentConfigError, StudentShape, build, check_shape, importance, plan
from costopt.distill.teacher import compute_ids
from costopt.distill.train import CheckpointError, TrainConfig, train


def tiny(layers: int = 4, width: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=width, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batch(n: int = 6, s: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, s), generator=g)
    attn = torch.ones(n, s, dtype=torch.long)
    attn[0, -4:] = 0  # one padded row
    return ids, attn


def test_kd_loss_equals_hand_computed_values():
    # one position, vocabulary 3, teacher top-2 = ids 0 and 1
    student = torch.tensor([[[1.0, 0.0, -1.0]]])
    top_lp = torch.log(torch.tensor([[[0.6, 0.3]]]))
    top_id = torch.tensor([[[0, 1]]])
    mask = torch.tensor([[True]])
    for t in (1.0, 2.0):
        p = torch.tensor([0.6, 0.3]) ** (1 / t)
        p = p / p.sum()  # the teacher's top-2 at T, renormalized
        q = torch.softmax(torch.tensor([1.0, 0.0, -1.0]) / t, -1)[:2]
        want = float((p * (p.log() - q.log())).sum()) * t * t
        got = float(L.kd_loss(student, top_lp, top_id, mask, t))
        assert math.isclose(got, want, rel_tol=1e-5), f"T={t}: {got} != {want}"
    assert float(L.kd_loss(student, top_lp, top_id, torch.tensor([[False]]), 1.0)) == 0.0, "masked: no loss"
    with pytest.raises(ValueError, match="temperature"):
        L.kd_loss(student, top_lp, top_id, mask, 0.0)


def test_hidden_loss_and_temperature_schedule():
    s = [torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])]
    t = [torch.tensor([[[2.0, 0.0], [3.0, 4.0]]])]
    mask = torch.tensor([[True, False]])
    assert math.isclose(float(L.hidden_loss(s, t, mask)), 1 / 4), "||(1,0)-(2,0)||^2 / ||(2,0)||^2"
    mask = torch.tensor([[True, True]])
    assert math.isclose(float(L.hidden_loss(s, t, mask)), (0.25 + 1.0) / 2)
    assert L.temperature(0, 100, 2.0, 1.0) == 2.0 and math.isclose(L.temperature(99, 100, 2.0, 1.0), 1.0)
    assert math.isclose(L.temperature(50, 101, 2.0, 1.0), 1.5), "halfway down the cosine"


def test_student_shapes_that_do_not_fit_the_teacher_fail_naming_the_field():
    cfg = tiny().config
    with pytest.raises(StudentConfigError, match="distill.layers"):
        check_shape(cfg, StudentShape(5, 16))
    with pytest.raises(StudentConfigError, match="distill.intermediate_size"):
        check_shape(cfg, StudentShape(2, 128))
    with pytest.raises(StudentConfigError, match="multiple of 8"):
        check_shape(cfg, StudentShape(2, 20))
    with pytest.raises(StudentConfigError, match="at most 0.5x"):
        check_shape(cfg, StudentShape(4, 64), max_ratio=0.5)


def test_a_full_plan_rebuilds_the_teacher_and_a_pruned_one_copies_the_kept_weights():
    from costopt.distill.student import param_count

    teacher = tiny()
    ids, attn = batch()
    scores = importance(teacher, [{"input_ids": ids, "attention_mask": attn}])
    same = build(teacher, plan(scores, StudentShape(4, 64)))
    with torch.no_grad():
        assert torch.allclose(same(input_ids=ids, attention_mask=attn).logits,
                              teacher(input_ids=ids, attention_mask=attn).logits, atol=1e-5), "a no-op plan"
    p = plan(scores, StudentShape(2, 32))
    student = build(teacher, p)
    assert len(student.model.layers) == 2 and student.config.intermediate_size == 32
    assert param_count(student) < param_count(teacher)
    i, idx = p["kept_layers"][1], torch.tensor(p["channels"][1])
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight[idx])
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight,
                       teacher.model.layers[i].mlp.down_proj.weight[:, idx])
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr(), "head stays tied"


def test_importance_ranks_a_block_that_does_nothing_lowest():
    teacher = tiny()
    with torch.no_grad():  # block 2 adds nothing to the residual stream: its output is its input
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
        teacher.model.layers[1].mlp.up_proj.weight[5].mul_(100)  # channel 5 of block 1: far the loudest
    ids, attn = batch()
    scores = importance(teacher, [{"input_ids": ids, "attention_mask": attn}])
    bi = scores["block_influence"]
    assert bi[2] < 1e-6 and min(bi[i] for i in (0, 1, 3)) > 1e-4, f"block influence {bi}"
    p = plan(scores, StudentShape(3, 8))
    assert p["dropped_layers"] == [2]
    assert 5 in p["channels"][1], "the loudest channel is kept"


def _targets(teacher, kept):
    ids, attn = batch(8, 12)
    return compute_ids(teacher, ids, attn, hidden_layers=[kept[-1]], skip=1, k=64, batch=4, progress=False)


def test_a_few_steps_lower_the_distillation_loss():
    teacher = tiny()
    ids, attn = batch()
    p = plan(importance(teacher, [{"input_ids": ids, "attention_mask": attn}]), StudentShape(2, 32))
    student = build(teacher, p)
    targets = _targets(teacher, p["kept_layers"])
    out = train(student, targets, [1], TrainConfig(steps=30, batch=4, lr=3e-3, warmup=2, t_start=1.0, t_end=1.0),
                None, progress=False)
    first = sum(h["kd"] for h in out["history"][:4]) / 4
    last = sum(h["kd"] for h in out["history"][-4:]) / 4
    assert last < 0.8 * first, f"KD loss {first:.4f} -> {last:.4f}"
    assert out["history"][-1]["hidden"] < out["history"][0]["hidden"], "hidden-state loss must fall too"


def test_resume_continues_where_it_stopped_and_a_corrupt_checkpoint_is_refused(tmp_path):
    teacher = tiny()
    ids, attn = batch()
    p = plan(importance(teacher, [{"input_ids": ids, "attention_mask": attn}]), StudentShape(2, 32))
    targets = _targets(teacher, p["kept_layers"])
    cfg = TrainConfig(steps=6, batch=4, lr=1e-3, warmup=1, checkpoint_every=100)
    straight = build(teacher, p)
    train(straight, targets, [1], cfg, None, progress=False)
    resumed = build(teacher, p)
    first = train(resumed, targets, [1], cfg, tmp_path, progress=False, stop_after=3)
    assert not first["finished"] and len(first["history"]) == 3
    again = build(teacher, p)  # a new process: the weights come from the checkpoint
    second = train(again, targets, [1], cfg, tmp_path, progress=False)
    assert second["resumed_from"] == 3 and second["finished"]
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), f"{name}: resumed training differs from an uninterrupted run"
    with pytest.raises(CheckpointError, match="another student or setting"):
        train(build(teacher, p), targets, [1], TrainConfig(steps=7, batch=4), tmp_path, progress=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoint.pt")):
        train(build(teacher, p), targets, [1], cfg, tmp_path, progress=False)


def test_training_rows_never_hold_a_held_out_or_crosscheck_prompt():
    from costopt.distill.teacher import training_conversations
    from costopt.evaluation.evaldata import chat_pool, split_prompts

    held, cal = split_prompts(1234, 20, 10)
    cal = [{**r, "reference": "an answer"} for r in cal]
    pool = chat_pool(1234)
    leaked = {"messages": held[3]["messages"]}  # a request-log row that repeats a held-out prompt
    excluded = [{"messages": [{"role": "user", "content": pool[40][1][0]["content"]}]}]  # "crosscheck"
    log = [leaked, {"messages": [{"role": "user", "content": "How do I reset my router?"}]}]
    rows = training_conversations(1234, 30, held, excluded, cal, log, 60)
    users = [" ".join(m["content"] for m in r["messages"] if m["role"] == "user").lower() for r in rows]
    banned = {" ".join(m["content"] for m in r["messages"] if m["role"] == "user").lower() for r in held + excluded}
    assert len(rows) == 60 and not banned & set(users), "a held-out or crosscheck prompt reached training"
    assert len(set(users)) == len(users), "duplicates"
    assert [r.get("reference") for r in rows[:10]] == ["an answer"] * 10, "calibration rows first, answers kept"
    assert users[10] == "how do i reset my router?", "then the request log (the leaked row dropped)"


def test_supervised_blocks_are_spread_and_include_the_last():
    from tasks.distill import supervised_blocks

    assert supervised_blocks(16, 3) == [4, 10, 15]
    assert supervised_blocks(16, 1) == [15] and supervised_blocks(16, 0) == []
    assert supervised_blocks(4, 4) == [0, 1, 2, 3]
