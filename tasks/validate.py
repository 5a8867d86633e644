"""Phase 5, validate: every variant against fp32 on held-out data, then the quality gates.

Run it as `python -m tasks.validate`. Metrics (costopt.metrics), each with a 95% bootstrap CI:
- KL mean and p99, top-1 agreement: teacher-forced over held-out chat prompts followed by the fp32
  model's own answer, at every real (non-pad) position after the prefix all prompts share (the chat
  template's system block);
- perplexity ratio on held-out passages;
- task accuracy and retention on the labeled multiple-choice set (log-likelihood scoring).
fp32 logits are computed once per batch and compared with every variant in lockstep. The Great
Expectations suite in `tasks.gates` then decides each gate; its Data Docs land in
artifacts/quality/data_docs/.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from costopt.layout import Workspace, read_json, replace_dir, staging_dir, write_json
from costopt.metrics import (Reference, accuracy_and_retention, mean_over_units, ppl_ratio,
                             quantile_over_units, token_nll)
from costopt.modelio import load_model_dir
from costopt.params import Params
from costopt.variants import load_variant_model

BATCH = 8  # sequences per forward: [8, 128, 49152] fp32 logits is 200 MB


@dataclass
class Tally:
    """Per-sequence accumulators for one variant."""
    kl_sum: list[float] = field(default_factory=list)
    kl_tokens: list[np.ndarray] = field(default_factory=list)
    top1_sum: list[float] = field(default_factory=list)
    count: list[float] = field(default_factory=list)
    nll_sum: list[float] = field(default_factory=list)
    nll_count: list[float] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the evaldata phase first")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prompt_texts(tok: Any, rows: list[dict[str, Any]]) -> list[str]:
    """Chat-templated prompt followed by the fp32 reference answer."""
    return [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
            + r.get("reference", "") for r in rows]


def shared_prefix_len(tok: Any, texts: list[str]) -> int:
    """Tokens every text starts with (the chat template's system block). Their logits are the same in
    every sequence, so counting them would weight one position hundreds of times (it would set the
    p99 on its own); we measure from the first position that differs."""
    ids = [tok(t)["input_ids"] for t in texts]
    n = min(len(x) for x in ids)
    for i in range(n):
        if any(x[i] != ids[0][i] for x in ids):
            return i
    return n


def batches(tok: Any, texts: list[str], max_len: int) -> Iterator[dict[str, torch.Tensor]]:
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for i in range(0, len(texts), BATCH):
        yield tok(texts[i:i + BATCH], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len)


def logits(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()


def compare_prompts(base: Any, variants: dict[str, Any], tok: Any, texts: list[str], max_len: int,
                    tallies: dict[str, Tally]) -> int:
    """KL and top-1 of each variant against fp32 at every real position past the shared prefix."""
    skip = shared_prefix_len(tok, texts) if len(texts) > 1 else 0
    for enc in tqdm(list(batches(tok, texts, max_len)), desc="validate prompts", unit="batch"):
        mask = enc["attention_mask"].bool()  # [B, T]
        mask[:, :skip] = False
        seq_of_row = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]  # [N] real positions only
        ref = Reference(logits(base, enc)[mask])  # [N, V]
        for name, model in variants.items():
            out = logits(model, enc)[mask]
            kl, top1 = ref.kl(out).double(), ref.top1_match(out)  # [N]
            t = tallies[name]
            for b in range(mask.shape[0]):
                rows = seq_of_row == b
                t.kl_sum.append(float(kl[rows].sum()))
                t.kl_tokens.append(kl[rows].numpy())
                t.top1_sum.append(float(top1[rows].sum()))
                t.count.append(float(rows.sum()))
    return skip


def passage_nll(models: dict[str, Any], tok: Any, texts: list[str], max_len: int,
                tallies: dict[str, Tally]) -> None:
    """Summed next-token NLL per passage for each model (fp32 included as 'fp32')."""
    for enc in tqdm(list(batches(tok, texts, max_len)), desc="validate perplexity", unit="batch"):
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        for name, model in models.items():
            nll = token_nll(logits(model, enc)[:, :-1], ids[:, 1:])  # [B, T-1]
            valid = mask[:, 1:]
            t = tallies[name]
            for b in range(ids.shape[0]):
                t.nll_sum.append(float(nll[b][valid[b]].sum()))
                t.nll_count.append(float(valid[b].sum()))


def task_correct(models: dict[str, Any], tok: Any, items: list[dict[str, Any]]) -> dict[str, list[bool]]:
    from costopt.taskscore import choice_logliks, predict

    answers = [it["answer"] for it in items]
    out = {}
    for name, model in models.items():
        preds = predict(choice_logliks(model, tok, items, progress=True))
        out[name] = [p == a for p, a in zip(preds, answers)]
    return out


def summarize(tally: Tally, base: Tally, correct: list[bool], base_correct: list[bool],
              resamples: int) -> dict[str, Any]:
    est = {
        "kl_mean": mean_over_units(tally.kl_sum, tally.count, resamples),
        "kl_p99": quantile_over_units(tally.kl_tokens, 0.99, resamples),
        "top1_agreement": mean_over_units(tally.top1_sum, tally.count, resamples),
    }
    est["ppl_ratio"], _, _ = ppl_ratio(base.nll_sum, tally.nll_sum, tally.nll_count, resamples)
    est["task_accuracy"], est["task_retention"] = accuracy_and_retention(base_correct, correct, resamples)
    return {k: v.to_dict() for k, v in est.items()}


def validate(params: Params, ws: Workspace) -> dict[str, Any]:
    """Measure every variant against fp32, run the gates; write artifacts/quality/."""
    from tasks.gates import evaluate_gates

    cfg = params.validate
    base, tok = load_model_dir(ws.model_dir)
    variants = {name: load_variant_model(ws, name)[0] for name in params.quantize.variants}
    prompts = read_jsonl(ws.data_dir / "prompts.jsonl")
    passages = read_jsonl(ws.data_dir / "ppl.jsonl")
    items = read_jsonl(ws.data_dir / "tasks.jsonl")
    manifest = read_json(ws.data_dir / "manifest.json")

    tallies = {name: Tally() for name in ["fp32", *variants]}
    skipped = compare_prompts(base, variants, tok, prompt_texts(tok, prompts), cfg.max_seq_len, tallies)
    passage_nll({"fp32": base, **variants}, tok, [p["text"] for p in passages], cfg.max_seq_len, tallies)
    correct = task_correct({"fp32": base, **variants}, tok, items)

    base_acc, _ = accuracy_and_retention(correct["fp32"], correct["fp32"], cfg.bootstrap)
    base_ppl = float(np.exp(np.sum(tallies["fp32"].nll_sum) / np.sum(tallies["fp32"].nll_count)))
    quality = {
        "baseline": {"task_accuracy": base_acc.to_dict(), "ppl": base_ppl,
                     "chance_accuracy": manifest.get("chance_accuracy"),
                     "ppl_tokens": int(sum(tallies["fp32"].nll_count)),
                     "prompt_tokens": int(sum(tallies[params.quantize.variants[0]].count)),
                     "shared_prefix_tokens_skipped": skipped,
                     "items": len(items), "prompts": len(prompts), "passages": len(passages)},
        "variants": {name: summarize(tallies[name], tallies["fp32"], correct[name], correct["fp32"],
                                     cfg.bootstrap) for name in variants},
    }
    stage = staging_dir(ws.quality_dir)
    write_json(stage / "quality.json", quality)
    verdicts = evaluate_gates(quality["variants"], cfg.gates, stage / "data_docs")
    verdicts["data_docs"] = str((ws.quality_dir / "data_docs" / "index.html").relative_to(ws.root))
    write_json(stage / "gates.json", verdicts)
    replace_dir(stage, ws.quality_dir)
    return {name: {"passed": v["passed"], "kl_mean": quality["variants"][name]["kl_mean"]["value"]}
            for name, v in verdicts["variants"].items()}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], validate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
