"""Phase 4a, reference: the fp32 model's outputs on the held-out sets, computed once for all variants.

Run it as `python -m tasks.reference`. Writes artifacts/reference/:
- reference.safetensors: for every real held-out prompt position past the shared prefix, the fp32
  model's final hidden state (after the last norm): `hidden` for the first held-out set,
  `hidden_crosscheck` for the second (the factual questions of costopt.evaluation.factual). Full fp32 logits would be 12k x 49152 floats
  (2.4 GB); the hidden states are 28 MB, and `Ref.logits` turns them back into the exact fp32 logits
  with one matmul by the fp32 LM head, so KL is computed over the whole vocabulary;
- reference.json: what it was computed from (model fingerprint, data manifest, settings), the fp32
  perplexity NLL per passage and the fp32 answer to every task item.
It is cached: a re-run with the same model, data and settings returns at once. Validation of each
variant (tasks.validate) then needs one forward of that variant only, in its own process.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from costopt.evaluation.metrics import accuracy_and_retention, token_nll
from costopt.evaluation.reference import (FILE, batches, crosscheck_texts, final_hidden, identity, logits,
                                          reference_sets, task_correct)
from costopt.models.source import load_model_dir
from costopt.params import Params
from costopt.storage.layout import Workspace, read_json, replace_dir, staging_dir, write_json


def reference(params: Params, ws: Workspace) -> dict[str, Any]:
    """Compute (or reuse) the fp32 reference; return a small summary."""
    out = ws.reference_dir
    ident = identity(params, ws)
    if (out / "reference.json").is_file() and (out / FILE).is_file():
        old = read_json(out / "reference.json")
        if old.get("identity") == ident:
            return {"cached": True, **old["baseline"]}
    from safetensors.torch import save_file

    model, tok = load_model_dir(ws.model_dir)
    texts, passages, items = reference_sets(ws, tok)
    max_len = params.validate.max_seq_len
    hidden, skip = final_hidden(model, tok, texts, max_len, "reference prompts")
    cross, cross_skip = final_hidden(model, tok, crosscheck_texts(ws, tok), max_len, "reference crosscheck")
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
                "prompt_tokens": int(hidden.shape[0]), "shared_prefix_tokens_skipped": skip,
                "items": len(items), "prompts": len(texts), "passages": len(passages),
                "crosscheck_prompts": len(crosscheck_texts(ws, tok)), "crosscheck_tokens": int(cross.shape[0])}
    stage = staging_dir(out)
    save_file({"hidden": hidden, "hidden_crosscheck": cross}, str(stage / FILE))
    write_json(stage / "reference.json", {"identity": ident, "baseline": baseline, "skip": skip,
                                          "crosscheck_skip": cross_skip, "nll_sum": nll_sum,
                                          "nll_count": nll_count, "correct": correct})
    replace_dir(stage, out)
    return {"cached": False, **baseline}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_phase
    return run_phase(__doc__.splitlines()[0], reference, argv)


if __name__ == "__main__":
    raise SystemExit(main())
