"""llama.cpp runtime, pipeline side: GGUF export, llama.cpp's own logits, damaged files, unsupported models.

Real model, real llama.cpp: the built-in SmolLM2-135M is ingested once (fp32 safetensors), exported as
F32 (metadata copied from the shipped Q4_1 GGUF) and as Q8_0 (metadata built from the folder), and
scored by llama.cpp against transformers' fp32 forward. The whole file is skipped where
llama-cpp-python is not installed (the module-level importorskip below); nothing else is skipped.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from costopt.models.source import resolve_source  # noqa: E402
from costopt.params import params_from_dict  # noqa: E402
from costopt.runtimes.engine import SamplingParams  # noqa: E402
from costopt.runtimes.llamacpp import (QTYPES, ExportError, GGUFFileError, LlamaCppEngine,  # noqa: E402
                                       LlamaCppModel, NonFiniteLogits, export_gguf)
from costopt.storage.layout import Workspace  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain in one sentence what a CPU cache does.", "Name three prime numbers.", "How do I boil an egg?"]
NEW = 16  # greedy tokens compared per prompt
KL_BOUND = 0.02  # nats/token, Q8_0 vs fp32; measured 0.0063-0.0073 per prompt here
NEAR_TIE = 0.5  # logits: Q8_0's greedy may leave fp32's only where fp32's own top-2 gap is below this
THREADS = 1  # correctness only; two threads on this shared 2-core box spin on each other under load


@pytest.fixture(scope="module")
def source_gguf() -> Path:
    src = resolve_source("builtin:smollm2-135m-instruct")
    return Path(src.path) / src.gguf_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tasks.ingest import ingest

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    ingest(params_from_dict({}, profile="quick"), ws)
    return ws.model_dir


@pytest.fixture(scope="module")
def f32_gguf(model_dir, source_gguf, tmp_path_factory) -> Path:
    return export_gguf(model_dir, tmp_path_factory.mktemp("f32") / "m.gguf", "F32", source_gguf=source_gguf,
                       progress=False)


@pytest.fixture(scope="module")
def q8_gguf(model_dir, tmp_path_factory) -> Path:
    return export_gguf(model_dir, tmp_path_factory.mktemp("q8") / "m.gguf", "Q8_0", progress=False)


@pytest.fixture(scope="module")
def torch_runs(model_dir):
    """Per prompt: (prompt ids, fp32 greedy continuation, fp32 log-probs [T, V] over prompt + continuation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runs, threads = [], torch.get_num_threads()
    torch.set_num_threads(THREADS)  # restored below: other test files share this process
    try:
        for text in PROMPTS:
            ids = list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"])
            with torch.inference_mode():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
                logp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0], -1).numpy()
            runs.append((ids, gen, logp))
    finally:
        torch.set_num_threads(threads)
    return runs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _fields(path: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def source_fields(source_gguf) -> dict:
    return _fields(source_gguf)


def test_qtypes_are_llama_cpps_own_file_types():
    import llama_cpp

    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}
    for qtype, value in QTYPES.items():
        want = getattr(llama_cpp, f"LLAMA_FTYPE_{names.get(qtype, 'MOSTLY_' + qtype)}")
        assert value == want, f"{qtype}: costopt says llama_ftype {value}, llama.cpp says {want}"


def test_f32_export_reproduces_the_shipped_gguf_tensor_for_tensor(f32_gguf, source_gguf, source_fields):
    """The ingested weights are the Q4_1 file de-quantized (Q/K un-permuted by transformers); written back,
    every tensor must equal the original's de-quantization bit for bit (Q/K permuted back)."""
    import gguf
    from gguf.quants import dequantize

    ours = {t.name: t for t in gguf.GGUFReader(str(f32_gguf)).tensors}
    theirs = gguf.GGUFReader(str(source_gguf)).tensors
    assert sorted(ours) == sorted(t.name for t in theirs), "the export's tensor names differ from the source's"
    for t in theirs:
        want = dequantize(t.data, t.tensor_type)
        got = np.asarray(ours[t.name].data)
        assert ours[t.name].tensor_type == gguf.GGMLQuantizationType.F32, f"{t.name} is not F32"
        assert got.shape == want.shape and np.array_equal(got, want), \
            f"{t.name}: max |export - source| = {np.abs(got - want).max() if got.shape == want.shape else got.shape}"
    src, out = source_fields, _fields(f32_gguf)
    assert out["general.file_type"] == 0, f"file_type {out['general.file_type']}, expected 0 (ALL_F32)"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert out[key] == src[key], f"{key} was not copied from the source GGUF"


def test_metadata_built_from_the_folder_matches_the_shipped_gguf(q8_gguf, source_fields):
    """Without source_gguf, hparams and the tokenizer come from config.json + tokenizer.json; they must
    describe the same model as the file it was ingested from (naming keys aside)."""
    import gguf

    src, out = source_fields, _fields(q8_gguf)
    descriptive = {k for k in src if k.startswith("general.")} - {"general.architecture"}
    for key in sorted(set(src) - descriptive - {"tokenizer.ggml.pre", "general.file_type"}):
        assert key in out, f"{key} missing from the exported metadata"
        assert out[key] == src[key], f"{key}: exported {str(out[key])[:80]!r}, source {str(src[key])[:80]!r}"
    assert out["general.file_type"] == QTYPES["Q8_0"], f"file_type {out['general.file_type']}, expected Q8_0"
    # the ingested tokenizer.json splits with GPT-2's regex alone (the source's 'smollm' also splits digits)
    assert out["tokenizer.ggml.pre"] == "gpt-2", f"pre-tokenizer {out['tokenizer.ggml.pre']!r}"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(q8_gguf)).tensors}
    assert all(v == gguf.GGMLQuantizationType.Q8_0 for k, v in types.items() if not k.endswith("norm.weight")), \
        "every matrix of a Q8_0 export must be Q8_0"


def test_f32_gguf_under_llama_cpp_equals_the_torch_model(f32_gguf, torch_runs):
    """Same weights, two programs: llama.cpp's F32 logits must match transformers' (KL near 0)."""
    model = LlamaCppModel(f32_gguf, n_threads=THREADS, n_ctx=256)
    for ids, gen, logp in torch_runs:
        got = _log_softmax(model.logits(ids + gen))
        kl = float((np.exp(logp) * (logp - got)).sum(-1).mean())
        assert kl < 1e-4, f"F32 llama.cpp vs fp32 torch: mean KL {kl:.2e} nats/token (a permutation bug is ~1)"
    model.close()


def test_q8_0_logits_track_the_fp32_model(q8_gguf, torch_runs):
    model = LlamaCppModel(q8_gguf, n_threads=THREADS, n_ctx=256)
    identical = 0
    for ids, gen, logp in torch_runs:
        logits = model.logits(ids + gen)
        assert logits.shape == (len(ids) + len(gen), 49152) and logits.dtype == np.float32, \
            f"logits shape {logits.shape} {logits.dtype}, expected [T, 49152] float32"
        got = _log_softmax(logits)
        kl = float((np.exp(logp) * (logp - got)).sum(-1).mean())
        top1 = float((logp.argmax(-1) == got.argmax(-1)).mean())
        assert kl < KL_BOUND, f"Q8_0 vs fp32: mean KL {kl:.4f} nats/token over {len(got)} positions > {KL_BOUND}"
        assert top1 >= 0.9, f"Q8_0 vs fp32: top-1 agreement {top1:.3f} < 0.9"
        greedy = model.greedy(ids, NEW)
        assert greedy[0] == int(got[len(ids) - 1].argmax()), "greedy's first token is not logits' argmax"
        k = next((i for i, (a, b) in enumerate(zip(greedy, gen)) if a != b), None)
        if k is None:
            identical += 1
            continue
        top2 = np.sort(logp[len(ids) - 1 + k])[-2:]
        assert top2[1] - top2[0] < NEAR_TIE, \
            f"Q8_0 greedy left fp32's at token {k} where fp32 prefers its token by {top2[1] - top2[0]:.2f} nats"
    assert identical >= 1, f"no prompt's {NEW} greedy tokens equal fp32's (2 of 7 did for 24 tokens when measured)"
    model.close()


def test_engine_on_the_q8_0_export_equals_solo_greedy(q8_gguf):
    """Staggered arrivals in the batching engine: every sequence's tokens equal its own greedy loop."""
    rng = np.random.default_rng(0)
    prompts = {f"s{i}": rng.integers(100, 49152, n).tolist() for i, n in enumerate((1, 5, 17, 40, 64, 65, 90))}
    arrive = {0: ["s0", "s1"], 1: ["s2"], 2: ["s3", "s4"], 5: ["s5"], 9: ["s6"]}
    solo = LlamaCppModel(q8_gguf, n_threads=THREADS, n_ctx=160)
    want = {s: solo.greedy(p, 10) for s, p in prompts.items()}
    engine = LlamaCppEngine(q8_gguf, eos_token_ids=[], max_batch=4, max_len=128, n_threads=THREADS)
    got, queue = {s: [] for s in prompts}, []
    for step in range(200):
        queue += arrive.get(step, [])
        while queue and engine.running < engine.max_batch:
            s = queue.pop(0)
            engine.add(s, prompts[s], SamplingParams(max_new_tokens=10))
        if not engine.has_work() and not queue and step > max(arrive):
            break
        for ev in engine.step():
            got[ev.seq_id].append(ev.token_id)
    for s in prompts:
        assert got[s] == want[s], f"{s} ({len(prompts[s])} prompt tokens) batched {got[s]} != alone {want[s]}"
    engine.close()
    solo.close()


def test_flash_attention_scoring_is_the_decode_arithmetic_and_is_gated_on_its_own(q8_gguf, torch_runs):
    """flash_attn: scoring in FA_BLOCK-position blocks picks, token for token, what one-token decode steps
    pick (the path that serves answer tokens), the engine equals the FA greedy loop, and FA's logits
    track fp32 within the same bound as the plain path's (a broken kernel would be ~1 nat off)."""
    from costopt.runtimes.llamacpp import FA_BLOCK

    fa = LlamaCppModel(q8_gguf, n_threads=THREADS, n_ctx=256, flash_attn=True)
    plain = LlamaCppModel(q8_gguf, n_threads=THREADS, n_ctx=256)
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 49152, 20).tolist()
    gen = fa.greedy(prompt, 3 * FA_BLOCK)  # one token per llama_decode after the prompt
    logits = fa.logits(prompt + gen)  # teacher forced, in blocks
    steps = logits[len(prompt) - 1:len(prompt) - 1 + len(gen)].argmax(-1).tolist()
    assert steps == gen, "FA teacher-forced argmax differs from FA's own one-token decode steps"
    for ids, cont, logp in torch_runs:
        fa_logits, plain_logits = fa.logits(ids + cont), plain.logits(ids + cont)
        kl = float((np.exp(logp) * (logp - _log_softmax(fa_logits))).sum(-1).mean())
        assert kl < KL_BOUND, f"Q8_0 with flash attention vs fp32: mean KL {kl:.4f} nats/token > {KL_BOUND}"
        assert not np.array_equal(fa_logits, plain_logits), "flash_attn=True ran the plain attention path"
    prompts = {f"s{i}": rng.integers(100, 49152, n).tolist() for i, n in enumerate((3, 17, 40, 70))}
    engine = LlamaCppEngine(q8_gguf, eos_token_ids=[], max_batch=3, max_len=128, n_threads=THREADS, flash_attn=True)
    got = {s: [] for s in prompts}
    for s, ids in list(prompts.items())[:3]:
        engine.add(s, ids, SamplingParams(max_new_tokens=8))
    late = True
    while engine.has_work():
        for ev in engine.step():
            got[ev.seq_id].append(ev.token_id)
            if ev.finish_reason and late:
                engine.add("s3", prompts["s3"], SamplingParams(max_new_tokens=8))
                late = False
    for s, ids in prompts.items():
        assert got[s] == fa.greedy(ids, 8), f"{s}: the FA engine differs from the FA greedy loop"
    engine.close()
    fa.close()
    plain.close()


def test_damaged_gguf_files_are_named(q8_gguf, tmp_path):
    data = q8_gguf.read_bytes()
    cases = {"missing.gguf": None, "empty.gguf": b"", "garbage.gguf": b"not a gguf file at all" * 100,
             "half.gguf": data[: len(data) // 2], "tail-cut.gguf": data[:-4096],
             "bad-header.gguf": data[:8] + b"\xff" * 64 + data[72:]}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(GGUFFileError, match=name):
            LlamaCppModel(path, n_threads=THREADS, n_ctx=64)


def test_non_finite_logits_raise(f32_gguf, tmp_path):
    """A NaN in the final norm's weights reaches every logit of an F32 file; scoring must refuse, not
    average NaN. (In a quantized file it cannot: llama.cpp quantizes the LM head's input to 8 bits,
    which turns NaN into finite garbage, so only the quality gates catch such a file.)"""
    import gguf

    norm = next(t for t in gguf.GGUFReader(str(f32_gguf)).tensors if t.name == "output_norm.weight")
    broken = tmp_path / "nan.gguf"
    shutil.copyfile(f32_gguf, broken)
    with open(broken, "r+b") as fh:
        fh.seek(norm.data_offset)
        fh.write(np.full(4, np.nan, dtype=np.float32).tobytes())
    model = LlamaCppModel(broken, n_threads=THREADS, n_ctx=64)
    with pytest.raises(NonFiniteLogits, match="non-finite logits"):
        model.logits([1, 2, 3])
    model.close()


def _folder_with(model_dir: Path, tmp: Path, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """A model folder linking to the real weights, with config.json / tokenizer.json edited."""
    import json

    folder = tmp / "m"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).symlink_to(f)
    for name, edit in (("config.json", config), ("tokenizer.json", tokenizer)):
        if edit is not None:
            data = json.loads((model_dir / name).read_text())
            (folder / name).unlink()
            (folder / name).write_text(json.dumps(_merge(data, edit)))
    return folder


def _merge(base: dict, edit: dict) -> dict:
    out = dict(base)
    for k, v in edit.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("config, tokenizer, needle", [
    ({"architectures": ["GPT2LMHeadModel"]}, None, "architectures is \\['GPT2LMHeadModel'\\]"),
    ({"model_type": "mistral"}, None, "model_type is 'mistral'"),
    ({"attention_bias": True}, None, "attention_bias is True"),
    ({"hidden_act": "gelu"}, None, "hidden_act is 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3"}}, None, "rope_type is 'llama3'"),
    (None, {"model": {"type": "Unigram"}}, "tokenizer.json: model.type 'Unigram'"),
    (None, {"pre_tokenizer": {"type": "Metaspace"}}, "pre_tokenizer \\['Metaspace'\\]"),
    ({"num_hidden_layers": 31}, None, "tensors missing for a 31-layer Llama"),
])
def test_unsupported_models_raise_export_error_and_keep_the_old_file(model_dir, tmp_path, config, tokenizer, needle):
    folder = _folder_with(model_dir, tmp_path, config, tokenizer)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    with pytest.raises(ExportError, match=needle):
        export_gguf(folder, out, "F16", progress=False)
    assert out.read_bytes() == b"the previous export", "a failed export touched the existing file"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"], "a failed export left temporaries"


def test_bad_qtype_and_mismatched_source_are_named(model_dir, tmp_path, source_gguf):
    with pytest.raises(ExportError, match="qtype: 'Q3_K'; expected one of"):
        export_gguf(model_dir, tmp_path / "x.gguf", "Q3_K")
    folder = _folder_with(model_dir, tmp_path, {"intermediate_size": 2048})
    with pytest.raises(ExportError, match="llama.feed_forward_length is 1536 but config.json intermediate_size is 2048"):
        export_gguf(folder, tmp_path / "y.gguf", "F32", source_gguf=source_gguf)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists(), "a refused export wrote a file"
