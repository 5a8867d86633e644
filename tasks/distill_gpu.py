"""Phase 3b on a GPU: a longer distillation run of the same student, with the teacher live.

Run it as `python -m tasks.distill_gpu --bundle DIR --out DIR` on a machine with a CUDA GPU. It needs
no workspace, settings file or pipeline environment (torch, transformers and safetensors only), so it
runs on a bare GPU box:

1. `python -m tasks.distill --export-gpu DIR` (on the pipeline's machine, after a distill run) writes
   the bundle: the teacher's weights in bf16 parts (`costopt.distill.transfer`), its config and
   tokenizer, the pruning plan of that run and the training prompts (no held-out prompt among them);
2. this command rebuilds the teacher and the pruned student from it, has the teacher write the data,
   trains (`costopt.distill.online`) within `--train-seconds`, and writes the student's trained weights
   (bf16 parts of at most `--part-mib`, the embeddings left out: they stay the teacher's) and
   `record.json` (data, steps, losses, KL and top-1 on held-out prompts before and after) to `--out`;
3. `python -m tasks.distill --import-student DIR` (back on the pipeline's machine) measures the result
   against the fp32 reference like any student and, if it passes the plan check, makes it the
   workspace's student.

`--checkpoint DIR` keeps the teacher's data and the training checkpoint there, so a second call resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from costopt.distill.online import OnlineConfig
from costopt.distill.transfer import TransferError


def load_bundle(bundle: Path, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """(teacher in bf16 on `device`, tokenizer, the bundle's plan.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from costopt.distill.transfer import unpack

    meta = bundle / "meta"
    plan = json.loads((meta / "plan.json").read_text())
    parts = sorted(bundle.rglob("teacher-part*.safetensors"))
    state = unpack(parts)
    config = AutoConfig.from_pretrained(str(meta))
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"{bundle}: the teacher parts do not fit its config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        teacher.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(meta))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return teacher.eval(), tok, plan


def run(args: argparse.Namespace) -> dict[str, Any]:
    from costopt.distill.online import agreement, teacher_data, train_online
    from costopt.distill.student import build, param_count
    from costopt.distill.transfer import pack

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        raise SystemExit("no CUDA device: this phase is the GPU run (pass --allow-cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.monotonic()
    teacher, tok, plan = load_bundle(args.bundle, device)
    student = build(teacher, plan["plan"]).float()
    teacher.to(device)
    student.to(device)
    overrides = {f.name: getattr(args, f.name) for f in fields(OnlineConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = OnlineConfig(**{**plan.get("online", {}), **overrides})
    print(f"teacher and student on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}): "
          f"student {param_count(student) / 1e6:.1f}M parameters, {time.monotonic() - t0:.0f} s", flush=True)
    ckpt = args.checkpoint
    data = None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        if (ckpt / "data.pt").is_file():
            data = torch.load(ckpt / "data.pt", weights_only=False)
            print(f"teacher data reused from {ckpt / 'data.pt'}", flush=True)
    if data is None:
        conversations = plan["conversations"][:args.max_prompts] if args.max_prompts else plan["conversations"]
        data = teacher_data(teacher, tok, conversations, cfg, device, log=lambda m: print(m, flush=True))
        if ckpt is not None:
            torch.save(data, ckpt / "data.pt")
    pad = tok.pad_token_id
    before = agreement(teacher, student, data["holdout"], pad, data["skip"], device)
    print(f"held-out prompts before: {before}", flush=True)
    result = train_online(teacher, student, data, pad, plan["teacher_blocks"], plan["supervised_blocks"], cfg, device,
                          ckpt / "checkpoint.pt" if ckpt else None, log=lambda m: print(m, flush=True))
    after = agreement(teacher, student, data["holdout"], pad, data["skip"], device)
    print(f"held-out prompts after: {after}", flush=True)
    trained = {k: v.detach().cpu() for k, v in student.state_dict().items()
               if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    args.out.mkdir(parents=True, exist_ok=True)
    files = pack(trained, args.out, int(args.part_mib * 2 ** 20), prefix="student-part")
    record = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": asdict(cfg),
              "plan": plan["plan"], "model_fingerprint": plan.get("model_fingerprint"),
              "data": {"train_sequences": len(data["train"]), "holdout_sequences": len(data["holdout"]),
                       "tokens": data["tokens"], "counts": data["counts"], "seconds": data["seconds"]},
              "train": {k: result[k] for k in ("steps", "total", "tokens", "seconds", "history")},
              "holdout_before": before, "holdout_after": after, "parts": [f.name for f in files],
              "seconds": time.monotonic() - t0}
    (args.out / "record.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="the folder written by python -m tasks.distill --export-gpu")
    p.add_argument("--out", type=Path, required=True, help="where the student's weight parts and record.json go")
    p.add_argument("--checkpoint", type=Path, help="keep the teacher's data and the training checkpoint here (resume)")
    p.add_argument("--part-mib", type=float, default=15.0, help="largest weight part, MiB (default 15)")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test; slow)")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N training prompts (0: all)")
    for f in fields(OnlineConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=None,
                       help=f"default {f.default}")
    args = p.parse_args(argv)
    if not (args.bundle / "meta" / "plan.json").is_file():
        p.error(f"--bundle: {args.bundle} holds no meta/plan.json (write it with python -m tasks.distill --export-gpu)")
    try:
        record = run(args)
    except TransferError as exc:
        print(f"error: --bundle: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("device", "holdout_before", "holdout_after", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
