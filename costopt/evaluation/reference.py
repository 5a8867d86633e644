"""The stored fp32 reference and the helpers that compare a model with it.

`tasks.reference` computes artifacts/reference once (see that phase's docstring for the format);
`load_reference` reads it back, checked against the current model, data and settings, as a `Ref`
whose `logits` rebuild the exact fp32 logits from stored hidden states. The validate phase, the
calibration curve and the sensitivity scan share these helpers (text batching, teacher-forced
logits, task answers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from costopt.storage.layout import MissingArtifactError, Workspace, read_json
from costopt.params import Params

BATCH = 8  # sequences per forward: [8, 128, 49152] fp32 logits is 200 MB
FILE = "reference.safetensors"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def final_hidden(model: Any, tok: Any, texts: list[str], max_len: int, desc: str) -> tuple[torch.Tensor, int]:
    """The fp32 final hidden states (after the last norm) of every real position of `texts` past their
    shared prefix, in batch order: ([positions, hidden], the prefix length skipped)."""
    skip, hidden = shared_prefix_len(tok, texts), []
    for enc in tqdm(list(batches(tok, texts, max_len)), desc=desc, unit="batch"):
        mask = enc["attention_mask"].bool()
        mask[:, :skip] = False
        with torch.inference_mode():
            final = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hidden.append(final.last_hidden_state[mask].float())  # [n, H]
    return torch.cat(hidden).contiguous(), skip


def logits(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()


def task_correct(model: Any, tok: Any, items: list[dict[str, Any]]) -> list[bool]:
    from costopt.evaluation.taskscore import choice_logliks, predict

    preds = predict(choice_logliks(model, tok, items, progress=True))
    return [p == it["answer"] for p, it in zip(preds, items)]


@dataclass
class PromptSet:
    """One held-out prompt set as the reference stores it: texts (chat-templated prompt + fp32 answer),
    the shared prefix skipped, and the fp32 final hidden state of every measured position."""
    name: str
    texts: list[str]
    skip: int
    hidden: torch.Tensor  # [positions, hidden], in prompt-batch order


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
    crosscheck: PromptSet | None = None  # the second held-out set (costopt.evaluation.factual)

    def prompt_set(self) -> PromptSet:
        """The first held-out set, the one the gates judge."""
        return PromptSet("prompts", self.texts, self.skip, self.hidden)

    def logits(self, start: int, stop: int, prompts: PromptSet | None = None) -> torch.Tensor:
        """Exact fp32 logits of positions [start, stop) of `prompts` (default: the first set): [n, vocab]."""
        hidden = self.hidden if prompts is None else prompts.hidden
        return torch.nn.functional.linear(hidden[start:stop], self.head)


def identity(params: Params, ws: Workspace) -> dict[str, Any]:
    manifest = read_json(ws.data_dir / "manifest.json") if (ws.data_dir / "manifest.json").is_file() else {}
    model = read_json(ws.model_dir / "fingerprint.json") if (ws.model_dir / "fingerprint.json").is_file() else {}
    return {"model": model.get("fingerprint"), "data": manifest.get("files", manifest.get("identity")),
            "max_seq_len": params.validate.max_seq_len, "format": 3}  # 3: the crosscheck set


def reference_sets(ws: Workspace, tok: Any) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    prompts = read_jsonl(ws.data_dir / "prompts.jsonl")
    passages = [p["text"] for p in read_jsonl(ws.data_dir / "ppl.jsonl")]
    return prompt_texts(tok, prompts), passages, read_jsonl(ws.data_dir / "tasks.jsonl")


def crosscheck_texts(ws: Workspace, tok: Any) -> list[str]:
    """The second held-out set's texts (chat-templated question + fp32 answer)."""
    return prompt_texts(tok, read_jsonl(ws.data_dir / "crosscheck.jsonl"))


_LOADED: dict[Any, Ref] = {}  # the last reference loaded in this process, under its files' stamps


def load_reference(params: Params, ws: Workspace) -> Ref:
    """The stored reference, checked against the current model, data and settings.

    Kept in memory while its files are unchanged: the DAG runs its tasks in one process (`airflow dags
    test`), where every variant's validation, the distill phase's two measurements and the calibration
    curve read the same reference (about 3 s a load on the reference box)."""
    out = ws.reference_dir
    if not (out / "reference.json").is_file() or not (out / FILE).is_file():
        raise MissingArtifactError(f"{out}: no fp32 reference; run the reference phase first")
    record = read_json(out / "reference.json")
    if record.get("identity") != identity(params, ws):
        raise MissingArtifactError(f"{out}: the fp32 reference was made from another model, data set or "
                                   "settings; rerun the reference phase")
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size)
                  for f in (out / "reference.json", out / FILE, *sorted(ws.model_dir.glob("*.safetensors"))))
    key = (stamp, json.dumps(record.get("identity"), sort_keys=True, default=str), params.validate.max_seq_len)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load(params, ws, record)
    return _LOADED[key]


def _load(params: Params, ws: Workspace, record: dict[str, Any]) -> Ref:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = ws.reference_dir
    tensors = load_file(str(out / FILE))
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    texts, passages, items = reference_sets(ws, tok)
    cross = PromptSet("crosscheck", crosscheck_texts(ws, tok), record["crosscheck_skip"],
                      tensors["hidden_crosscheck"])
    return Ref(tok, texts, passages, items, record["skip"], params.validate.max_seq_len,
               tensors["hidden"], head_weight(ws.model_dir), record["nll_sum"], record["nll_count"],
               record["correct"], record["baseline"], cross)


def head_weight(model_dir: Path) -> torch.Tensor:
    """The fp32 LM head weight [vocab, hidden] from the ingested safetensors (tied: the embedding)."""
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in keys:
                    return fh.get_tensor(key).float()
    raise MissingArtifactError(f"{model_dir}: no lm_head.weight or model.embed_tokens.weight in its "
                               "safetensors; re-run the ingest phase")
