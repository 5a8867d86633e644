"""Typed, validated settings read from `params.yaml`.

Every phase reads one section. Each section is a frozen dataclass that checks its own fields when it
is built, so a bad value fails before any long computation, with an error that names the field
(`validate.gates.kl_mean_max`) and what was expected. A profile (`quick`, `full`) overlays smaller
sizes on the same sections; the Airflow form overlays the fields it shows.

    from costopt.params import load_params
    params = load_params("params.yaml", profile="quick")
    params.validate.gates.kl_mean_max
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ParamsError(ValueError):
    """A setting is missing, has the wrong type, or is out of range. The message names the field."""


def _check_number(where: str, value: Any, lo: float | None = None, hi: float | None = None,
                  integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ParamsError(f"{where}: expected {kind}, got {value!r}")
    if lo is not None and value < lo:
        raise ParamsError(f"{where}: expected {kind} >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ParamsError(f"{where}: expected {kind} <= {hi}, got {value!r}")


@dataclass(frozen=True)
class IngestParams:
    model: str = "builtin:smollm2-135m-instruct"  # builtin name, local path or cached HF id
    dtype: str = "float32"  # the baseline is always stored in fp32

    def check(self, where: str) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ParamsError(f"{where}.model: expected a non-empty model id or path, got {self.model!r}")
        if self.dtype != "float32":
            raise ParamsError(f"{where}.dtype: expected 'float32' (the fp32 baseline), got {self.dtype!r}")


@dataclass(frozen=True)
class EvalDataParams:
    seed: int = 1234  # all sets are a pure function of this seed
    prompts: int = 240  # held-out chat prompts
    crosscheck: int = 60  # second held-out set: short factual questions built unlike the calibration prompts
    ppl_texts: int = 48  # held-out passages for perplexity
    calibration: int = 128  # calibration prompts, disjoint from held-out (calibrate.samples and curve use at most this many)
    task_items: int = 360  # labeled multiple-choice items
    reference_tokens: int = 48  # fp32 greedy answer length per held-out prompt, tokens

    def check(self, where: str) -> None:
        _check_number(f"{where}.seed", self.seed, 0, integer=True)
        _check_number(f"{where}.reference_tokens", self.reference_tokens, 1, 1024, integer=True)
        for name, lo in (("prompts", 4), ("crosscheck", 2), ("ppl_texts", 2), ("calibration", 1),
                         ("task_items", 20)):
            _check_number(f"{where}.{name}", getattr(self, name), lo, 100_000, integer=True)


@dataclass(frozen=True)
class BenchmarkParams:
    device: str = "cpu"
    threads: int = 2  # torch intra-op threads
    decode_tokens: int = 64  # new tokens per decode measurement
    decode_repeats: int = 3  # median over repeats
    decode_batch: int = 8  # the second decode figure: tokens/s summed over this many sequences
    trace_requests: int = 24  # requests in the fixed latency trace
    trace_seed: int = 7  # the trace is a pure function of this seed
    slo_p95_ms: float = 10_000.0  # p95 latency bound for the cost figure, ms
    served_requests: int = 32  # serving-trace requests replayed on the engine for the served cost
    served_concurrency: int = 16  # requests in flight during that replay (closed loop)
    served_trace_seed: int = 11  # the serving trace's seed (serve.trace_seed: the same trace deploy replays)

    def check(self, where: str) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ParamsError(f"{where}.device: expected 'cpu' or 'cuda', got {self.device!r}")
        _check_number(f"{where}.threads", self.threads, 1, 1024, integer=True)
        _check_number(f"{where}.decode_tokens", self.decode_tokens, 2, 4096, integer=True)
        _check_number(f"{where}.decode_repeats", self.decode_repeats, 1, 100, integer=True)
        _check_number(f"{where}.decode_batch", self.decode_batch, 1, 1024, integer=True)
        _check_number(f"{where}.trace_requests", self.trace_requests, 1, 100_000, integer=True)
        _check_number(f"{where}.trace_seed", self.trace_seed, 0, integer=True)
        _check_number(f"{where}.slo_p95_ms", self.slo_p95_ms, 1)
        _check_number(f"{where}.served_requests", self.served_requests, 1, 100_000, integer=True)
        _check_number(f"{where}.served_concurrency", self.served_concurrency, 1, 256, integer=True)
        _check_number(f"{where}.served_trace_seed", self.served_trace_seed, 0, integer=True)


@dataclass(frozen=True)
class QuantizeParams:
    variants: tuple[str, ...] = ("int8_weight_only", "int8_dynamic", "int8_static", "int4_rtn_g64",
                                 "int4_gptq_g64", "int4_awq_g64", "dynamic_qint8_naive")  # names to build
    definitions: dict = field(default_factory=dict)  # extra named variants: name -> {scheme, **config}

    def check(self, where: str) -> None:
        from costopt.quantization.schemes import SchemeError  # late: the registries import torch
        from costopt.runtimes.registry import RuntimeConfigError, variant_definition

        if not isinstance(self.definitions, dict):
            raise ParamsError(f"{where}.definitions: expected a mapping name -> {{scheme: ..., ...}}")
        presets = self.presets()
        for name, conf in self.definitions.items():
            if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,63}", name):
                raise ParamsError(f"{where}.definitions: name {name!r}: expected lower-case letters, digits "
                                  "and '_' (it names folders and report rows)")
            if name in presets:
                raise ParamsError(f"{where}.definitions.{name}: clashes with the preset of that name")
            if name.startswith("mixed_"):
                raise ParamsError(f"{where}.definitions.{name}: names starting with 'mixed_' are the search's")
            if not isinstance(conf, dict):
                raise ParamsError(f"{where}.definitions.{name}: expected a mapping with 'scheme' and/or "
                                  f"'runtime', got {conf!r}")
            try:
                variant_definition(conf)
            except (SchemeError, RuntimeConfigError) as exc:
                raise ParamsError(f"{where}.definitions.{name}: {exc}") from exc
        if not self.variants:
            raise ParamsError(f"{where}.variants: expected at least one variant name")
        known = sorted({*presets, *self.definitions})
        for i, name in enumerate(self.variants):
            if name not in known:
                raise ParamsError(f"{where}.variants[{i}]: unknown variant {name!r}; expected a preset or a "
                                  f"name from {where}.definitions: {known}")
        if len(set(self.variants)) != len(self.variants):
            raise ParamsError(f"{where}.variants: names must be unique, got {list(self.variants)}")

    @staticmethod
    def presets() -> dict[str, dict[str, Any]]:
        """Every named preset: the schemes' (torch weights) and the runtimes' own (llama.cpp types)."""
        from costopt.models.variants import student_presets
        from costopt.quantization.schemes import PRESETS
        from costopt.runtimes.registry import presets as runtime_presets

        teacher = {**PRESETS, **runtime_presets()}
        return {**teacher, **student_presets(teacher)}

    def config(self, name: str) -> dict[str, Any]:
        """The variant's definition (dict form): its scheme config and/or its runtime, and its base."""
        return dict(self.definitions.get(name) or self.presets()[name])

    def student_variants(self) -> list[str]:
        """The listed variants made from the distilled student (`base: student`)."""
        return [n for n in self.variants if self.config(n).get("base") == "student"]


@dataclass(frozen=True)
class CalibrateParams:
    source: str = "auto"  # auto: serving logs when they hold prompts, else the project's prompts
    logs: str = "logs/requests.jsonl"  # serving request log (JSONL with a "prompt" text field)
    samples: int = 64  # calibration sequences used by GPTQ/AWQ/static INT8
    max_seq_len: int = 128  # tokens per calibration sequence
    curve: tuple[int, ...] = (16, 32, 64)  # calibration sizes of the KL-vs-size curve in the report
    curve_variant: str = "int4_gptq_g64"  # the calibrated variant the curve re-fits ("" = no curve)
    curve_prompts: int = 64  # held-out prompts the curve's KL is measured on

    def check(self, where: str) -> None:
        if self.source not in ("auto", "prompts", "logs"):
            raise ParamsError(f"{where}.source: expected 'auto', 'prompts' or 'logs', got {self.source!r}")
        if not isinstance(self.logs, str):
            raise ParamsError(f"{where}.logs: expected a path, got {self.logs!r}")
        _check_number(f"{where}.samples", self.samples, 1, 100_000, integer=True)
        _check_number(f"{where}.max_seq_len", self.max_seq_len, 8, 8192, integer=True)
        _check_number(f"{where}.curve_prompts", self.curve_prompts, 2, 100_000, integer=True)
        for i, size in enumerate(self.curve):
            _check_number(f"{where}.curve[{i}]", size, 1, 100_000, integer=True)
        if not isinstance(self.curve_variant, str):
            raise ParamsError(f"{where}.curve_variant: expected a variant name or '', got {self.curve_variant!r}")


@dataclass(frozen=True)
class SearchParams:
    enabled: bool = True  # run the sensitivity scan and the mixed-precision search
    sensitivity_prompts: int = 8  # calibration prompts the per-part KL is measured on
    precisions: tuple[str, ...] = ("int4", "int8")  # per-part choices measured (fp32 is always allowed)
    method: str = "gptq"  # how INT4 parts of a mixed variant are fitted: rtn | gptq | awq
    group_size: int = 64  # INT4 group size of mixed variants
    max_evaluations: int = 2  # mixed candidates quantized and validated at most
    target_margin: float = 0.6  # the first mixed candidate aims at this share of the KL gate
    skip_dominated: bool = True  # build no mixed candidate when none can cost less than the cheapest passing one
    cost_tolerance: float = 0.10  # passing candidates within this share of the cheapest cost tie; the lower KL
    #                               wins (benchmark rounds on the 2-core box vary by about 10%)

    def check(self, where: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamsError(f"{where}.enabled: expected true or false, got {self.enabled!r}")
        if not isinstance(self.skip_dominated, bool):
            raise ParamsError(f"{where}.skip_dominated: expected true or false, got {self.skip_dominated!r}")
        _check_number(f"{where}.sensitivity_prompts", self.sensitivity_prompts, 2, 10_000, integer=True)
        if not self.precisions or any(p not in ("int4", "int8") for p in self.precisions):
            raise ParamsError(f"{where}.precisions: expected a non-empty subset of ['int4', 'int8'], "
                              f"got {list(self.precisions)}")
        if self.method not in ("rtn", "gptq", "awq"):
            raise ParamsError(f"{where}.method: expected 'rtn', 'gptq' or 'awq', got {self.method!r}")
        _check_number(f"{where}.group_size", self.group_size, 2, 4096, integer=True)
        if self.group_size % 2:
            raise ParamsError(f"{where}.group_size: expected an even number, got {self.group_size!r}")
        _check_number(f"{where}.max_evaluations", self.max_evaluations, 1, 50, integer=True)
        _check_number(f"{where}.target_margin", self.target_margin, 0.05, 1.0)
        _check_number(f"{where}.cost_tolerance", self.cost_tolerance, 0.0, 1.0)


@dataclass(frozen=True)
class DistillParams:
    enabled: bool = True  # build and train a student (costopt.distill)
    layers: int = 16  # decoder blocks the student keeps (the teacher's most influential)
    intermediate_size: int = 768  # MLP channels each kept block keeps (the most active)
    sequences: int = 256  # training sequences: the teacher's answers to project prompts (+ the request log)
    answer_tokens: int = 48  # the teacher's greedy answer per training prompt, tokens
    max_seq_len: int = 128  # tokens per training sequence
    top_k: int = 32  # teacher log-probs kept per position
    steps: int = 120  # optimizer steps
    batch: int = 4  # sequences per step
    lr: float = 5e-4  # AdamW peak learning rate (warm-up 10 steps, cosine to a tenth)
    t_start: float = 2.0  # temperature at the first step (cosine schedule down to t_end)
    t_end: float = 1.0  # temperature at the last step
    hidden_weight: float = 1.0  # weight of the hidden-state loss (0: logits only)
    hidden_layers: int = 3  # student blocks supervised by the teacher's hidden states (evenly spaced, last included)

    def check(self, where: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamsError(f"{where}.enabled: expected true or false, got {self.enabled!r}")
        _check_number(f"{where}.layers", self.layers, 1, 1000, integer=True)
        _check_number(f"{where}.intermediate_size", self.intermediate_size, 8, 1 << 20, integer=True)
        if self.intermediate_size % 8:
            raise ParamsError(f"{where}.intermediate_size: expected a multiple of 8, got {self.intermediate_size}")
        _check_number(f"{where}.sequences", self.sequences, 8, 1_000_000, integer=True)
        _check_number(f"{where}.answer_tokens", self.answer_tokens, 1, 4096, integer=True)
        _check_number(f"{where}.max_seq_len", self.max_seq_len, 16, 8192, integer=True)
        _check_number(f"{where}.top_k", self.top_k, 1, 1024, integer=True)
        _check_number(f"{where}.steps", self.steps, 1, 1_000_000, integer=True)
        _check_number(f"{where}.batch", self.batch, 1, 1024, integer=True)
        _check_number(f"{where}.lr", self.lr, 1e-7, 1.0)
        _check_number(f"{where}.t_start", self.t_start, 0.1, 20)
        _check_number(f"{where}.t_end", self.t_end, 0.1, 20)
        _check_number(f"{where}.hidden_weight", self.hidden_weight, 0, 100)
        _check_number(f"{where}.hidden_layers", self.hidden_layers, 0, 1000, integer=True)
        if self.hidden_layers > self.layers:
            raise ParamsError(f"{where}.hidden_layers: expected at most distill.layers ({self.layers}), "
                              f"got {self.hidden_layers}")


@dataclass(frozen=True)
class RouteParams:
    enabled: bool = True  # fit the precision router's thresholds (tasks.route) and deploy it in the gateway
    model: str = "routed"  # the name clients ask for to be routed
    tiers: tuple[str, ...] = ()  # variants cheapest first, the last the reference; empty: chosen (tasks.route)
    max_tiers: int = 3  # tiers when chosen: the reference (the search's pick) and the cheapest below it
    retention_target: float = 0.97  # routed answers' token agreement and task accuracy vs the reference, 95% lower bound
    prompts: int = 200  # held-out prompts used, half to fit the thresholds and half to judge the router
    task_items: int = 360  # labeled items: half fit the thresholds on task accuracy, half judge it (0: none)
    bootstrap: int = 1000  # resamples for the 95% intervals

    def check(self, where: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamsError(f"{where}.enabled: expected true or false, got {self.enabled!r}")
        if not isinstance(self.model, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.model):
            raise ParamsError(f"{where}.model: expected a model name (letters, digits, _ . -), got {self.model!r}")
        if not all(isinstance(t, str) and t for t in self.tiers) or len(set(self.tiers)) != len(self.tiers):
            raise ParamsError(f"{where}.tiers: expected unique variant names, cheapest first, got {list(self.tiers)}")
        if len(self.tiers) == 1:
            raise ParamsError(f"{where}.tiers: expected at least two tiers (or none: chosen), got {list(self.tiers)}")
        if self.model in self.tiers:
            raise ParamsError(f"{where}.model: {self.model!r} is also a tier; pick another routed name")
        _check_number(f"{where}.max_tiers", self.max_tiers, 2, 8, integer=True)
        _check_number(f"{where}.retention_target", self.retention_target, 0.5, 1.0)
        _check_number(f"{where}.prompts", self.prompts, 4, 100_000, integer=True)
        _check_number(f"{where}.task_items", self.task_items, 0, 100_000, integer=True)
        _check_number(f"{where}.bootstrap", self.bootstrap, 100, 100_000, integer=True)


@dataclass(frozen=True)
class ContinuousParams:
    window: int = 2000  # newest request-log records a continuous_optimization run reads
    min_prompts: int = 50  # logged prompts needed before the drift test says anything ("undecided" below)
    drift_alpha: float = 0.01  # the drift test's level (MMD permutation p-value)
    permutations: int = 500  # permutations of the drift test
    reference_prompts: int = 300  # calibration prompts the recent ones are compared with, at most
    ab_min_samples: int = 200  # requests per variant before an A/B test may decide
    ab_alpha: float = 0.05  # the A/B test's level, all metrics together
    ab_kl_margin: float = 0.005  # nats/token B's live KL may exceed A's (paired, on the quality sample)
    quality_prompts: int = 32  # logged prompts the served variant is re-measured on against fp32 (quality drift)
    announce_requests: int = 200  # new requests that make the traffic_watch DAG post an asset event (a run here)
    reoptimize: bool = True  # on drift, trigger optimize_model (it calibrates on the request log)
    redistill: bool = True  # that run also re-distills the student (on the request log's prompts too)
    profile: str = "full"  # the profile of the optimize_model run a drift triggers

    def check(self, where: str) -> None:
        _check_number(f"{where}.window", self.window, 10, 10_000_000, integer=True)
        _check_number(f"{where}.min_prompts", self.min_prompts, 5, 100_000, integer=True)
        _check_number(f"{where}.drift_alpha", self.drift_alpha, 1e-6, 0.5)
        _check_number(f"{where}.permutations", self.permutations, 19, 100_000, integer=True)
        _check_number(f"{where}.reference_prompts", self.reference_prompts, 5, 100_000, integer=True)
        _check_number(f"{where}.ab_min_samples", self.ab_min_samples, 10, 10_000_000, integer=True)
        _check_number(f"{where}.ab_alpha", self.ab_alpha, 1e-6, 0.5)
        _check_number(f"{where}.ab_kl_margin", self.ab_kl_margin, 0, 20)
        _check_number(f"{where}.quality_prompts", self.quality_prompts, 5, 10_000, integer=True)
        _check_number(f"{where}.announce_requests", self.announce_requests, 1, 10_000_000, integer=True)
        for name in ("reoptimize", "redistill"):
            if not isinstance(getattr(self, name), bool):
                raise ParamsError(f"{where}.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.profile not in ("quick", "full"):
            raise ParamsError(f"{where}.profile: expected 'quick' or 'full', got {self.profile!r}")


@dataclass(frozen=True)
class Gates:
    kl_mean_max: float = 0.02  # nats/token
    kl_p99_max: float = 0.5  # nats/token
    top1_agreement_min: float = 0.93  # share of tokens
    ppl_ratio_max: float = 1.05  # variant ppl / fp32 ppl
    task_retention_min: float = 0.97  # variant accuracy / fp32 accuracy
    statistic: str = "ci_bound"  # ci_bound: the pessimistic end of the 95% CI must pass; point: the estimate

    def check(self, where: str) -> None:
        if self.statistic not in ("ci_bound", "point"):
            raise ParamsError(f"{where}.statistic: expected 'ci_bound' or 'point', got {self.statistic!r}")
        _check_number(f"{where}.kl_mean_max", self.kl_mean_max, 0, 20)
        _check_number(f"{where}.kl_p99_max", self.kl_p99_max, 0, 50)
        _check_number(f"{where}.top1_agreement_min", self.top1_agreement_min, 0, 1)
        _check_number(f"{where}.ppl_ratio_max", self.ppl_ratio_max, 1, 100)
        _check_number(f"{where}.task_retention_min", self.task_retention_min, 0, 1.5)


@dataclass(frozen=True)
class ValidateParams:
    bootstrap: int = 1000  # resamples for 95% CIs
    max_seq_len: int = 128  # tokens per teacher-forced sequence
    early_pass: bool = True  # stop scoring prompts once every prompt gate passes at 99.9% (sequential.py)
    gates: Gates = field(default_factory=Gates)

    def check(self, where: str) -> None:
        if not isinstance(self.early_pass, bool):
            raise ParamsError(f"{where}.early_pass: expected true or false, got {self.early_pass!r}")
        _check_number(f"{where}.bootstrap", self.bootstrap, 10, 100_000, integer=True)
        _check_number(f"{where}.max_seq_len", self.max_seq_len, 8, 8192, integer=True)
        self.gates.check(f"{where}.gates")


@dataclass(frozen=True)
class CostParams:
    price_per_hour_usd: float = 0.10  # USD per machine-hour

    def check(self, where: str) -> None:
        _check_number(f"{where}.price_per_hour_usd", self.price_per_hour_usd, 0, 10_000)
        if self.price_per_hour_usd <= 0:
            raise ParamsError(f"{where}.price_per_hour_usd: expected a price > 0, got {self.price_per_hour_usd!r}")


@dataclass(frozen=True)
class GpuParams:
    """The GPU machine class the `cuda` runtime serves on (costopt.runtimes.cuda), for its cost per 1M requests."""
    price_per_hour_usd: float = 3.50  # USD per GPU-hour: one H200 on demand ("roughly USD 3-4 an hour", issue 15)
    card: str = "H200"  # what the price buys (labels reports)
    # the GPU's serving-v1 replay (`python -m tasks.gpubench --serve`, serve.json), relative to the workspace
    # root; the report prices it at price_per_hour_usd next to this CPU's served cost ("": no comparison)
    measurement: str = "docs/measurements/gpu-serve.json"

    def check(self, where: str) -> None:
        if not isinstance(self.measurement, str) or self.measurement.startswith("/") or ".." in self.measurement:
            raise ParamsError(f"{where}.measurement: expected a path inside the workspace (or \"\"), got "
                              f"{self.measurement!r}")
        _check_number(f"{where}.price_per_hour_usd", self.price_per_hour_usd, 0, 10_000)
        if self.price_per_hour_usd <= 0:
            raise ParamsError(f"{where}.price_per_hour_usd: expected a price > 0, got {self.price_per_hour_usd!r}")
        if not isinstance(self.card, str) or not self.card.strip():
            raise ParamsError(f"{where}.card: expected the card's name, got {self.card!r}")


@dataclass(frozen=True)
class CacheParams:
    """The gateway's semantic cache as the deploy phase starts it (`python -m serving.gateway` flags)."""
    store_prompts: bool = True  # false: prompt text never reaches L2/L3 (embeddings, a salted hash, answers)
    ttl_s: float = 86400.0  # seconds an entry may be served
    l1_capacity: int = 10_000  # entries in memory
    l2_capacity: int = 100_000  # entries on disk
    max_false_hit: float = 0.01  # the bound the calibration must prove on held-out pairs (95% upper, exact)
    embedder_backend: str = "onnx-int8"  # onnx-int8 | onnx | torch (costopt.cache.embed)

    def check(self, where: str) -> None:
        from costopt.cache.embed import BACKENDS

        if not isinstance(self.store_prompts, bool):
            raise ParamsError(f"{where}.store_prompts: expected true or false, got {self.store_prompts!r}")
        _check_number(f"{where}.ttl_s", self.ttl_s, 1, 10 * 365 * 86400)
        _check_number(f"{where}.l1_capacity", self.l1_capacity, 1, 10**8, integer=True)
        _check_number(f"{where}.l2_capacity", self.l2_capacity, 1, 10**9, integer=True)
        _check_number(f"{where}.max_false_hit", self.max_false_hit, 0.001, 0.5)
        if self.embedder_backend not in BACKENDS:
            raise ParamsError(f"{where}.embedder_backend: expected one of {list(BACKENDS)}, "
                              f"got {self.embedder_backend!r}")

    def gateway_flags(self) -> list[str]:
        return ["--ttl_s", str(self.ttl_s), "--l1_capacity", str(self.l1_capacity), "--l2_capacity",
                str(self.l2_capacity), "--max_false_hit", str(self.max_false_hit), "--embedder_backend",
                self.embedder_backend, *([] if self.store_prompts else ["--no_store_prompts"])]


@dataclass(frozen=True)
class ServeParams:
    enabled: bool = True  # deploy the winners on a loopback KServe server and load-test them
    variants: tuple[str, ...] = ("picked", "int8_weight_only")  # served next to fp32 if they passed their
    # gates; "picked" is the search's pick
    max_batch: int = 32  # sequences decoding together (continuous batching)
    max_wait_ms: float = 50.0  # ms an idle engine waits to fill a batch (the seed paper's 50 ms)
    max_queue: int = 256  # queued requests; beyond it 429 with Retry-After
    reserved_high: int = 4  # batch slots only high-priority requests may use
    log_prompts: bool = False  # write prompt text into the request log (calibrate.logs) for calibration
    loadtest_requests: int = 32  # requests per load-test point in the demo (make bench runs longer)
    loadtest_concurrency: tuple[int, ...] = (16,)  # closed-loop concurrencies the demo measures
    trace_seed: int = 11  # the serving trace is a pure function of this seed
    gateway: bool = True  # also replay the trace through the gateway (python -m serving.gateway, semantic cache)
    keep: bool = True  # then promote the pick to the lasting deployment (costopt.deploy.lasting; make serve-stop)
    deployment: str = "assistant"  # the model name clients call at the lasting deployment's gateway
    predictor_port: int = 8080  # the lasting predictor's loopback port (0: any free port)
    gateway_port: int = 8090  # the lasting gateway's loopback port (0: any free port)
    canary: dict = field(default_factory=dict)  # costopt.online.canary.CanaryConfig fields for a later deploy's canary

    def check(self, where: str) -> None:
        from costopt.online.canary import CanaryConfig, CanaryConfigError

        if not isinstance(self.deployment, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.deployment):
            raise ParamsError(f"{where}.deployment: expected a model name (letters, digits, _ . -), got "
                              f"{self.deployment!r}")
        for port in ("predictor_port", "gateway_port"):
            _check_number(f"{where}.{port}", getattr(self, port), 0, 65535, integer=True)
        if self.predictor_port and self.predictor_port == self.gateway_port:
            raise ParamsError(f"{where}.gateway_port: {self.gateway_port} is the predictor_port too")
        if not isinstance(self.canary, dict):
            raise ParamsError(f"{where}.canary: expected a mapping of canary settings, got {self.canary!r}")
        try:
            CanaryConfig.from_dict(self.canary)
        except (CanaryConfigError, TypeError) as exc:
            raise ParamsError(f"{where}.{exc}") from None
        for flag in ("enabled", "log_prompts", "gateway", "keep"):
            if not isinstance(getattr(self, flag), bool):
                raise ParamsError(f"{where}.{flag}: expected true or false, got {getattr(self, flag)!r}")
        if not self.variants or not all(isinstance(v, str) and v for v in self.variants):
            raise ParamsError(f"{where}.variants: expected a non-empty list of variant names or 'picked', "
                              f"got {list(self.variants)!r}")
        _check_number(f"{where}.max_batch", self.max_batch, 1, 256, integer=True)
        _check_number(f"{where}.max_wait_ms", self.max_wait_ms, 0, 10_000)
        _check_number(f"{where}.max_queue", self.max_queue, 2, 1_000_000, integer=True)
        _check_number(f"{where}.reserved_high", self.reserved_high, 0, self.max_batch - 1, integer=True)
        _check_number(f"{where}.loadtest_requests", self.loadtest_requests, 1, 100_000, integer=True)
        if not self.loadtest_concurrency:
            raise ParamsError(f"{where}.loadtest_concurrency: expected at least one concurrency")
        for i, c in enumerate(self.loadtest_concurrency):
            _check_number(f"{where}.loadtest_concurrency[{i}]", c, 1, 1024, integer=True)
        _check_number(f"{where}.trace_seed", self.trace_seed, 0, 2**31 - 1, integer=True)


@dataclass(frozen=True)
class VersionParams:
    remote: str = "s3://costopt-artifacts/dvc"  # DVC remote URL
    endpoint_url: str = "http://127.0.0.1:5555"  # S3-compatible endpoint; "" means AWS
    timeout_s: float = 1800.0  # longest one dvc command (commit, push, pull) may run before it is stopped
    request_timeout_s: float = 60.0  # each S3 request's connect and read timeout

    def check(self, where: str) -> None:
        for name, lo, hi in (("timeout_s", 10, 86400), ("request_timeout_s", 1, 3600)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ParamsError(f"{where}.{name}: expected a number of seconds in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.remote, str) or "://" not in self.remote:
            raise ParamsError(f"{where}.remote: expected a URL such as s3://bucket/prefix, got {self.remote!r}")
        if not isinstance(self.endpoint_url, str) or (self.endpoint_url and
                                                       not self.endpoint_url.startswith(("http://", "https://"))):
            raise ParamsError(f"{where}.endpoint_url: expected '' or an http(s) URL, got {self.endpoint_url!r}")


@dataclass(frozen=True)
class Params:
    profile: str = "full"
    ingest: IngestParams = field(default_factory=IngestParams)
    evaldata: EvalDataParams = field(default_factory=EvalDataParams)
    benchmark: BenchmarkParams = field(default_factory=BenchmarkParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    search: SearchParams = field(default_factory=SearchParams)
    distill: DistillParams = field(default_factory=DistillParams)
    route: RouteParams = field(default_factory=RouteParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    cost: CostParams = field(default_factory=CostParams)
    gpu: GpuParams = field(default_factory=GpuParams)
    serve: ServeParams = field(default_factory=ServeParams)
    cache: CacheParams = field(default_factory=CacheParams)
    continuous: ContinuousParams = field(default_factory=ContinuousParams)
    version: VersionParams = field(default_factory=VersionParams)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def section(self, name: str) -> dict[str, Any]:
        return self.to_dict()[name]


_SECTIONS = {f.name: f for f in fields(Params) if f.name != "profile"}
PROFILES = ("quick", "full")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and checking every field."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    obj = cls(**kwargs)
    obj.check(where)
    return obj


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def params_from_dict(raw: dict[str, Any], profile: str | None = None,
                     overrides: dict[str, Any] | None = None, source: str = "params") -> Params:
    """Validate a params mapping; overlay the profile's sizes, then `overrides` (same shape)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    profile = profile or "full"
    if profile not in PROFILES:
        raise ParamsError(f"{source}: profile: expected one of {list(PROFILES)}, got {profile!r}")
    if not isinstance(profiles, dict) or not isinstance(profiles.get(profile, {}), dict):
        raise ParamsError(f"{source}: profiles.{profile}: expected a mapping of section overrides")
    merged = _merge(raw, profiles.get(profile, {}) or {})
    merged = _merge(merged, overrides or {})
    unknown = sorted(set(merged) - set(_SECTIONS))
    if unknown:
        raise ParamsError(f"{source}: unknown section(s) {unknown}; expected some of {sorted(_SECTIONS)}")
    built = {name: _build(f.default_factory, merged.get(name, {}), f"{source}:{name}")
             for name, f in _SECTIONS.items()}
    students = built["quantize"].student_variants()
    if students and not built["distill"].enabled:
        raise ParamsError(f"{source}:quantize.variants: {students} are made from the distilled student, but "
                          "distill.enabled is false; enable distillation or drop them")
    return Params(profile=profile, **built)


def load_params(path: str | Path = "params.yaml", profile: str | None = None,
                overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate `params.yaml`; a malformed file raises ParamsError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror})") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw, profile=profile, overrides=overrides, source=str(path))


# ------------------------------------------------------------------------------ one run's settings

FROZEN = Path("artifacts") / "run" / "params.yaml"  # relative to the workspace; a DVC output (stage `settings`)


def freeze(params: Params, path: Path, run_id: str | None) -> Path:
    """Write the effective settings of one run (params.yaml, profile and form overrides resolved) where
    every later phase of the run reads them, atomically. `run` names the DAG run that froze them (None
    for `python -m tasks.preflight`); the sections are the ones dvc.yaml's stages record in dvc.lock."""
    import yaml

    doc = {"run": {"dag_run_id": run_id}, **params.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("# written by preflight: the settings this run uses (do not edit; edit params.yaml)\n"
                   + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def load_frozen(path: Path, run_id: str | None = None) -> Params:
    """The settings `freeze` wrote; with `run_id`, only if that run froze them."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read this run's frozen settings ({exc.strerror}); expected the "
                          "preflight phase to have written them") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    run = raw.pop("run", None) or {}
    if run_id is not None and run.get("dag_run_id") != run_id:
        raise ParamsError(f"{path}: frozen by run {run.get('dag_run_id')!r}, not by this run {run_id!r}: another "
                          f"run started in the same workspace; give each concurrent run its own workspace")
    profile = raw.pop("profile", None)
    return params_from_dict(raw, profile=profile, source=str(path))
