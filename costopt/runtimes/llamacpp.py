"""llama.cpp as a costopt runtime: GGUF export, teacher-forced logits, a continuous-batching engine.

Three pieces, all driving llama.cpp itself through llama-cpp-python's low-level ctypes bindings
(pinned `llama-cpp-python==0.3.36`; imported lazily, so this module imports without it and each entry
point raises `RuntimeUnavailable` saying what to install):
- `export_gguf(model_dir, out, qtype)`: an ingested fp32 safetensors Llama -> one GGUF of a llama.cpp
  type (F32, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0). F32/F16 are written with the `gguf` package; the
  others are quantized from that F32 file by llama.cpp's own `llama_model_quantize`. Atomic.
- `LlamaCppModel(path).logits(ids)`: [T, vocab] logits at every position from one `llama_decode`, so
  the quality gates (KL, top-1, perplexity) measure llama.cpp's own arithmetic, not a torch twin's.
- `LlamaCppEngine`: the interface and semantics of `costopt.runtimes.engine.Engine` (add, cancel,
  pause, resume, clear, step; same EOS/stop/length rules and the same seeded sampler), so the server
  and the load test drive either. A step is ONE `llama_decode` over the newest token of every running
  sequence plus the prompts of newcomers, each under its own llama.cpp sequence id.

    python -m costopt.runtimes.llamacpp export --model artifacts/model --qtype Q4_K_M --out m.gguf
    python -m costopt.runtimes.llamacpp bench --gguf q8_0.gguf q4_k_m.gguf --batch 1 4 16 --threads 1

Export. transformers' GGUF loader un-permutes Q and K (llama.cpp keeps each head's rotary halves
interleaved), so the export permutes them back: an F32 export of the ingested built-in model equals the
shipped Q4_1 file's de-quantized tensors bit for bit, and its logits match transformers' fp32 forward
(KL < 1e-4; tests/test_llamacpp.py). Metadata is copied from `source_gguf` when given, else built from
config.json + tokenizer.json (byte-level BPE only; the ingested tokenizer.json maps to llama.cpp's
'gpt-2' pre-tokenizer, where the shipped file says 'smollm', which also splits digits one by one).
K-quants need rows that are multiples of 256 and hidden 576 is not, so llama.cpp falls back for those
tensors: our "Q4_K_M" is 180 of 272 tensors Q5_0/Q8_0 (Q4_K only in the 1536-wide ffn_down), Q6_K
keeps token_embd at Q8_0. Q8_0 against the fp32 model: mean KL 0.006-0.007 nats/token on five chat
prompts, top-1 93-98%; its greedy text leaves fp32's only where fp32's own top-2 gap is < 0.5.

Engine layout, measured. One unified KV cell pool is what llama.cpp's server uses by default, but there
a sequence's cells land in whatever holes finished sequences left, which changes the order llama.cpp
sums attention in; with Q8_0's 8-bit activations that moved a sequence's logits by up to 1.0 once a
batch mate finished, so its tokens depended on its batch mates. CPU flash attention likewise takes a
tiled path from 64 query rows on, so a prompt's logits changed with how a batch split it (up to 0.5).
So: one KV stream per slot (`kv_unified=False`) and flash attention off by default (a variant may turn
it on, `flash_attn`: docs/runtimes.md). Then every sequence's logits equal a solo run's bit for bit for Q8_0, Q4_0 and Q4_1 (randomised tests: many prompt lengths,
arrivals, pause/resume); K-quant files are not bit-stable (llama.cpp's Q4_K kernels handle 4-row groups
and leftovers differently), their tokens may differ at near-ties. llama.cpp splits a multi-stream batch
into ubatches of consecutive sequence ids, so running sequences keep slots 0..n-1 (a finished one's
slot takes the last one's stream, via llama.cpp's own cross-stream `llama_memory_seq_cp`), newcomers
take the next slots, paused ones stack down from the top, slot max_batch is a spare for swaps: a decode
step is one ubatch, one pass over the weights. Per-slot streams were also faster than one pool at
batch 16 here (162 vs 110 tokens per CPU-second, Q8_0, 1 thread), since each token attends only its
own cells. (The figures in this paragraph come from one-off probes of llama.cpp, not from `bench`;
the exactness they motivate is what tests/serving/test_llamacpp_engine.py checks.)

Speed on the shared 2-core box (SmolLM2-135M, prompts of 40-80 tokens, 64 new tokens, decode tok/s
after the prefill step summed over the batch; median of 5 rounds interleaved in one process; load
average about 4 from other jobs throughout, so also tokens per CPU-second of this process):

    1 thread          | Llama.generate | engine bs1 | engine bs4 | engine bs16 | bs1 / generate | bs16 / bs1
    Q8_0   tok/s      |           50.4 |       47.8 |       83.4 |       138.3 |           0.95 |       2.89
           tok/CPU-s  |           69.4 |       61.8 |       87.8 |       163.1 |           0.89 |       2.64
    Q4_K_M tok/s      |           54.9 |       54.4 |       90.4 |       148.4 |           0.99 |       2.73
           tok/CPU-s  |           68.1 |       70.8 |      121.4 |       169.5 |           1.04 |       2.39

At batch 1 the engine is as fast as llama-cpp-python's own `Llama.generate` (ratios 0.9-1.0, within
the noise); batching gives 2.4-2.9x at 16, far less than the torch engine's 7.4x because llama.cpp's
batch-1 step has no per-op dispatch to amortise (one core computes 16 rows per weight pass). With two
threads (`--threads 2`, the default) the figures collapse whenever another job holds a core: llama.cpp's
two workers meet at a barrier after every op, so one descheduled thread stalls both. Two runs of the
same command, 40 minutes apart (load 3 and 4): Q8_0 Llama.generate 82.2 and 16.6 tok/s, engine bs1
41.2 and 7.5, bs16 13.6 and 24.8; Q4_K_M bs4 48.7 and 10.4, below bs1 in the second. Those say
nothing about either program; give llama.cpp at most as many threads as there are free cores, and
rerun the 2-thread table on an idle machine.
"""
from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from costopt.runtimes.base import RuntimeFailure, RuntimeUnavailable
from costopt.runtimes.slots import Seq, SlotEngine, StepBatch, bench_prompts, time_engine

QTYPES: dict[str, int] = {  # name -> llama.h `enum llama_ftype` (checked against llama_cpp in the tests)
    "F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2,
}
PIN = "llama-cpp-python==0.3.36"
_LOG = logging.getLogger("costopt.llamacpp")


class ExportError(RuntimeFailure, ValueError):
    """The model or the export request does not fit a llama.cpp GGUF; the message names the field."""


class GGUFFileError(RuntimeFailure, ValueError):
    """A GGUF file is missing, truncated or corrupt; the message names the file."""


class NonFiniteLogits(RuntimeFailure, FloatingPointError):
    """llama.cpp produced NaN or inf logits (a broken file or an overflowing quantization)."""


# -- llama.cpp, loaded once -------------------------------------------------------------------------
_STATE: dict[str, Any] = {}
_RECENT: collections.deque[str] = collections.deque(maxlen=12)  # llama.cpp's last warnings/errors
# ggml_log_level as this llama.cpp numbers it (DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5; llama-cpp-python's
# own _logger.py still assumes the older INFO 1 ... DEBUG 4); INFO is chatter (every key/value on load)
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


def _on_log(level: int, text: bytes, _user: Any) -> None:
    """llama.cpp's log lines go to Python logging (its INFO chatter at DEBUG); warnings and errors are
    kept so that a failed load or quantization can say why."""
    py_level = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)  # 5 = continuation
    _last_level[0] = py_level
    line = text.decode("utf-8", "replace").rstrip("\n")
    if py_level >= logging.WARNING and line:
        _RECENT.append(line)
    _LOG.log(py_level, "%s", line)


def llama_cpp_lib() -> Any:
    """The llama_cpp module, initialised once (backend, logging), or RuntimeUnavailable saying why not."""
    if "lib" in _STATE:
        return _STATE["lib"]
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailable(f"llama-cpp-python is not installed: {exc}; install it with "
                                 f"`pip install {PIN}` (it builds llama.cpp from source)") from exc
    except (OSError, RuntimeError) as exc:  # the package is there but libllama failed to load
        raise RuntimeUnavailable(f"llama-cpp-python is installed but its shared library failed to load: "
                                 f"{exc}; reinstall it with `pip install --force-reinstall {PIN}`") from exc
    callback = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _STATE.update(lib=llama_cpp, log_callback=callback)  # the callback must outlive every llama.cpp call
    return llama_cpp


def _recent_log() -> str:
    lines = [line for line in _RECENT if line.strip()]
    _RECENT.clear()
    return "; ".join(lines[-4:]) or "no message from llama.cpp"


# -- export ------------------------------------------------------------------------------------------
def export_gguf(model_dir: Path, out: Path, qtype: str, source_gguf: Path | None = None,
                progress: bool = True) -> Path:
    """Write the fp32 safetensors Llama in `model_dir` as one GGUF of llama.cpp type `qtype` at `out`.

    Atomic: everything is written to temporary files next to `out` and renamed at the end, so a failed
    export leaves `out` as it was (absent, or the previous file) and no temporaries.
    """
    model_dir, out = Path(model_dir), Path(out)
    if qtype not in QTYPES:
        raise ExportError(f"qtype: {qtype!r}; expected one of {sorted(QTYPES)}")
    config = llama_config(model_dir)
    llama = llama_cpp_lib() if qtype not in ("F32", "F16") else None  # fail before writing 0.5 GB
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    base = tmp if llama is None else out.with_name(f".{out.name}.{os.getpid()}.f32.tmp")
    try:
        _write_gguf(model_dir, config, base, "F16" if qtype == "F16" else "F32", source_gguf, progress)
        if llama is not None:
            _quantize(llama, base, tmp, qtype)
        os.replace(tmp, out)
    finally:
        for path in {tmp, base}:
            path.unlink(missing_ok=True)
    return out


def llama_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model that llama.cpp's `llama` architecture runs as is, or ExportError naming the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; export needs an ingested model folder (config.json + *.safetensors)")
    config = json.loads(path.read_text())
    expect = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False}
    defaults = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}  # transformers' own
    for field, want in expect.items():
        got = config.get(field, defaults.get(field))
        if got != want:
            raise ExportError(f"{path}: {field} is {got!r}; the llama.cpp export supports {want!r} only "
                              f"(plain Llama: SiLU MLP, no biases)")
    return config


_TENSOR_NAMES = {  # HF name (layer part as {i}) -> GGUF name
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """HF parameter name -> GGUF tensor name, or ExportError for a tensor llama.cpp's llama has no slot for."""
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        if key in _TENSOR_NAMES:
            return _TENSOR_NAMES[key].format(i=int(parts[2]))
    elif hf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[hf_name]
    raise ExportError(f"tensor {hf_name!r}: no llama.cpp llama tensor takes it (expected only "
                      f"embeddings, norms, q/k/v/o projections, gate/up/down and lm_head)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's: rows [heads, 2, hd/2] -> [heads, hd/2, 2] (llama.cpp's
    convert_hf_to_gguf `permute`; transformers' GGUF loader applies the inverse). w: [heads*hd, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model_dir: Path, config: dict[str, Any], path: Path, ftype: str, source_gguf: Path | None,
                progress: bool) -> None:
    import gguf
    from safetensors import safe_open

    writer = gguf.GGUFWriter(str(path), "llama")
    if source_gguf is not None:
        _copy_metadata(Path(source_gguf), config, writer)
    else:
        _metadata_from_config(model_dir, config, writer)
    writer.add_file_type(QTYPES[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tied = config.get("tie_word_embeddings", False)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors weights; run the ingest phase first")
    written = set()
    for file in files:
        with safe_open(str(file), framework="numpy") as fh:
            for name in fh.keys():
                if name == "lm_head.weight" and tied:
                    continue  # llama.cpp reads the tied head from token_embd
                target = gguf_tensor_name(name)
                w = fh.get_tensor(name).astype(np.float32, copy=False)
                if target.endswith("attn_q.weight"):
                    w = permute_qk(w, n_head)
                elif target.endswith("attn_k.weight"):
                    w = permute_qk(w, n_kv)
                if ftype == "F16" and w.ndim == 2:  # 1-D norms stay F32, as llama.cpp's converter does
                    w = w.astype(np.float16)
                writer.add_tensor(target, np.ascontiguousarray(w))
                written.add(target)
    expected = {_TENSOR_NAMES[k].format(i=i) for k in _TENSOR_NAMES if "{i}" in k
                for i in range(config["num_hidden_layers"])}
    expected |= {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    if missing := sorted(expected - written):
        raise ExportError(f"{model_dir}: tensors missing for a {config['num_hidden_layers']}-layer Llama: "
                          f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()  # also on failure: export_gguf then removes the half-written file


_CHECKED_HPARAMS = {  # GGUF key (after "llama.") -> config.json field
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
}
_SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


def _copy_metadata(source: Path, config: dict[str, Any], writer: Any) -> None:
    """Every key/value of `source` (hparams, tokenizer, chat template) after checking it describes this model."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(source))
    except (OSError, ValueError, IndexError) as exc:  # gguf raises these on damaged headers
        raise GGUFFileError(f"{source}: not a readable GGUF file ({exc})") from exc
    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch != "llama":
        raise ExportError(f"source_gguf {source}: general.architecture is {arch!r}; expected 'llama'")
    for key, cfg_key in _CHECKED_HPARAMS.items():
        have = fields.get(f"llama.{key}")
        want = config.get(cfg_key, config["num_attention_heads"] if cfg_key == "num_key_value_heads" else None)
        if have is None or int(have.contents()) != want:
            raise ExportError(f"source_gguf {source}: llama.{key} is {None if have is None else have.contents()}"
                              f" but config.json {cfg_key} is {want}; pass the GGUF the model was ingested "
                              f"from, or no source_gguf")
    for key, field in fields.items():
        if key.startswith("GGUF.") or key in _SKIPPED_KEYS:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub_type == gguf.GGUFValueType.ARRAY:
            raise ExportError(f"source_gguf {source}: {key} is a nested array, which the export cannot copy")
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _metadata_from_config(model_dir: Path, config: dict[str, Any], writer: Any) -> None:
    """Hparams from config.json, vocabulary from tokenizer.json (byte-level BPE, llama.cpp's "gpt2")."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{model_dir}/config.json: rope_parameters.rope_type is {rope_type!r}; only 'default' "
                          f"rotary embeddings are exported (pass source_gguf to copy a scaled-rope setup)")
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_bpe_vocab(model_dir, config["vocab_size"], writer)


def _pre_tokenizer(spec: dict[str, Any] | None, path: Path) -> str:
    """tokenizer.json's pre_tokenizer -> llama.cpp's `tokenizer.ggml.pre` (the regexes it splits with)."""
    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [(s or {}).get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2"  # GPT-2's regex (llama.cpp spells it with a hyphen; "gpt2" is refused on load)
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"  # one digit per piece, then GPT-2's regex
    raise ExportError(f"{path}: pre_tokenizer {kinds} is not one llama.cpp's 'gpt-2' or 'smollm' pre-tokenizer "
                      f"reproduces; pass source_gguf to copy a known tokenizer")


def _add_bpe_vocab(model_dir: Path, n_vocab: int, writer: Any) -> None:
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; the export needs the tokenizer (or pass source_gguf)")
    spec = json.loads(path.read_text())
    kind = spec.get("model", {}).get("type")
    if kind != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{path}: model.type {kind!r} with decoder {(spec.get('decoder') or {}).get('type')!r};"
                          f" only byte-level BPE (GPT-2 style, llama.cpp 'gpt2') is exported")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), path)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for text, i in list(spec["model"]["vocab"].items()) + [(t["content"], t["id"]) for t in added.values()]:
        if not 0 <= i < n_vocab:
            raise ExportError(f"{path}: token {text!r} has id {i}, outside config.json vocab_size {n_vocab}")
        tokens[i] = text
        types[i] = (gguf.TokenType.NORMAL if i not in added else
                    gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError(f"{path}: no BPE merges found; the tokenizer cannot be rebuilt without them")
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # byte-level BPE models prepend nothing unless tokenizer_config says so
    writer.add_add_space_prefix(False)


def _quantize(llama: Any, src: Path, dst: Path, qtype: str) -> None:
    params = llama.llama_model_quantize_default_params()
    params.ftype = QTYPES[qtype]
    params.nthread = 0  # 0 = every core
    _RECENT.clear()
    rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"qtype {qtype}: llama_model_quantize failed with code {rc}: {_recent_log()}")


# -- loading and running a GGUF ----------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise GGUFFileError(f"{path}: not a GGUF file (it does not start with the GGUF magic); re-export it")


FA_BLOCK = 32  # positions per llama_decode when scoring with flash attention (below its tiled-path size)


class _Batch:
    """A llama_batch of `capacity` tokens with numpy views on its token/pos/logits arrays."""

    def __init__(self, llama: Any, capacity: int) -> None:
        self.llama, self.capacity = llama, capacity
        self.raw = llama.llama_batch_init(capacity, 0, 1)
        self.token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))  # int32
        self.pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))  # int32
        self.n_seq = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))  # int32
        self.out = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))  # int8: 1 = logits wanted
        self.n_seq[:] = 1
        self._seq_of = [-1] * capacity  # the seq id last written into slot i (a pointer per token)

    def fill(self, ids: Sequence[int], pos: Sequence[int], seqs: Sequence[int], outputs: Sequence[int]) -> None:
        n = len(ids)
        if n > self.capacity:
            raise ValueError(f"batch: {n} tokens exceed its capacity of {self.capacity}")
        self.token[:n], self.pos[:n], self.out[:n] = ids, pos, 0
        self.out[list(outputs)] = 1
        seq_id, known = self.raw.seq_id, self._seq_of
        for i, s in enumerate(seqs):
            if known[i] != s:
                seq_id[i][0] = known[i] = s
        self.raw.n_tokens = n


def _free(llama: Any, ctx: Any, model: Any, batch: Any) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)


class _Context:
    """One loaded GGUF with one llama.cpp context (KV cache for `n_seq` sequences) and one batch."""

    def __init__(self, path: Path, *, n_threads: int, n_ctx: int, n_batch: int, n_seq: int, n_outputs: int,
                 unified: bool = True, seq_len: int | None = None, flash_attn: bool = False) -> None:
        path = Path(path)
        _check_file(path)
        llama = llama_cpp_lib()
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = 0
        _RECENT.clear()
        model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise GGUFFileError(f"{path}: llama.cpp cannot load it ({_recent_log()}); the file is truncated "
                                f"or corrupt, re-export it")
        n_ctx_train = llama.llama_model_n_ctx_train(model)
        if seq_len is not None and not 2 <= seq_len <= n_ctx_train:
            llama.llama_model_free(model)
            raise ValueError(f"max_len: {seq_len}; must be in [2, {n_ctx_train}] (the model's context length)")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        cparams.n_seq_max, cparams.n_outputs_max, cparams.n_outputs_max_per_seq = n_seq, n_outputs, 0
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.kv_unified = unified  # False: a KV stream per sequence (see LlamaCppEngine)
        # Off by default: the CPU flash-attention kernel rounds differently (KL 0.0056 nats/token against
        # the plain path on chat text, Q8_0; the same distance to fp32) and takes a tiled path for long
        # query blocks, so a prompt's logits change with how a batch splits it. On (the runtime's
        # `flash_attn`), decode steps run 1.4-1.7x faster; the variant is gated on FA's own logits.
        cparams.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            llama.llama_model_free(model)
            raise RuntimeError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens for {n_seq} "
                               f"sequences ({_recent_log()}); lower max_batch or max_len")
        self.llama, self.path, self.model, self.ctx = llama, path, model, ctx
        self.mem = llama.llama_get_memory(ctx)
        self.vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        self.n_ctx_train = n_ctx_train
        self.n_ctx = llama.llama_n_ctx(ctx)
        self.batch = _Batch(llama, n_batch)
        self._finalizer = weakref.finalize(self, _free, llama, ctx, model, self.batch.raw)

    def close(self) -> None:
        self._finalizer()

    def decode(self, ids: Sequence[int], pos: Sequence[int], seqs: Sequence[int], outputs: Sequence[int]) -> None:
        self.batch.fill(ids, pos, seqs, outputs)
        rc = self.llama.llama_decode(self.ctx, self.batch.raw)
        if rc != 0:
            raise RuntimeError(f"{self.path.name}: llama_decode of {len(ids)} tokens failed with code {rc} "
                               f"(1: no KV slot, 2: aborted, <0: error): {_recent_log()}")

    def row(self, i: int) -> np.ndarray:
        """Logits [vocab] of batch position i (a view valid until the next decode)."""
        ptr = self.llama.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"{self.path.name}: llama.cpp returned no logits for batch position {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))

    def check_ids(self, ids: Sequence[int], what: str = "prompt") -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{what}: empty; it needs at least 1 token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"{what}: token ids must be in [0, {self.vocab_size}) (the vocabulary)")
        return ids


class LlamaCppModel:
    """A GGUF file under llama.cpp, for scoring: teacher-forced logits and a plain greedy loop."""

    def __init__(self, path: str | Path, n_threads: int = 2, n_ctx: int = 2048, flash_attn: bool = False) -> None:
        self._c = _Context(Path(path), n_threads=n_threads, n_ctx=n_ctx, n_batch=n_ctx, n_seq=1, n_outputs=n_ctx,
                           flash_attn=flash_attn)
        self.path, self.vocab_size, self.n_ctx = self._c.path, self._c.vocab_size, self._c.n_ctx
        # FA: teacher-forced in blocks of FA_BLOCK positions, so each position's attention takes the path a
        # decode step takes (one query row per sequence), not the tiled one of a long block: the gates
        # then measure the arithmetic that serves the answer tokens (tested bit for bit)
        self.block = FA_BLOCK if flash_attn else None

    def close(self) -> None:
        self._c.close()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [T, vocab]: row t is the next-token logits after token_ids[:t+1] (one llama_decode)."""
        ids = self._c.check_ids(token_ids, "token_ids")
        if len(ids) > self.n_ctx:
            raise ValueError(f"token_ids: {len(ids)} tokens exceed n_ctx={self.n_ctx}; open the model with a "
                             f"larger n_ctx")
        llama = self._c.llama
        llama.llama_memory_clear(self._c.mem, False)  # cells emptied (masked out); their bytes need no zeroing
        t = len(ids)
        block = self.block or t
        parts = []
        for s in range(0, t, block):
            n = min(block, t - s)
            self._c.decode(ids[s:s + n], range(s, s + n), [0] * n, range(n))
            parts.append(np.ctypeslib.as_array(llama.llama_get_logits(self._c.ctx), shape=(n, self.vocab_size)).copy())
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
            raise NonFiniteLogits(f"{self.path}: non-finite logits at {len(bad)} of {t} positions (first at "
                                  f"{int(bad[0])}); the file's weights are broken or overflow")
        return out

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Argmax decoding of one prompt, one token per llama_decode: the reference for the engine."""
        ids = self._c.check_ids(prompt_ids)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt: {len(ids)} tokens + {max_new_tokens} new exceed n_ctx={self.n_ctx}")
        self._c.llama.llama_memory_clear(self._c.mem, False)
        self._c.decode(ids, range(len(ids)), [0] * len(ids), [len(ids) - 1])
        out, stops = [], set(stop_ids)
        for n in range(max_new_tokens):
            tok = int(np.argmax(self._c.row(-1)))
            out.append(tok)
            if tok in stops or n == max_new_tokens - 1:
                break
            self._c.decode([tok], [len(ids) + n], [0], [0])
        return out


# -- the engine ---------------------------------------------------------------------------------------
class LlamaCppEngine(SlotEngine):
    """Continuous batching on llama.cpp, with `costopt.runtimes.engine.Engine`'s interface and semantics.

    Slot i is llama.cpp sequence id i with its own KV stream: rows in slots 0..n-1, newcomers next,
    paused sequences from max_batch - 1 down, slot max_batch a spare for swaps (the module docstring
    says why), then one stream per prefix-cache entry (`slots.SlotEngine`). A move is llama.cpp's
    cross-stream copy, applied in order at the next decode. Memory, allocated up front:
    (max_batch + 1 + prefix_cache) streams of max_len cells rounded up to 256, f16 K and V, 23 KB a
    cell for the built-in model, so 16 x 2048 is 0.8 GB. Not thread-safe, like Engine.
    """

    PREFIX_CACHE = True

    def __init__(self, gguf: str | Path, *, eos_token_ids: Sequence[int], max_batch: int = 16,
                 max_len: int = 2048, n_threads: int = 2, prefix_cache: int = 0, min_prefix: int = 16,
                 flash_attn: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: {max_batch}; must be >= 1")
        if not isinstance(prefix_cache, int) or prefix_cache < 0:
            raise ValueError(f"prefix_cache: {prefix_cache!r}; must be an integer >= 0 (0 = off)")
        streams = max_batch + 1 + prefix_cache  # + the spare + the prefix entries
        self._c = _Context(Path(gguf), n_threads=n_threads, n_ctx=streams * max_len, n_batch=max_batch * max_len,
                           n_seq=streams, n_outputs=streams, unified=False, seq_len=max_len, flash_attn=flash_attn)
        super().__init__(eos_token_ids=eos_token_ids, max_batch=max_batch, max_len=max_len,
                         vocab_size=self._c.vocab_size, prefix_cache=prefix_cache, min_prefix=min_prefix)

    def close(self) -> None:
        """Free llama.cpp's model, context and KV cache now (otherwise when the engine is collected)."""
        self._c.close()

    # -- the runtime's side (SlotEngine's hooks) --------------------------------------------------
    def _logits(self, batch: StepBatch, new: list[Seq]) -> np.ndarray:
        """One llama_decode: the newcomers' prompts and one token for every other running sequence."""
        self._c.decode(batch.ids, batch.pos, batch.slots, batch.out_rows)
        return np.stack([self._c.row(i) for i in batch.out_rows])  # [rows, vocab], copied out

    def _move_slot(self, src: int, dst: int, length: int) -> None:
        """llama.cpp's cross-stream copy (applied in order at the next decode), then src emptied."""
        if src != dst:
            llama, mem = self._c.llama, self._c.mem
            llama.llama_memory_seq_cp(mem, src, dst, -1, -1)
            llama.llama_memory_seq_rm(mem, src, -1, -1)

    def _release_slot(self, slot: int) -> None:
        self._c.llama.llama_memory_seq_rm(self._c.mem, slot, -1, -1)

    def _stash(self, slot: int, length: int) -> int:
        self._move_slot(slot, self.max_batch, length)  # to the spare stream
        return self.max_batch

    def _unstash(self, held: int, slot: int, length: int) -> None:
        self._move_slot(held, slot, length)

    def _reset(self) -> None:
        self._c.llama.llama_memory_clear(self._c.mem, False)

    def _prefix_save(self, slot: int, entry: int, length: int) -> None:
        self._copy_prefix(slot, self.max_batch + 1 + entry, length)

    def _prefix_load(self, entry: int, slot: int, length: int) -> None:
        self._copy_prefix(self.max_batch + 1 + entry, slot, length)

    def _copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Stream src's positions [0, length) into stream dst: a cross-stream copy replaces dst's cells
        with src's (queued, applied in order at the next decode), then dst drops positions >= length."""
        llama, mem = self._c.llama, self._c.mem
        llama.llama_memory_seq_cp(mem, src, dst, -1, -1)
        llama.llama_memory_seq_rm(mem, dst, length, -1)


# -- command line: export, and the timing behind the docstring's table -------------------------------
def _time_engine(engine: LlamaCppEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, decode tokens per CPU-second) of one engine run (`slots.time_engine`)."""
    t = time_engine(engine, prompts, new_tokens)
    return t.decode_tok_s, t.decode_tok_per_cpu_s


def _time_generate(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, tokens per CPU-second) of llama-cpp-python's high-level `Llama.generate` (greedy),
    after its first token."""
    import time

    n, t0, c0 = 0, 0.0, 0.0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        n += 1
        if n == 1:
            t0, c0 = time.perf_counter(), time.process_time()
        if n == new_tokens:
            break
    return (new_tokens - 1) / (time.perf_counter() - t0), (new_tokens - 1) / (time.process_time() - c0)


def bench(ggufs: Sequence[Path], batches: Sequence[int], new_tokens: int = 64, repeats: int = 3,
          threads: int = 2) -> list[dict[str, Any]]:
    """Median decode speed per GGUF: Llama.generate at batch 1 and the engine at each batch size, all
    rounds interleaved in this process so that load from other jobs hits every figure alike.

    Each figure comes twice: tok/s of wall time, and tokens per CPU-second of this process (`_cpu`).
    With one thread the CPU figure does not move when other jobs share the cores; with two, llama.cpp's
    workers spin while they wait for each other, so it overstates the cost under load."""
    import statistics

    from llama_cpp import Llama

    llama_cpp_lib()
    top = max(batches)
    setups = []
    for path in ggufs:
        engine = LlamaCppEngine(path, eos_token_ids=[], max_batch=top, max_len=96 + new_tokens, n_threads=threads)
        llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=96 + new_tokens,
                    verbose=False)
        _time_engine(engine, bench_prompts(min(2, top), engine.vocab_size), 4)  # warm-up: first calls pay setup
        _time_generate(llm, bench_prompts(1, engine.vocab_size)[0], 4)
        setups.append((Path(path), engine, llm, {"generate_bs1": []} | {f"engine_bs{b}": [] for b in batches}))
    for _ in range(repeats):
        for _, engine, llm, runs in setups:
            runs["generate_bs1"].append(_time_generate(llm, bench_prompts(1, engine.vocab_size)[0], new_tokens))
            for b in batches:
                runs[f"engine_bs{b}"].append(_time_engine(engine, bench_prompts(b, engine.vocab_size), new_tokens))
    rows = []
    for path, engine, llm, runs in setups:
        row: dict[str, Any] = {"gguf": path.name, "threads": threads, "load_avg_1min": round(os.getloadavg()[0], 2)}
        for name, values in runs.items():
            row[name] = round(statistics.median(v[0] for v in values), 1)
            row[f"{name}_cpu"] = round(statistics.median(v[1] for v in values), 1)
        for unit in ("", "_cpu"):
            if 1 in batches:
                row[f"engine_bs1_over_generate{unit}"] = round(row[f"engine_bs1{unit}"] / row[f"generate_bs1{unit}"], 2)
                row |= {f"engine_bs{b}_over_bs1{unit}": round(row[f"engine_bs{b}{unit}"] / row[f"engine_bs1{unit}"], 2)
                        for b in batches if b != 1}
        rows.append(row)
        engine.close()
        llm.close()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write an ingested fp32 model folder as a GGUF")
    ex.add_argument("--model", default="artifacts/model", help="folder with config.json + safetensors")
    ex.add_argument("--qtype", required=True, choices=sorted(QTYPES))
    ex.add_argument("--out", required=True, help="the .gguf file to write")
    ex.add_argument("--source-gguf", help="copy metadata (hparams, tokenizer) from this GGUF")
    be = sub.add_parser("bench", help="decode tok/s: Llama.generate vs the engine at several batch sizes")
    be.add_argument("--gguf", nargs="+", required=True)
    be.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "export":
        source = Path(args.source_gguf) if args.source_gguf else None
        print(export_gguf(Path(args.model), Path(args.out), args.qtype, source_gguf=source))
        return
    for row in bench([Path(g) for g in args.gguf], args.batch, args.new_tokens, args.repeats, args.threads):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
