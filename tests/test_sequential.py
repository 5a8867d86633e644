"""Sequential validation: a decided failure stops early; a decided pass stops the prompts early and is
measured in full on the passages and tasks (or on everything, with early_pass off).

A fake model on a character tokenizer: the fp32 reference is the uniform distribution (zero hidden
states), so a model returning zero logits matches it exactly (KL 0) and a peaked one is far off.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from costopt.evaluation.reference import Ref
from costopt.evaluation.sequential import failed_for_sure, fails, look_points, passed_for_sure
from costopt.params import Gates
from costopt.evaluation.quality import measure_quality

VOCAB, HIDDEN = 64, 8


class CharTok:
    """One token per character (ord % VOCAB), right padding: what `batches` and taskscore call."""
    pad_token, eos_token, pad_token_id, eos_token_id = "\0", "\0", 0, 0
    padding_side = "right"

    def __call__(self, text, return_tensors=None, padding=False, truncation=False, max_length=None,
                 add_special_tokens=True):
        if isinstance(text, str):
            return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}
        rows = [self(t)["input_ids"][:max_length] for t in text]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


class FakeModel:
    """Zero logits (uniform: equal to the reference) or a spike on token 1 (far from it)."""
    device = torch.device("cpu")

    def __init__(self, peaked: bool) -> None:
        self.peaked, self.calls = peaked, 0

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        out = torch.zeros(*input_ids.shape, VOCAB)
        if self.peaked:
            out[..., 1] = 12.0
        return SimpleNamespace(logits=out)


def make_ref(prompts: int = 64) -> Ref:
    tok = CharTok()
    texts = [f"prompt {i:03d} " + "x" * (5 + i % 7) for i in range(prompts)]
    positions = sum(len(tok(t)["input_ids"]) for t in texts)
    passages = ["some text here", "more text there"]
    items = [{"context": "q", "choices": [" a", " b"], "answer": 0} for _ in range(8)]
    return Ref(tok, texts, passages, items, skip=0, max_len=64, hidden=torch.zeros(positions, HIDDEN),
               head=torch.zeros(VOCAB, HIDDEN), nll_sum=[1.0, 1.0], nll_count=[13.0, 14.0],
               correct=[True] * 8, info={})


def test_a_clear_failure_stops_at_the_first_look_and_skips_the_rest():
    ref, model = make_ref(), FakeModel(peaked=True)
    m = measure_quality(model, ref, resamples=200, gates=Gates())
    seq = m["sequential"]
    assert seq["stopped"] and seq["prompts"] == 16 and seq["of"] == 64, f"stops after a quarter: {seq}"
    assert "99.9% CI" in seq["reason"] and "kl_mean_max" in seq["reason"], seq["reason"]
    assert m["task_retention"]["value"] is None and m["ppl_ratio"]["value"] is None, "the rest is skipped"
    assert model.calls == 2, f"2 prompt batches of 8 scored, no passages or tasks: {model.calls} forwards"


def test_a_clear_pass_stops_the_prompts_at_the_first_look_and_measures_the_rest():
    ref, model = make_ref(), FakeModel(peaked=False)
    m = measure_quality(model, ref, resamples=200, gates=Gates())
    seq = m["sequential"]
    assert seq["stopped"] and seq["decided"] == "pass" and seq["prompts"] == 16 and seq["of"] == 64, seq
    assert "every prompt gate passes at 99.9%" in seq["reason"], seq["reason"]
    assert m["kl_mean"]["value"] == pytest.approx(0.0, abs=1e-6), "zero logits equal the uniform reference"
    assert m["task_retention"]["value"] is not None and m["ppl_ratio"]["value"] is not None, "all measured"


def test_with_early_pass_off_a_pass_is_measured_in_full():
    ref, model = make_ref(), FakeModel(peaked=False)
    m = measure_quality(model, ref, resamples=200, gates=Gates(), early_pass=False)
    assert m["sequential"] == {"stopped": False, "prompts": 64, "of": 64}, m["sequential"]
    assert m["task_retention"]["value"] is not None and m["ppl_ratio"]["value"] is not None, "all measured"


class NoisyModel(FakeModel):
    """A spike whose height follows the input token, so the KL varies from token to token."""

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        out = torch.zeros(*input_ids.shape, VOCAB)
        out[..., 1] = (input_ids % 5).float()
        return SimpleNamespace(logits=out)


def test_an_undecided_variant_scores_every_prompt():
    """A gate at the variant's own full-set KL: its interval straddles the bound at every look."""
    ref = make_ref()
    full = measure_quality(NoisyModel(peaked=True), ref, resamples=200)["kl_mean"]["value"]
    m = measure_quality(NoisyModel(peaked=True), ref, resamples=200, gates=Gates(kl_mean_max=full, kl_p99_max=100,
                                                                              top1_agreement_min=0.0))
    assert m["sequential"]["prompts"] == 64, m["sequential"]


def test_without_gates_nothing_stops():
    ref, model = make_ref(), FakeModel(peaked=True)
    m = measure_quality(model, ref, resamples=50)
    assert "sequential" not in m and m["task_retention"]["value"] is not None, "no gates: a full measurement"


def test_failed_for_sure_needs_the_whole_interval_past_the_bound():
    g = Gates()  # kl_mean_max 0.02, top1_agreement_min 0.93
    assert failed_for_sure("kl_mean", 0.03, 0.05, g), "the whole interval above the max fails"
    assert not failed_for_sure("kl_mean", 0.01, 0.05, g), "an interval straddling the max is undecided"
    assert failed_for_sure("top1_agreement", 0.5, 0.9, g), "the whole interval below the min fails"
    assert not failed_for_sure("top1_agreement", 0.9, 0.95, g), "straddling the min is undecided"


def test_passed_for_sure_needs_the_whole_interval_on_the_passing_side():
    g = Gates()
    assert passed_for_sure("kl_mean", 0.001, 0.01, g)
    assert not passed_for_sure("kl_mean", 0.01, 0.03, g), "straddling the max is undecided"
    assert passed_for_sure("top1_agreement", 0.95, 0.99, g)
    assert not passed_for_sure("top1_agreement", 0.9, 0.95, g)
    assert not passed_for_sure("kl_mean", float("nan"), 0.01, g)


def test_final_prompt_gate_uses_the_configured_statistic():
    entry = {"value": 0.015, "ci95": [0.01, 0.025]}
    assert fails("kl_mean", entry, Gates(statistic="ci_bound")), "the CI's upper end 0.025 > 0.02 fails"
    assert not fails("kl_mean", entry, Gates(statistic="point")), "the estimate 0.015 <= 0.02 passes"


def test_look_points_are_interior():
    assert look_points(8) == {2, 4, 6}, look_points(8)
    assert look_points(1) == set(), "a single batch has no interim look"
    assert look_points(2) == {1}, look_points(2)
