"""The llama.cpp runtime's entry in the registry: its config, presets, export, scorer and engine.

The work is done by `costopt.runtimes.llamacpp` (GGUF export through llama.cpp's own quantizer,
teacher-forced logits and the continuous-batching engine over llama.cpp's batched decode); this
module only adapts it to the registry's shape:
- `LlamaCppConfig(qtype)`: one of llama.cpp's own weight types, quantized from the fp32 weights by
  llama.cpp itself (`llama_model_quantize`), so a Q4_K_M competes at equal quality, not equal bits;
- presets `gguf_<qtype>` for the types users ask for, and `gguf_q8_0_fa` / `gguf_q6_k_fa` with llama.cpp's
  CPU flash attention on (`flash_attn`: faster decode, other roundings, not bit-stable; the gates decide);
- `Scorer`: llama.cpp's logits behind the Hugging Face call the validate phase already makes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from costopt.runtimes.base import Runtime, RuntimeConfig, RuntimeConfigError
from costopt.runtimes.llamacpp import QTYPES

GGUF = "model.gguf"  # the exported file inside the variant's folder
PRESETS = {f"gguf_{q.lower()}": {"runtime": "llamacpp", "qtype": q}
           for q in ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")}
PRESETS.update({f"gguf_{q.lower()}_fa": {"runtime": "llamacpp", "qtype": q, "flash_attn": True}
                for q in ("BF16", "Q8_0", "Q6_K")})


@dataclass(frozen=True)
class LlamaCppConfig(RuntimeConfig):
    qtype: str = "Q8_0"  # llama.cpp weight type, quantized by llama.cpp from the fp32 weights
    flash_attn: bool = False  # llama.cpp's CPU flash attention: faster decode, other roundings (gated on its own)

    def check(self) -> None:
        if self.qtype not in QTYPES:
            raise RuntimeConfigError(f"llamacpp.qtype: expected one of {list(QTYPES)}, got {self.qtype!r}")
        if not isinstance(self.flash_attn, bool):
            raise RuntimeConfigError(f"llamacpp.flash_attn: expected true or false, got {self.flash_attn!r}")


def config_of(spec: Any) -> LlamaCppConfig:
    record = getattr(spec, "runtime", None) or {}
    return LlamaCppConfig(**{k: v for k, v in (record.get("config") or {}).items() if k != "version"})


def available() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); `make venv` installs it"
    except OSError as exc:  # the shared library is there but does not load
        return f"llama-cpp-python does not load ({exc})"
    return None


def _source_gguf(base_model: str | None) -> Path | None:
    """The original GGUF when the model came from one: its tokenizer and metadata are reused. None for
    weights that are not that model's (the distilled student: other hparams), whose metadata is built
    from their own config.json and tokenizer."""
    from costopt.models.source import ModelSourceError, resolve_source

    if not base_model:
        return None
    try:
        src = resolve_source(base_model)
    except ModelSourceError:
        return None
    return Path(src.path) / src.gguf_file if src.kind == "gguf" and src.gguf_file else None


def export(source_dir: Path, out_dir: Path, config: LlamaCppConfig, base_model: str | None) -> dict[str, Any]:
    """Write `out_dir/model.gguf` of type `config.qtype` from the fp32 safetensors in `source_dir`."""
    from costopt.runtimes.llamacpp import export_gguf

    out = export_gguf(source_dir, out_dir / GGUF, config.qtype, source_gguf=_source_gguf(base_model))
    return {"file": out.name, "size_bytes": out.stat().st_size}


class Scorer:
    """llama.cpp's teacher-forced logits, called like a Hugging Face causal LM on a padded batch."""

    def __init__(self, path: Path, threads: int = 2, flash_attn: bool = False) -> None:
        import torch

        from costopt.runtimes.llamacpp import LlamaCppModel

        self.model = LlamaCppModel(path, n_threads=threads, flash_attn=flash_attn)
        self.device = torch.device("cpu")

    def eval(self) -> "Scorer":
        return self

    def __call__(self, input_ids: Any, attention_mask: Any = None, **_: Any) -> Any:
        import torch
        from types import SimpleNamespace

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = []
        for ids, keep in zip(input_ids.tolist(), mask.bool().tolist()):
            where = [i for i, k in enumerate(keep) if k]
            out = torch.zeros(len(ids), 0)
            if where:
                got = torch.from_numpy(self.model.logits([ids[i] for i in where]))  # [n, V]
                out = torch.zeros(len(ids), got.shape[1])
                out[torch.tensor(where)] = got
            rows.append(out)
        vocab = max(r.shape[1] for r in rows)
        rows = [r if r.shape[1] == vocab else torch.zeros(r.shape[0], vocab) for r in rows]
        return SimpleNamespace(logits=torch.stack(rows))  # [B, T, V]


def gguf_file(ws: Any, spec: Any) -> Path:
    return Path(ws.root) / spec.artifact / GGUF


class LlamaGenerate:
    """llama.cpp's own decode loop (`Llama.generate`, greedy) behind `greedy_decode`'s contract, batch 1:
    what a user who ran llama.cpp directly would get, timed next to costopt's paths."""
    batched = False

    def __init__(self, path: Path, threads: int = 2, n_ctx: int = 512, flash_attn: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         flash_attn=flash_attn, verbose=False)

    def decode(self, input_ids: Any, attention_mask: Any, new_tokens: int) -> tuple[Any, float, float]:
        import time

        import torch

        if input_ids.shape[0] != 1:
            raise ValueError(f"LlamaGenerate: batch 1 only, got {input_ids.shape[0]} rows")
        prompt = input_ids[0][attention_mask[0].bool()].tolist()
        out: list[int] = []
        t0 = time.perf_counter()
        t1 = t0
        for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == 1:
                t1 = time.perf_counter()
            if len(out) == new_tokens:
                break
        return torch.tensor([out]), t1 - t0, time.perf_counter() - t1


def scorer(ws: Any, spec: Any) -> Scorer:
    return Scorer(gguf_file(ws, spec), flash_attn=config_of(spec).flash_attn)


def engine(ws: Any, spec: Any, *, eos_token_ids: list[int], max_batch: int, max_len: int, threads: int,
           prefix_cache: int = 0) -> Any:
    from costopt.runtimes.llamacpp import LlamaCppEngine

    return LlamaCppEngine(gguf_file(ws, spec), eos_token_ids=eos_token_ids, max_batch=max_batch,
                          max_len=max_len, n_threads=threads, prefix_cache=prefix_cache,
                          flash_attn=config_of(spec).flash_attn)


RUNTIME = Runtime("llamacpp", LlamaCppConfig, available=available, export=export, scorer=scorer,
                  engine=engine, precision=lambda cfg: cfg.qtype.lower(), weights_file=GGUF, reads_torch_weights=False,
                  presets=PRESETS, prefix_cache=True)
