"""The continuous-batching engine on tiny random Llamas: tokens equal a solo greedy loop, stops, cancel, errors."""
import pytest
import torch

from costopt.runtimes.engine import Engine, SamplingParams, StepEvent
from engine_scenarios import drive, pause_resume, solo_greedy, wide_llama

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def llama64():
    """float64 so batched and solo arithmetic cannot flip an argmax; a wide init so tokens vary."""
    return wide_llama(torch.float64)


def test_greedy_equals_solo_loop_with_staggered_arrivals_and_departures(llama64):
    prompts = {f"s{i}": [(7 * i + 3 * j) % 96 for j in range(1 + (5 * i) % 13)] for i in range(9)}
    lengths = {f"s{i}": 3 + (4 * i) % 11 for i in range(9)}
    arrive = {0: ["s0", "s1"], 1: ["s2"], 3: ["s3", "s4"], 6: ["s5"], 9: ["s6", "s7"], 14: ["s8"]}
    schedule = {step: [(s, prompts[s], SamplingParams(max_new_tokens=lengths[s])) for s in ids]
                for step, ids in arrive.items()}
    engine = Engine(llama64, eos_token_ids=[], max_batch=4, max_len=32)
    tokens, reasons, _ = drive(engine, schedule)
    for s, prompt in prompts.items():
        want = solo_greedy(llama64, prompt, lengths[s])
        assert tokens[s] == want, f"{s} (prompt {len(prompt)} tokens) in a batch {tokens[s]} != alone {want}"
        assert reasons[s] == "length", f"{s} finished with {reasons[s]!r}, expected 'length'"
    assert engine.running == 0 and not engine.has_work(), "engine still holds sequences after all finished"


def test_garbage_in_a_fresh_cache_does_not_leak_into_tokens(llama64):
    """The cache is torch.empty: NaN bit patterns past a short row's length must not reach its output."""
    engine = Engine(llama64, eos_token_ids=[], max_batch=2, max_len=32)
    with torch.inference_mode():  # the cache is an inference tensor
        engine.kv.fill_(float("nan"))  # what uninitialized memory may hold
    tokens, _, _ = drive(engine, {0: [("short", [1, 2], GREEDY), ("long", list(range(30, 45)), GREEDY)]})
    assert tokens["short"] == solo_greedy(llama64, [1, 2], 12), f"short row beside a long one: {tokens['short']}"


def test_cancel_mid_batch_leaves_the_others_exact(llama64):
    prompts = {"a": [1, 2, 3, 4, 5], "b": [9, 8], "c": [20, 30, 40, 50, 60, 70, 80], "d": [11]}
    schedule = {0: [(s, p, GREEDY) for s, p in prompts.items()]}
    engine = Engine(llama64, eos_token_ids=[], max_batch=4, max_len=32)
    tokens, reasons, log = drive(engine, schedule, cancels={4: ["b"]})
    assert log[4][0] == StepEvent("b", None, "cancelled"), f"step 4 did not open with b's cancel: {log[4]}"
    assert tokens["b"] == solo_greedy(llama64, prompts["b"], 4), "b's tokens before its cancel are wrong"
    assert reasons["b"] == "cancelled", f"b finished with {reasons['b']!r}"
    for s in "acd":
        assert tokens[s] == solo_greedy(llama64, prompts[s], 12), f"{s} changed when b left the batch"


def test_cancel_frees_the_slot_at_once_and_is_idempotent(llama64):
    engine = Engine(llama64, eos_token_ids=[], max_batch=2, max_len=32)
    engine.add("x", [1, 2], GREEDY)
    engine.add("y", [3, 4], GREEDY)
    engine.step()
    with pytest.raises(RuntimeError, match="no free slot"):
        engine.add("z", [5], GREEDY)
    engine.cancel("x")
    assert engine.running == 1, f"running is {engine.running} right after cancel, expected 1"
    engine.cancel("x")  # a second cancel, or one after the sequence ended, emits nothing
    engine.cancel("never-added")
    engine.add("z", [5, 6, 7], GREEDY)
    tokens, reasons, log = drive(engine, {})
    assert [e for e in log[0] if e.seq_id == "x"] == [StepEvent("x", None, "cancelled")], \
        f"x's events after its cancel: {[e for e in log[0] if e.seq_id == 'x']}"
    assert len(tokens["z"]) == 12 and len(tokens["y"]) == 11, f"token counts {tokens}"
    assert reasons == {"x": "cancelled", "y": "length", "z": "length"}, f"finish reasons {reasons}"


def test_cancel_before_prefill_emits_only_the_cancel(llama64):
    engine = Engine(llama64, eos_token_ids=[], max_batch=2, max_len=32)
    engine.add("p", [1, 2, 3], GREEDY)
    engine.cancel("p")
    assert engine.running == 0 and engine.has_work(), "a pending cancel event must keep has_work() true"
    assert engine.step() == [StepEvent("p", None, "cancelled")], "expected only p's cancel event"
    assert not engine.has_work() and engine.step() == [], "an idle engine must return no events"


def test_eos_and_stop_ids_end_a_sequence_with_that_token(llama64):
    prompt = [4, 8, 15, 16, 23, 42]
    ref = solo_greedy(llama64, prompt, 12)
    eos = ref[3]
    first = ref.index(eos)
    engine = Engine(llama64, eos_token_ids=[eos], max_batch=2, max_len=32)
    tokens, reasons, _ = drive(engine, {0: [("e", prompt, GREEDY)]})
    assert tokens["e"] == ref[:first + 1] and reasons["e"] == "stop", \
        f"EOS {eos}: got {tokens['e']} ({reasons['e']}), expected {ref[:first + 1]} ('stop')"
    stop = ref[5]
    engine = Engine(llama64, eos_token_ids=[], max_batch=2, max_len=32)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))
    tokens, reasons, _ = drive(engine, {0: [("s", prompt, params), ("plain", prompt, GREEDY)]})
    assert tokens["s"] == ref[:ref.index(stop) + 1] and reasons["s"] == "stop", \
        f"stop id {stop}: got {tokens['s']} ({reasons['s']})"
    assert tokens["plain"] == ref, "a stop id of one request must not stop its batch mate"


def test_max_new_tokens_and_the_context_limit_are_exact(llama64):
    engine = Engine(llama64, eos_token_ids=[], max_batch=3, max_len=16)
    schedule = {0: [("one", [5], SamplingParams(max_new_tokens=1)),
                    ("full", list(range(10, 20)), SamplingParams(max_new_tokens=6)),  # 10 + 6 = max_len
                    ("mid", [3, 3, 3], SamplingParams(max_new_tokens=7))]}
    tokens, reasons, log = drive(engine, schedule)
    assert log[0][0] == StepEvent("one", tokens["one"][0], "length"), f"max_new_tokens=1: {log[0][0]}"
    assert tokens["full"] == solo_greedy(llama64, list(range(10, 20)), 6), "sequence filling max_len differs"
    assert [len(tokens[s]) for s in ("one", "full", "mid")] == [1, 6, 7], f"token counts {tokens}"
    assert set(reasons.values()) == {"length"}, f"finish reasons {reasons}"


def test_add_validates_prompt_length_and_ids(llama64):
    engine = Engine(llama64, eos_token_ids=[], max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="prompt: empty"):
        engine.add("a", [], GREEDY)
    with pytest.raises(ValueError, match=r"prompt: 10 tokens \+ max_tokens 7 = 17 exceeds .* 16"):
        engine.add("a", list(range(10)), SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match=r"prompt: token ids must be in \[0, 96\)"):
        engine.add("a", [1, 96], GREEDY)
    engine.add("a", [1], GREEDY)
    with pytest.raises(ValueError, match="seq_id: 'a' is already running"):
        engine.add("a", [2], GREEDY)
    assert engine.running == 1, f"rejected adds changed running to {engine.running}"


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0),
                                          ("top_p", 1.5), ("seed", -1), ("stop_token_ids", (-3,))])
def test_sampling_params_reject_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_engine_rejects_bad_limits_and_non_llama_models(llama64):
    with pytest.raises(ValueError, match=r"max_len: 65; must be in \[2, 64\]"):
        Engine(llama64, eos_token_ids=[], max_len=65)
    with pytest.raises(ValueError, match="max_batch: 0"):
        Engine(llama64, eos_token_ids=[], max_batch=0, max_len=16)
    with pytest.raises(TypeError, match="Llama-like"):
        Engine(torch.nn.Linear(4, 4), eos_token_ids=[])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_with_a_seed_does_not_depend_on_batch_mates(llama64, top_p):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=top_p, seed=1234)
    prompt = [2, 7, 1, 8, 2, 8]

    def run(schedule):
        return drive(Engine(llama64, eos_token_ids=[], max_batch=4, max_len=32), schedule)[0]["r"]

    alone = run({0: [("r", prompt, params)]})
    mates = run({0: [("m1", [5, 5, 5, 5, 5, 5, 5, 5], SamplingParams(max_new_tokens=5, temperature=1.0)),
                     ("r", prompt, params)],
                 3: [("m2", [9], SamplingParams(max_new_tokens=20, temperature=0.7, seed=1))]})
    late = run({0: [("m1", [1, 2, 3], GREEDY)], 2: [("r", prompt, params)]})
    other_seed = run({0: [("r", prompt, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=top_p, seed=99))]})
    assert alone == mates == late, f"seed 1234 alone {alone}, with mates {mates}, joining late {late}"
    assert alone != other_seed, f"seeds 1234 and 99 sampled the same 16 tokens {alone}: the seed is unused"
    assert alone != solo_greedy(llama64, prompt, 16), "temperature 1.0 sampled exactly the greedy tokens"


@pytest.mark.parametrize("temperature, top_p", [(2.0, 1e-6), (1.5, 5.76e-156), (1e-300, 1.0), (1e-300, 0.5)])
def test_extreme_sampling_values_are_greedy_not_an_error(llama64, temperature, top_p):
    """A top_p below float32's resolution or a temperature near 0 once made an empty or NaN distribution
    (a 500 for the whole batch); both are the greedy token."""
    prompt = [6, 6, 2, 0, 7]
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, seed=5)
    got = drive(Engine(llama64, eos_token_ids=[], max_batch=1, max_len=32), {0: [("n", prompt, params)]})[0]["n"]
    assert got == solo_greedy(llama64, prompt, 10), \
        f"temperature={temperature} top_p={top_p} sampled {got}, expected the greedy tokens"


def test_greedy_is_deterministic_whatever_the_seed(llama64):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    outs = [drive(Engine(llama64, eos_token_ids=[], max_batch=2, max_len=32),
                  {0: [("g", prompt, SamplingParams(max_new_tokens=10, seed=seed))]})[0]["g"]
            for seed in (None, 0, 7)]
    assert outs[0] == outs[1] == outs[2] == solo_greedy(llama64, prompt, 10), f"greedy outputs differ: {outs}"


def test_quantized_linears_run_in_the_batched_forward():
    """costopt's INT8 modules replace every Linear (LM head included); tokens still equal the solo loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from costopt.quantization.schemes import preset, quantize

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.3)
    model = quantize(LlamaForCausalLM(cfg).eval(), preset("int8_weight_only"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Int8Linear", "the swap did not happen"
    prompts = {"a": [1, 2, 3, 4], "b": [50, 60], "c": [7] * 9}
    schedule = {0: [("a", prompts["a"], GREEDY)], 2: [("b", prompts["b"], GREEDY), ("c", prompts["c"], GREEDY)]}
    tokens, _, _ = drive(Engine(model, eos_token_ids=[], max_batch=3, max_len=32), schedule)
    for s, prompt in prompts.items():
        assert tokens[s] == solo_greedy(model, prompt, 12), f"{s}: quantized batch differs from its solo loop"


def test_paused_sequences_resume_where_they_left_off(llama64):
    """Pause two of three sequences for a few steps (their caches move to the top slots), let a newcomer
    join and finish meanwhile, cancel one paused sequence, resume the other: every token equals its
    prompt's own greedy run, as if nothing had happened."""
    prompts = {"a": [3, 1, 4, 1, 5], "b": [2, 7, 1, 8], "c": [9, 9, 8, 2, 4, 4], "d": [6, 6]}
    engine = Engine(llama64, eos_token_ids=[], max_batch=4, max_len=40)
    got = pause_resume(engine, prompts)
    for name in "abd":
        want = solo_greedy(llama64, prompts[name], len(got[name]))
        assert got[name] == want, f"{name}: {got[name]} != {want}"
    assert len(got["a"]) == len(got["b"]) == 12 and len(got["d"]) == 3
    assert engine.running == 0 and engine.paused == 0


@pytest.mark.parametrize("max_batch", [1, 3])
def test_calibrate_measures_every_batch_size_the_engine_allows(llama64, max_batch):
    from serving.admission import Admission, AdmissionConfig
    from serving.driver import calibrate

    engine = Engine(llama64, eos_token_ids=[], max_batch=max_batch, max_len=32)
    adm = Admission(AdmissionConfig(max_batch=max_batch, reserved_high=0))
    calibrate(engine, adm)
    assert not engine.has_work() and engine.running == 0, "calibration leaves the engine empty"
    seen = sorted(adm._steps.base)
    assert seen == list(range(1, max_batch + 1)), f"calibrated batch sizes {seen}"
    assert adm._steps.prefill_s is not None, "the prefill cost per prompt token is measured"


def test_a_failed_step_fails_its_batch_once_and_the_loop_serves_on(llama64, monkeypatch, caplog):
    """A step that raises fails the requests in it; the engine is cleared, so the next requests are
    served (a row left behind once failed every later step while the server still reported ready)."""
    import asyncio

    from serving.admission import Admission, AdmissionConfig
    from serving.driver import EngineFault, EngineLoop

    engine = Engine(llama64, eos_token_ids=[], max_batch=4, max_len=32)
    poison = SamplingParams(max_new_tokens=6, temperature=1.7, seed=1)  # marks the row that breaks steps
    real_choose = engine._choose

    def choose(logits):
        if any(s.params is poison for s in engine._rows):
            raise RuntimeError("invalid multinomial distribution")
        return real_choose(logits)

    monkeypatch.setattr(engine, "_choose", choose)

    async def run():
        loop = EngineLoop(engine, Admission(AdmissionConfig(max_batch=4, reserved_high=0,
                                                            deadline_admission=False)), name="t")
        first = loop.submit([3, 1, 4], poison)
        with pytest.raises(EngineFault) as err:
            _ = [t async for t in first]
        assert "multinomial" not in str(err.value) and err.value.incident in str(err.value), \
            f"the client sees an incident id, not the internals: {err.value}"
        logged = [r for r in caplog.records if err.value.incident in r.getMessage()]
        assert logged and "multinomial" in str(logged[0].exc_info[1]), "the server log holds the cause"
        second = loop.submit([3, 1, 4], SamplingParams(max_new_tokens=6))
        tokens = await asyncio.wait_for(_collect(second), timeout=30)
        await loop.retire()
        return tokens

    async def _collect(gen):
        return [t async for t in gen]

    tokens = asyncio.run(run())
    assert tokens == solo_greedy(llama64, [3, 1, 4], 6), "the request after the failure is served in full"
    assert engine.running == 0 and not engine.has_work(), "nothing of the failed batch is left in the engine"


def test_every_engine_step_of_the_process_runs_on_one_compute_thread(llama64):
    """Calibration on the loading thread and two variants' loops all step on the one compute thread: libgomp
    keeps a worker team per calling thread, and a second team made llama.cpp's steps 1.3x slower."""
    import asyncio
    import threading

    from serving.admission import Admission, AdmissionConfig
    from serving.driver import EngineLoop, calibrate

    seen: list[str] = []

    def engine():
        eng = Engine(llama64, eos_token_ids=[], max_batch=4, max_len=48)
        real = eng.step
        eng.step = lambda: (seen.append(threading.current_thread().name), real())[1]
        return eng

    cfg = AdmissionConfig(max_batch=4, reserved_high=0)
    engines = [engine(), engine()]
    admissions = [Admission(cfg), Admission(cfg)]
    for eng, adm in zip(engines, admissions):
        calibrate(eng, adm, sizes=(1, 2), steps=1)  # from this (the loading) thread
    calibrated = len(seen)

    async def run():
        loops = [EngineLoop(e, a, name=f"v{i}") for i, (e, a) in enumerate(zip(engines, admissions))]
        gens = [loop.submit([3, 1, 4], SamplingParams(max_new_tokens=5)) for loop in loops]
        out = [[t async for t in g] for g in gens]
        for loop in loops:
            await loop.retire()
        return out

    out = asyncio.run(run())
    assert out == [solo_greedy(llama64, [3, 1, 4], 5)] * 2
    assert calibrated > 0 and len(seen) > calibrated, "both calibration and serving stepped"
    assert len(set(seen)) == 1, f"steps ran on several threads: {sorted(set(seen))}"
    assert seen[0] != threading.current_thread().name, "not on the loading thread"
