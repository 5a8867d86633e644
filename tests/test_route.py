"""The router over real engines (`costopt.routing.local`) and the route phase's tier choice."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from costopt.routing.router import RouterConfig, Tier


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _engine(model):
    from costopt.runtimes.engine import Engine

    return Engine(model, eos_token_ids=[], max_batch=8, max_len=64, compile=False)


PROMPTS = [[1, 5, 9, 12], [3, 3, 7], [40, 2, 8, 8, 1], [77, 6], [11, 12, 13]]


def _solo(model, prompt, n):
    """Greedy continuation by a plain forward loop (no engine): the ground truth."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_an_escalated_answer_is_the_cheap_prefix_then_the_next_tiers_continuation():
    from costopt.routing.local import LocalTiers, route_all

    cheap, best = _llama(1), _llama(2)
    tiers = LocalTiers({"cheap": _engine(cheap), "best": _engine(best)})
    # random weights are unsure: a threshold in the middle of their top-1 probabilities escalates some
    config = RouterConfig("routed", (Tier("cheap", 1.0, 0.03), Tier("best", 2.0, None)))
    results = asyncio.run(route_all(config, PROMPTS, 10, tiers, concurrency=3))
    escalated = [r for r in results if r.escalations]
    assert escalated, f"nothing escalated at threshold 0.03: {[r.tiers for r in results]}"
    for prompt, r in zip(PROMPTS, results):
        assert len(r.token_ids) == 10 and r.finish_reason == "length", r
        at = r.escalations[0]["at"] if r.escalations else 10
        cheap_alone = _solo(cheap, prompt, 10)
        assert r.token_ids[:at] == cheap_alone[:at], "the accepted prefix is the cheap tier's own greedy answer"
        if r.escalations:
            cont = _solo(best, prompt + r.token_ids[:at], 10 - at)
            assert r.token_ids[at:] == cont, "the rest is the next tier's greedy continuation of that prefix"
            assert r.escalations[0]["prob"] < 0.03
    assert not any(e.has_work() for e in tiers.engines.values()), "escalated sequences were cancelled"


def test_a_confident_threshold_keeps_everything_on_the_cheap_tier():
    from costopt.routing.local import LocalTiers, route_all

    cheap, best = _llama(1), _llama(2)
    tiers = LocalTiers({"cheap": _engine(cheap), "best": _engine(best)})
    config = RouterConfig("routed", (Tier("cheap", 1.0, 0.0), Tier("best", 2.0, None)))
    results = asyncio.run(route_all(config, PROMPTS, 6, tiers))
    assert all(r.tiers == ["cheap"] and not r.escalations for r in results), [r.tiers for r in results]
    assert tiers.tokens["best"] == 0, "the reference generated nothing"


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_chosen_tiers_are_the_pick_and_the_cheapest_on_the_front_below_it(tmp_path):
    """Dominated variants (dearer and worse) and variants dearer than the pick are left out."""
    from costopt.params import load_params
    from costopt.storage.layout import Workspace
    from tasks.route import choose_tiers

    ws = Workspace(tmp_path)
    table = {"pick": (5.0, 0.01), "a": (1.0, 1.0), "b": (2.0, 0.5), "dominated": (3.0, 0.9), "dear": (9.0, 0.005)}
    for name, (cost, kl) in table.items():
        _write(ws.variant_dir(name) / "spec.json", {"name": name})
        _write(ws.bench_file(name), {"cost_per_1m_requests_usd": cost})
    _write(ws.search_dir / "search.json", {"picked": "pick"})
    _write(ws.search_dir / "quality.json", {"variants": {n: {"kl_mean": {"value": kl}} for n, (_, kl) in table.items()}})
    params = load_params("params.yaml", overrides={"quantize": {"variants": ["int8_weight_only"]}})
    params = type(params)(**{**params.__dict__, "quantize": type(params.quantize)(variants=tuple(table))})
    tiers, why = choose_tiers(params, ws)
    assert why is None and [t["name"] for t in tiers] == ["a", "b", "pick"], tiers
    _write(ws.search_dir / "search.json", {"picked": None})
    assert choose_tiers(params, ws) == ([], "no variant passed its gates: there is no reference tier to route up to")


def test_owners_follow_escalations_and_skips():
    from costopt.routing.router import RouteResult
    from tasks.route import _owners

    r = RouteResult(token_ids=list(range(6)), escalations=[{"from": "a", "to": "b", "at": 2, "prob": 0.1}],
                    skipped=[{"tier": "b", "to": "c", "reason": "503", "at": 4}])
    assert _owners(r, "a") == ["a", "a", "b", "b", "c", "c"]


def test_a_generated_answer_is_right_when_its_first_word_is_the_answer():
    from costopt.evaluation.taskscore import generated_correct

    item = {"context": "Question: What is 5 plus 7?\nAnswer:", "choices": [" 13", " 12", " 1"], "answer": 1}
    assert generated_correct(" 12\nQuestion: What", item)
    assert generated_correct("12.", item)
    assert not generated_correct(" 123", item), "a longer number is not the answer"
    assert not generated_correct(" 1", item)
    assert not generated_correct(" The answer is 12", item), "only the first word counts"
    assert generated_correct(" PARIS is", {"choices": [" Paris", " Rome"], "answer": 0})


class _WordTok:
    """Token k is the word "w<k>": enough of a tokenizer for the labeled-set judge."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def test_the_labeled_set_judge_compares_routed_answers_with_the_reference_alone():
    from costopt.params import params_from_dict
    from tasks.route import judge_tasks

    cheap, best = _llama(1), _llama(2)
    engines = {"cheap": _engine(cheap), "best": _engine(best)}
    params = params_from_dict({"route": {"bootstrap": 200}})
    # each item's answer is the reference's own first token, so the reference alone scores 1.0
    items = [{"context": " ".join(f"w{i}" for i in p), "choices": [f" w{_solo(best, p, 1)[0]}", " w95"],
              "answer": 0} for p in PROMPTS]
    cheap_right = [_solo(cheap, p, 1)[0] == _solo(best, p, 1)[0] for p in PROMPTS]
    stay = RouterConfig("routed", (Tier("cheap", 1.0, 0.0), Tier("best", 2.0, None)))
    out = judge_tasks(params, stay, items, _WordTok(), engines, max_new=3)
    assert out["accuracy_reference"]["value"] == 1.0
    assert out["accuracy_routed"]["value"] == pytest.approx(sum(cheap_right) / len(PROMPTS))
    assert out["retention"]["value"] == pytest.approx(sum(cheap_right) / len(PROMPTS))
    assert out["finished_cheaper"] == 1.0
    up = RouterConfig("routed", (Tier("cheap", 1.0, 1.0), Tier("best", 2.0, None)))  # escalates at once
    out = judge_tasks(params, up, items, _WordTok(), engines, max_new=3)
    assert out["retention"]["value"] == 1.0 and out["finished_cheaper"] == 0.0
