"""Phase 4a, reference: the fp32 model's outputs on the held-out sets, computed once for all variants.

Run it as `python -m tasks.reference`. Writes artifacts/reference/:
- reference.safetensors: for every real held-out prompt position past the shared prefix, the fp32
  model's final hidden state (after the last norm). Full fp32 logits would be 12k x 49152 floats
  (2.4 GB); the hidden states are 28 MB, and `Ref.logits` turns them back into the exact fp32 logits
  with one matmul by the fp32 LM head, so KL is computed over the whole vocabulary;
- reference.json: what it was computed from (model fingerprint, data manifest, settings), the fp32
  perplexity NLL per passage and the fp32 answer to every task item.
It is cached: a re-run with the same model, data and settings returns at once. Validation of each
variant (tasks.validate) then needs one forward of that variant only, in its own process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from costopt.layout import Workspace, read_json, replace_dir, staging_dir, write_json
from costopt.metrics import accuracy_and_retention, token_nll
from costopt.modelio import load_model_dir
from costopt.params import Params

BATCH = 8  # sequences per forward: [8, 128, 49152] fp32 logits is 200 MB
FILE = "reference.safetensors"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    from tasks.report import MissingArtifactError

    if not path.is_file():
        raise MissingArtifactError(f"{path}: missing; run the evaldata phase first")
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
    if len(texts) < 2:
        return 0
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


def task_correct(model: Any, tok: Any, items: list[dict[str, Any]]) -> list[bool]:
    from costopt.taskscore import choice_logliks, predict

    preds = predict(choice_logliks(model, tok, items, progress=True))
    return [p == it["answer"] for p, it in zip(preds, items)]


@dataclass
class Ref:
    """Everything a variant is compared against, loaded from artifacts/reference."""
    tok: Any
    texts: list[str]
    passages: list[str]
    items: list[dict[str, Any]]
    skip: int
    max_len: int
    hidden: torch.Tensor  # [positions, hidden] fp32 final hidden states, in prompt-batch order
    head: torch.Tensor  # [vocab, hidden] fp32 LM head weight
    nll_sum: list[float]
    nll_count: list[float]
    correct: list[bool]
    info: dict[str, Any]

    def logits(self, start: int, stop: int) -> torch.Tensor:
        """Exact fp32 logits of positions [start, stop): [n, vocab]."""
        return torch.nn.functional.linear(self.hidden[start:stop], self.head)


def _identity(params: Params, ws: Workspace) -> dict[str, Any]:
    manifest = read_json(ws.data_dir / "manifest.json") if (ws.data_dir / "manifest.json").is_file() else {}
    model = read_json(ws.model_dir / "fingerprint.json") if (ws.model_dir / "fingerprint.json").is_file() else {}
    return {"model": model.get("fingerprint"), "data": manifest.get("files", manifest.get("identity")),
            "max_seq_len": params.validate.max_seq_len, "format": 2}


def _sets(ws: Workspace, tok: Any) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    prompts = read_jsonl(ws.data_dir / "prompts.jsonl")
    passages = [p["text"] for p in read_jsonl(ws.data_dir / "ppl.jsonl")]
    return prompt_texts(tok, prompts), passages, read_jsonl(ws.data_dir / "tasks.jsonl")


def reference(params: Params, ws: Workspace) -> dict[str, Any]:
    """Compute (or reuse) the fp32 reference; return a small summary."""
    out = ws.reference_dir
    identity = _identity(params, ws)
    if (out / "reference.json").is_file() and (out / FILE).is_file():
        old = read_json(out / "reference.json")
        if old.get("identity") == identity:
            return {"cached": True, **old["baseline"]}
    from safetensors.torch import save_file

    model, tok = load_model_dir(ws.model_dir)
    texts, passages, items = _sets(ws, tok)
    skip, max_len = shared_prefix_len(tok, texts), params.validate.max_seq_len
    hidden = []
    for enc in tqdm(list(batches(tok, texts, max_len)), desc="reference prompts", unit="batch"):
        mask = enc["attention_mask"].bool()
        mask[:, :skip] = False
        with torch.inference_mode():
            final = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hidden.append(final.last_hidden_state[mask].float())  # [n, H], after the final norm
    nll_sum, nll_count = [], []
    for enc in tqdm(list(batches(tok, passages, max_len)), desc="reference perplexity", unit="batch"):
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        nll = token_nll(logits(model, enc)[:, :-1], ids[:, 1:])
        for b in range(ids.shape[0]):
            nll_sum.append(float(nll[b][mask[b, 1:]].sum()))
            nll_count.append(float(mask[b, 1:].sum()))
    correct = task_correct(model, tok, items)
    acc, _ = accuracy_and_retention(correct, correct, params.validate.bootstrap)
    manifest = read_json(ws.data_dir / "manifest.json")
    baseline = {"task_accuracy": acc.to_dict(), "ppl": float(np.exp(sum(nll_sum) / sum(nll_count))),
                "chance_accuracy": manifest.get("chance_accuracy"), "ppl_tokens": int(sum(nll_count)),
                "prompt_tokens": int(sum(len(x) for x in hidden)), "shared_prefix_tokens_skipped": skip,
                "items": len(items), "prompts": len(texts), "passages": len(passages)}
    stage = staging_dir(out)
    save_file({"hidden": torch.cat(hidden).contiguous()}, str(stage / FILE))
    write_json(stage / "reference.json", {"identity": identity, "baseline": baseline, "skip": skip,
                                          "nll_sum": nll_sum, "nll_count": nll_count, "correct": correct})
    replace_dir(stage, out)
    return {"cached": False, **baseline}


def load_reference(params: Params, ws: Workspace) -> Ref:
    """The stored reference, checked against the current model, data and settings."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tasks.report import MissingArtifactError

    out = ws.reference_dir
    if not (out / "reference.json").is_file() or not (out / FILE).is_file():
        raise MissingArtifactError(f"{out}: no fp32 reference; run the reference phase first")
    record = read_json(out / "reference.json")
    if record.get("identity") != _identity(params, ws):
        raise MissingArtifactError(f"{out}: the fp32 reference was made from another model, data set or "
                                   "settings; rerun the reference phase")
    tensors = load_file(str(out / FILE))
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    texts, passages, items = _sets(ws, tok)
    return Ref(tok, texts, passages, items, record["skip"], params.validate.max_seq_len,
               tensors["hidden"], head_weight(ws.model_dir), record["nll_sum"], record["nll_count"],
               record["correct"], record["baseline"])


def head_weight(model_dir: Path) -> torch.Tensor:
    """The fp32 LM head weight [vocab, hidden] from the ingested safetensors (tied: the embedding)."""
    from safetensors import safe_open

    from tasks.report import MissingArtifactError

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in keys:
                    return fh.get_tensor(key).float()
    raise MissingArtifactError(f"{model_dir}: no lm_head.weight or model.embed_tokens.weight in its "
                               "safetensors; re-run the ingest phase")


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], reference, argv)


if __name__ == "__main__":
    raise SystemExit(main())
