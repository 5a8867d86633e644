"""The engine scenarios every runtime's engine passes (`engine_scenarios.py`), on the CUDA engine run on CPU
(fp32, eager): the server drives it through the same `SlotEngine` interface as the torch and llama.cpp
engines, so joins, departures, cancels and pause/resume must give each sequence its solo tokens."""
import pytest

from costopt.runtimes.cuda import CudaEngine, CudaOptions
from costopt.runtimes.slots import SamplingParams, StepEvent
from engine_scenarios import drive, pause_resume, solo_greedy, wide_llama

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def llama():
    """fp32 with a wide init, so batched and solo arithmetic do not flip an argmax."""
    return wide_llama()


def engine(model, max_batch=4):
    return CudaEngine(model, eos_token_ids=[], max_batch=max_batch, max_len=48, device="cpu",
                      options=CudaOptions(dtype="fp32", len_bucket=8, buckets=(1, 2, 4)))


def test_staggered_arrivals_and_a_cancel_leave_every_sequence_its_solo_tokens(llama):
    prompts = {f"s{i}": [(7 * i + 3 * j) % 96 for j in range(1 + (5 * i) % 13)] for i in range(7)}
    arrive = {0: ["s0", "s1"], 1: ["s2"], 3: ["s3", "s4"], 6: ["s5"], 9: ["s6"]}
    schedule = {k: [(s, prompts[s], GREEDY) for s in ids] for k, ids in arrive.items()}
    tokens, reasons, log = drive(engine(llama), schedule, cancels={5: ["s2"]})
    assert StepEvent("s2", None, "cancelled") in log[5], f"step 5 did not report s2's cancel: {log[5]}"
    assert tokens["s2"] == solo_greedy(llama, prompts["s2"], len(tokens["s2"])), "s2's tokens before its cancel"
    for s in (x for x in prompts if x != "s2"):
        assert tokens[s] == solo_greedy(llama, prompts[s], 12), f"{s}: batched tokens differ from its solo run"
        assert reasons[s] == "length", f"{s} finished with {reasons[s]!r}"


def test_paused_sequences_resume_where_they_left_off(llama):
    prompts = {"a": [3, 1, 4, 1, 5], "b": [2, 7, 1, 8], "c": [9, 9, 8, 2, 4, 4], "d": [6, 6]}
    e = engine(llama)
    got = pause_resume(e, prompts)
    for name in "abd":
        want = solo_greedy(llama, prompts[name], len(got[name]))
        assert got[name] == want, f"{name}: {got[name]} != {want}"
    assert (e.running, e.paused) == (0, 0), "every sequence left its slot"


def test_serve_options_name_a_bad_device():
    from serving.model import ServeOptions

    with pytest.raises(ValueError, match="device: 'gpu'; expected one of"):
        ServeOptions(device="gpu")


def test_server_on_cuda_without_a_device_refuses_at_start(tmp_path):
    """`--device cuda` on a machine without CUDA stops with the reason, before any model loads (never a
    silent CPU fallback)."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = subprocess.run([sys.executable, "-m", "serving", "--workspace", str(tmp_path), "--device", "cuda",
                          "--variants", "fp32"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "--device cuda: no CUDA device" in run.stderr, run.stderr[-2000:]
