"""The CUDA runtime's entry in the registry: a variant's torch weights served by `costopt.runtimes.cuda`.

A `cuda` variant is (weights x runtime) like any other: its scheme makes the weights (fp32, or costopt's
INT8/INT4 weight-only codes) on CPU as usual, and this runtime copies them to the GPU in `dtype`, fuses
q/k/v and gate/up, and serves them with CUDA graphs per batch bucket (`CudaEngine`). `weights: int8|int4`
quantizes a dense (fp32-scheme) variant on load instead; prefer the scheme, whose codes are the ones
whose quality costopt measured. To put cuda variants in a run, define them in params.yaml and list
them in `quantize.variants` (none is in the default list: on a machine without a GPU each would be
built and then ruled out), e.g.

    quantize:
      definitions: {cuda_bf16: {runtime: cuda, scheme: bf16},
                    cuda_int8: {runtime: cuda, scheme: int8_weight_only},
                    cuda_int4_gptq_g64: {runtime: cuda, scheme: int4_weight_only, method: gptq, group_size: 64}}
      variants: [..., cuda_bf16, cuda_int8, cuda_int4_gptq_g64]

(No presets: the DAG form lists the presets by hand, `dags/optimize_model.py`.)

Quality. The scorer is the CUDA engine's own forward on the GPU (the registry's rule: a runtime's
logits are its own, never a torch twin's). Where there is no CUDA device, `available()` says so and
every entry point raises `RuntimeUnavailable`: the benchmark phase records "cuda: no CUDA device ..."
for the candidate (validate and the search then skip it) and the run goes on with the others, never
a silent CPU fallback the report would mislabel. The quality of the same weights on CPU is that of the
same scheme on the torch runtime (e.g. `int8_weight_only` next to `cuda_int8`): the GPU adds bf16
activations (and, on tinygemm, bf16 scales) on top, which the GPU run's own scorer measures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from costopt.runtimes.base import Runtime, RuntimeConfig, RuntimeConfigError, RuntimeFailure, RuntimeUnavailable

class CudaBuildError(RuntimeFailure, ValueError):
    """The variant's weights or settings do not fit the CUDA engine (e.g. W8A8 modules): this candidate only."""


@dataclass(frozen=True)
class CudaConfig(RuntimeConfig):
    """The CUDA engine's settings (`costopt.runtimes.cuda.CudaOptions`, which checks them)."""
    dtype: str = "bf16"  # activations and dense weights on the GPU: bf16 | fp16 | fp32
    weights: str = "none"  # none: the variant's own weights; int8 | int4: quantize dense Linears on load
    load_group_size: int = 64  # INT4 group when weights: int4 (not `group_size`: that field is the scheme's)
    graphs: bool = True  # one CUDA graph per decode batch bucket (false: compiled regions, launched per step)
    compile: bool = True  # torch.compile the layer and head regions (Inductor fuses norms, RoPE, de-quantization)
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # decode batch sizes with a graph; rows padded up
    int4_kernel: str = "auto"  # auto | tinygemm | dequant (costopt.kernels.gpu_linear)
    kernels: str = "auto"  # small-batch decode: auto | triton (costopt.kernels.triton_decode) | compiled
    fused_rows: int = 8  # the largest decode batch bucket the Triton kernels run

    def __post_init__(self) -> None:
        if isinstance(self.buckets, list):
            object.__setattr__(self, "buckets", tuple(self.buckets))

    def options(self) -> Any:
        from costopt.runtimes.cuda import CudaOptions

        return CudaOptions(dtype=self.dtype, weights=self.weights, group_size=self.load_group_size, graphs=self.graphs,
                           compile=self.compile, buckets=self.buckets, int4_kernel=self.int4_kernel,
                           kernels=self.kernels, fused_rows=self.fused_rows)

    def check(self) -> None:
        for name in ("graphs", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeConfigError(f"cuda.{name}: expected true or false, got {getattr(self, name)!r}")
        try:
            self.options().check()
        except ValueError as exc:  # CudaOptions names the field
            message = str(exc).replace("group_size:", "load_group_size:", 1)
            raise RuntimeConfigError(f"cuda.{message}") from exc


def config_of(spec: Any) -> CudaConfig:
    record = getattr(spec, "runtime", None) or {}
    return CudaConfig(**{k: v for k, v in (record.get("config") or {}).items() if k != "version"})


def available() -> str | None:
    from costopt.runtimes.cuda import available as cuda_available

    return cuda_available()


def _require_device() -> None:
    reason = available()
    if reason:
        raise RuntimeUnavailable(f"cuda: {reason}")


def scorer(ws: Any, spec: Any) -> Any:
    """The engine's own teacher-forced logits on the GPU (`CudaScorer`)."""
    from costopt.models.variants import load_torch_variant
    from costopt.runtimes.cuda import CudaScorer

    _require_device()
    model, _ = load_torch_variant(ws, spec)
    try:
        return CudaScorer(model, device="cuda", options=config_of(spec).options())
    except (TypeError, ValueError) as exc:
        raise CudaBuildError(f"variant {spec.name!r}: {exc}") from exc


def engine(ws: Any, spec: Any, *, eos_token_ids: list[int], max_batch: int, max_len: int, threads: int) -> Any:
    """The variant's CudaEngine on the GPU (`engine_of`)."""
    from costopt.models.variants import load_torch_variant

    _require_device()
    model, _ = load_torch_variant(ws, spec)
    return engine_of(model, spec.name, config_of(spec), eos_token_ids=eos_token_ids, max_batch=max_batch,
                     max_len=max_len, threads=threads)


def engine_of(model: Any, name: str, config: CudaConfig, *, eos_token_ids: list[int], max_batch: int, max_len: int,
              threads: int) -> Any:
    """A CudaEngine over torch weights already loaded (a cuda variant's, or with `serving --device cuda`, fp32's
    or a torch-runtime variant's), every batch bucket built at the shortest length bucket before it returns
    (the other lengths capture on first use, without compiling again)."""
    import torch

    from costopt.runtimes.cuda import CudaEngine

    _require_device()
    torch.set_num_threads(threads)  # the host side: tokenization, bookkeeping
    try:
        built = CudaEngine(model, eos_token_ids=eos_token_ids, max_batch=max_batch, max_len=max_len, device="cuda",
                           options=config.options())
    except (TypeError, ValueError) as exc:
        raise CudaBuildError(f"variant {name!r}: {exc}") from exc
    built.warmup(lengths=built.len_buckets[:1])
    return built


RUNTIME = Runtime("cuda", CudaConfig, available=available, export=lambda *a, **k: None, scorer=scorer,
                  engine=engine, precision=lambda cfg: None if cfg.weights == "none" else cfg.weights,
                  device="cuda")
