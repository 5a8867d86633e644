"""Evaluation data: determinism, counts, disjointness, well-formed tasks, log-likelihood scoring, and
the evaldata phase end to end on a tiny random Llama with a tiny trained BPE tokenizer (no real model)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace

import pytest
import torch

from costopt.evaluation.evaldata import (TASK_FAMILIES, build_sets, chat_pool, check_disjoint, crosscheck_questions,
                                        ppl_passages, prompt_pool, split_prompts, task_items, to_jsonl)
from costopt.storage.layout import Workspace, write_json
from costopt.models.source import ModelFileError
from costopt.params import EvalDataParams, Params, ParamsError
from costopt.evaluation.taskscore import chance_accuracy, choice_logliks, plan_sequences, predict

QUICK = EvalDataParams(prompts=32, crosscheck=8, ppl_texts=8, calibration=16, task_items=60, reference_tokens=16)
FULL = EvalDataParams()


def _bytes(sets: dict) -> dict[str, bytes]:
    return {name: to_jsonl(rows) for name, rows in sets.items()}


def test_same_seed_gives_byte_identical_sets():
    a, b = _bytes(build_sets(FULL)), _bytes(build_sets(FULL))
    for name in a:
        assert a[name] == b[name], f"{name}: two builds with seed {FULL.seed} differ"


def test_different_seed_gives_different_sets():
    a, b = _bytes(build_sets(QUICK)), _bytes(build_sets(replace(QUICK, seed=QUICK.seed + 1)))
    for name in a:
        assert a[name] != b[name], f"{name}: seeds {QUICK.seed} and {QUICK.seed + 1} gave the same set"


@pytest.mark.parametrize("p", [QUICK, FULL], ids=["quick", "full"])
def test_counts_are_honoured_and_ids_unique(p):
    sets = build_sets(p)
    want = {"prompts": p.prompts, "crosscheck": p.crosscheck, "ppl": p.ppl_texts, "calibration": p.calibration,
            "tasks": p.task_items}
    for name, n in want.items():
        assert len(sets[name]) == n, f"{name}: expected {n} rows, got {len(sets[name])}"
        ids = [r["id"] for r in sets[name]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate ids"


def test_full_profile_prompts_are_distinct_and_diverse():
    held, _ = split_prompts(FULL.seed, FULL.prompts, FULL.calibration)
    texts = {r["messages"][0]["content"] for r in held}
    assert len(texts) >= 200, f"expected >= 200 distinct held-out prompts, got {len(texts)}"
    assert all(r["messages"][0]["role"] == "user" for r in held), "every prompt must be a user turn"
    families = {fam for fam, _ in prompt_pool(FULL.seed)[:FULL.prompts]}
    assert len(families) >= 8, f"held-out prompts come from only {len(families)} template families"


def test_calibration_is_disjoint_from_held_out():
    held, cal = split_prompts(FULL.seed, FULL.prompts, FULL.calibration)
    overlap = {r["messages"][0]["content"] for r in held} & {r["messages"][0]["content"] for r in cal}
    assert not overlap, f"calibration shares {len(overlap)} prompts with held-out, e.g. {sorted(overlap)[:1]}"


def _user_texts(rows) -> list[str]:
    return [" ".join(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]


def test_held_out_prompts_span_styles_lengths_and_turns():
    """The widened generator: questions and instructions, terse and long, several turns, other languages."""
    held, cal = split_prompts(FULL.seed, FULL.prompts, FULL.calibration)
    for name, rows in (("held-out", held), ("calibration", cal)):
        texts = _user_texts(rows)
        words = sorted(len(t.split()) for t in texts)
        assert words[0] <= 4 and words[-1] >= 45, f"{name}: prompt lengths span only {words[0]}-{words[-1]} words"
        questions = sum(t.rstrip().endswith("?") for t in texts) / len(texts)
        assert 0.15 <= questions <= 0.6, f"{name}: {questions:.0%} of prompts are questions; want a mix"
        families = {r["family"] for r in rows}
        assert {"questions", "terse", "format", "multilingual"} <= families, f"{name}: families {sorted(families)}"
        assert any(not t.isascii() for t in texts), f"{name}: no prompt outside plain English"
    assert any(len(r["messages"]) == 3 and r["messages"][1]["role"] == "assistant" for r in held), \
        "held-out prompts should include a follow-up turn after an earlier exchange"
    assert any(r["family"] == "reading" for r in held), "held-out prompts should include long reading prompts"


def test_no_held_out_prompt_shares_its_long_text_with_calibration():
    """A reading note or a dialog's first exchange used on both sides would leak that text into calibration."""
    pool = chat_pool(FULL.seed)
    held, cal = split_prompts(FULL.seed, FULL.prompts, len(pool) - FULL.prompts)
    firsts = lambda rows: {r["messages"][0]["content"].split("\n\n")[0] for r in rows}  # noqa: E731
    shared = firsts(held) & firsts(cal)
    assert not shared, f"{len(shared)} notes or first turns appear on both sides, e.g. {sorted(shared)[:1]}"


def test_crosscheck_is_factual_questions_unlike_the_calibration_pool():
    cross = crosscheck_questions(FULL.seed, FULL.crosscheck)
    assert len({r["messages"][0]["content"] for r in cross}) == FULL.crosscheck, "crosscheck questions repeat"
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in cross)
    texts = _user_texts(cross)
    assert all(len(t.split()) <= 14 for t in texts), f"crosscheck questions should be short: {max(texts, key=len)}"
    assert len({r["family"] for r in cross}) >= 6, "the crosscheck set should mix its fact families"
    pool = {" ".join(m["content"] for m in msgs if m["role"] == "user").lower() for _, msgs in chat_pool(FULL.seed)}
    assert not pool & {t.lower() for t in texts}, "a crosscheck question also appears in the chat pool"
    # built differently: no crosscheck question opens like a pool prompt does (first four words)
    heads = {" ".join(t.split()[:4]) for t in pool}
    same = [t for t in texts if " ".join(t.lower().split()[:4]) in heads]
    assert len(same) <= len(texts) // 10, f"{len(same)} crosscheck questions open like pool prompts: {same[:3]}"
    with pytest.raises(ParamsError, match=r"evaldata\.crosscheck"):
        crosscheck_questions(1, 100_000)


def test_overlap_raises_naming_calibration():
    held, cal = split_prompts(QUICK.seed, 4, 4)
    leaked = {"id": "c9999", "messages": [{"role": "user",
                                          "content": "  " + held[2]["messages"][0]["content"].upper()}]}
    with pytest.raises(ValueError, match=r"evaldata\.calibration.*c9999 = p0002"):
        check_disjoint(held, cal + [leaked])


def test_impossible_counts_raise_params_error():
    with pytest.raises(ParamsError, match=r"evaldata\.prompts \+ evaldata\.calibration"):
        split_prompts(1, 50_000, 50_000)
    with pytest.raises(ParamsError, match=r"evaldata\.task_items"):
        task_items(1, 100_000)


def test_task_items_are_well_formed():
    items = task_items(FULL.seed, FULL.task_items)
    for it in items:
        assert 0 <= it["answer"] < len(it["choices"]), f"{it['id']}: answer index out of range"
        assert len(set(it["choices"])) == len(it["choices"]), f"{it['id']}: repeated choices {it['choices']}"
        assert all(c.startswith(" ") and c.strip() for c in it["choices"]), \
            f"{it['id']}: a choice lacks its leading space: {it['choices']}"
        assert it["context"] == it["context"].rstrip(), f"{it['id']}: context ends with whitespace"
        assert set(it) == {"id", "family", "context", "choices", "answer"}, f"{it['id']}: keys {sorted(it)}"
    keys = [(it["context"], tuple(it["choices"])) for it in items]
    assert len(set(keys)) == len(keys), "two task items are identical"
    families = {it["family"] for it in items}
    assert len(families) >= 3 and families <= set(TASK_FAMILIES), f"families: {sorted(families)}"
    positions = {it["answer"] for it in items}
    assert positions == {0, 1, 2, 3}, f"the answer should sit at every position, got {sorted(positions)}"


def test_ppl_passages_are_distinct_prose_of_60_to_120_words():
    rows = ppl_passages(FULL.seed, FULL.ppl_texts)
    for r in rows:
        words = len(r["text"].split())
        assert 60 <= words <= 120, f"{r['id']}: {words} words"
    assert len({r["text"] for r in rows}) == len(rows), "two perplexity passages are identical"


# ---------------------------------------------------------------- scoring on a tiny model

@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama and a 400-token byte-level BPE trained on the task contexts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [it["context"] + it["choices"][it["answer"]] for it in task_items(0, 300)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval(), tok


def _hand_logliks(model, tok, item) -> list[float]:
    """Each choice on its own, unpadded: sum of log p(choice token | everything before it)."""
    ctx = tok(item["context"])["input_ids"]
    out = []
    for choice in item["choices"]:
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
        out.append(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    return out


def test_choice_logliks_match_a_hand_computation(tiny):
    model, tok = tiny
    items = task_items(3, 30)
    got = choice_logliks(model, tok, items, batch_size=3, progress=False)  # padded, mixed lengths
    for it, row in zip(items, got):
        want = _hand_logliks(model, tok, it)
        assert len(row) == len(it["choices"]), \
            f"{it['id']}: {len(row)} scores for {len(it['choices'])} choices"
        for j, (g, w) in enumerate(zip(row, want)):
            assert math.isclose(g, w, abs_tol=1e-4), f"{it['id']} choice {j}: batched {g} != by hand {w}"


def test_shared_prefixes_share_forward_passes_but_keep_exact_choice_tokens(tiny):
    _, tok = tiny
    items = task_items(3, 30)
    seqs, choices = plan_sequences(tok, items)
    assert len(seqs) < sum(len(it["choices"]) for it in items), "no choice shared a forward pass"
    for c in choices:
        item = items[c.item]
        ctx = tok(item["context"])["input_ids"]
        cont = tok(item["choices"][c.choice], add_special_tokens=False)["input_ids"]
        assert list(c.tokens) == cont, \
            f"{item['id']}: choice tokens {c.tokens} != separately tokenized {cont}"
        assert seqs[c.seq][:c.start] == ctx, f"{item['id']}: host sequence does not start with the context"
        assert seqs[c.seq][c.start:c.start + len(cont) - 1] == cont[:-1], \
            f"{item['id']}: the host sequence lacks the choice's leading tokens"


def test_choice_logliks_runs_in_bf16_close_to_fp32(tiny):
    model, tok = tiny
    items = task_items(3, 8)
    fp32 = choice_logliks(model, tok, items, progress=False)
    bf16 = choice_logliks(model.to(torch.bfloat16), tok, items, progress=False)
    model.to(torch.float32)
    for it, a, b in zip(items, fp32, bf16):
        assert all(isinstance(x, float) for x in b), f"{it['id']}: scores are not Python floats"
        assert max(abs(x - y) for x, y in zip(a, b)) < 0.25, f"{it['id']}: bf16 {b} far from fp32 {a}"


def test_predict_takes_the_argmax_and_breaks_ties_to_the_first():
    assert predict([[-3.0, -0.5, -2.0], [-1.0, -1.0], [-0.1]]) == [1, 0, 0], "wrong argmax"


def test_chance_accuracy_is_the_mean_of_one_over_choices():
    items = [{"choices": [" a", " b", " c", " d"]}, {"choices": [" a", " b"]}]
    assert chance_accuracy(items) == pytest.approx(0.375), "expected (1/4 + 1/2) / 2"


# ---------------------------------------------------------------- the phase

@pytest.fixture()
def tiny_workspace(tiny, tmp_path):
    model, tok = tiny
    ws = Workspace(tmp_path)
    model.save_pretrained(ws.model_dir, safe_serialization=True)
    tok.save_pretrained(ws.model_dir)
    write_json(ws.model_dir / "fingerprint.json", {"fingerprint": "tiny-test-model"})
    return ws


def test_phase_writes_the_documented_files_then_hits_its_cache(tiny_workspace):
    from tasks.evaldata import FILES, MANIFEST, evaldata

    ws = tiny_workspace
    params = Params(evaldata=EvalDataParams(prompts=4, crosscheck=3, ppl_texts=2, calibration=3, task_items=20,
                                            reference_tokens=3))
    first = evaldata(params, ws)
    assert first["cached"] is False, "the first run cannot be cached"
    manifest = json.loads((ws.data_dir / MANIFEST).read_text())
    for name in FILES.values():
        digest = hashlib.sha256((ws.data_dir / name).read_bytes()).hexdigest()
        assert manifest["files"][name] == digest, f"{name}: manifest hash differs from the file"
    assert manifest["counts"] == {"prompts": 4, "crosscheck": 3, "ppl_texts": 2, "calibration": 3,
                                  "task_items": 20}, f"counts: {manifest['counts']}"
    for name in ("prompts", "crosscheck"):
        prompts = [json.loads(line) for line in (ws.data_dir / f"{name}.jsonl").read_text().splitlines()]
        assert all(isinstance(p["reference"], str) for p in prompts), f"every {name} row needs a reference answer"
    assert evaldata(params, ws)["cached"] is True, "same seed, counts and model should be cached"
    (ws.data_dir / "tasks.jsonl").write_text("tampered\n")
    assert evaldata(params, ws)["cached"] is False, "a tampered file must force a rebuild"


def test_failed_rebuild_keeps_the_earlier_set(tiny_workspace):
    from tasks.evaldata import evaldata

    ws = tiny_workspace
    params = Params(evaldata=EvalDataParams(prompts=4, ppl_texts=2, calibration=1, task_items=20,
                                            reference_tokens=2))
    evaldata(params, ws)
    before = {f.name: f.read_bytes() for f in ws.data_dir.iterdir()}
    weights = ws.model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated weights: the model cannot load
    with pytest.raises(ModelFileError):
        evaldata(replace(params, evaldata=replace(params.evaldata, seed=99)), ws)
    after = {f.name: f.read_bytes() for f in ws.data_dir.iterdir()}
    assert after == before, "a failed rebuild changed the earlier data set"


def test_reference_answers_equal_each_prompts_own_greedy_generate(tiny):
    """The continuous-batching references (5 prompts through 2 slots, so slots are refilled mid-run)
    equal HF generate run on each prompt alone, EOS stops included."""
    from costopt.runtimes.engine import greedy_answers

    model, tok = tiny
    convs = [[{"role": "user", "content": it["context"]}] for it in task_items(5, 5)]
    got = greedy_answers(model, tok, convs, max_new_tokens=12, batch_size=2, progress=False)
    for conv, answer in zip(convs, got):
        ids = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0)
        assert answer == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), conv


def test_reference_and_validate_measure_the_crosscheck_set(tiny_workspace):
    """fp32 against its own reference scores KL 0 and top-1 1 on the crosscheck set; noisy weights do not."""
    from costopt.evaluation.reference import load_reference
    from costopt.models.source import load_model_dir
    from tasks.evaldata import evaldata
    from tasks.reference import reference
    from costopt.evaluation.quality import measure_crosscheck

    ws = tiny_workspace
    params = Params(evaldata=EvalDataParams(prompts=4, crosscheck=5, ppl_texts=2, calibration=2, task_items=20,
                                            reference_tokens=4))
    evaldata(params, ws)
    info = reference(params, ws)
    assert info["crosscheck_prompts"] == 5 and info["crosscheck_tokens"] > 0, f"reference baseline: {info}"
    ref = load_reference(params, ws)
    assert ref.crosscheck is not None and len(ref.crosscheck.texts) == 5
    model, _ = load_model_dir(ws.model_dir)
    same = measure_crosscheck(model, ref, resamples=50)
    assert same["prompts"] == 5 and same["tokens"] == info["crosscheck_tokens"], f"positions: {same}"
    assert same["kl_mean"]["value"] < 1e-4 and same["top1_agreement"]["value"] == 1.0, f"fp32 vs itself: {same}"
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    noisy = measure_crosscheck(model, ref, resamples=50)
    assert noisy["kl_mean"]["value"] > 100 * max(same["kl_mean"]["value"], 1e-6), f"noisy weights: {noisy}"
    lo, hi = noisy["kl_mean"]["ci95"]
    assert lo <= noisy["kl_mean"]["value"] <= hi, f"the CI brackets the estimate: {noisy['kl_mean']}"
