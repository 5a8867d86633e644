"""Phase 3b, distill: a student at most half the teacher's size, built from it and trained on its outputs.

Run it as `python -m tasks.distill`. Steps (`costopt.distill`):
1. training rows: the teacher's greedy answers to prompts that no held-out set holds (the calibration
   prompts with their fp32 answers, the serving request log's prompts when it has any, then the chat
   pool past the held-out and calibration prompts);
2. importance on 32 of them: block influence and MLP channel importance; the plan keeps
   `distill.layers` blocks of `distill.intermediate_size` channels (checked against the teacher first:
   a shape it cannot give fails at once, naming the field);
3. the teacher's targets (top-k log-probs, hidden states at the supervised blocks), computed once into
   `.costopt/distill/` (machine state), as are the training texts: both are reused while what they are
   made of is unchanged (a run that only changes the training settings skips straight to training);
4. the pruned student, untrained, measured against the fp32 reference (every gate metric, 95% CIs);
5. training (resumes from its checkpoint in `.costopt/distill/run-<settings>/` when interrupted);
6. the trained student measured the same way, and (`--speed`, the command line's default) its speed
   next to the teacher's (the benchmark phase's decode and served-cost measurement, both in this run;
   the DAG leaves it out: its `student*` variants are benchmarked like every other); written as a model
   folder to artifacts/distill/student (with its fingerprint.json, so variants can name their base),
   with artifacts/distill/distill.json (plan, sizes, both measurements, the speeds, the loss history,
   times).
Skipped (an "enabled": false record) when distill.enabled is false; cached while the teacher, the
data and the settings are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from typing import Any

import torch

from costopt.params import Params
from costopt.models.source import fingerprint_dir
from costopt.storage.layout import MissingArtifactError, Workspace, read_json, replace_dir, staging_dir, write_json

FORMAT = 3  # 2: the speed record; 3: speed optional, the student's fingerprint.json, cached texts
IMPORTANCE_SEQUENCES = 32


def _identity(params: Params, ws: Workspace) -> dict[str, Any]:
    model = read_json(ws.model_dir / "fingerprint.json")["fingerprint"]
    manifest = read_json(ws.data_dir / "manifest.json")
    return {"model": model, "data": manifest.get("files"), "distill": params.section("distill"),
            "evaldata_seed": params.evaldata.seed, "format": FORMAT}


def _log_rows(params: Params, ws: Workspace) -> list[dict[str, Any]]:
    """The serving request log's conversations (`calibrate.logs`), [] when there is no log."""
    from costopt.quantization.calibset import request_log_rows

    path = ws.root / params.calibrate.logs
    return [{"messages": r["messages"]} for r in request_log_rows(path)] if path.is_file() else []


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_json(path: Any, stamp: str) -> Any:
    """The JSON payload stored at `path` under `stamp`, or None (missing, unreadable or another stamp)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("payload") if isinstance(data, dict) and data.get("stamp") == stamp else None


def _store_json(path: Any, stamp: str, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "payload": payload}))
    tmp.replace(path)


def training_texts(params: Params, ws: Workspace, teacher: Any, tok: Any) -> tuple[list[str], dict[str, int]]:
    """Chat-templated prompt + the teacher's answer for every training row, and where the rows came from.
    Cached in the work folder by what they are made of (teacher, data, request log, sizes)."""
    p, e = params.distill, params.evaldata
    log_rows = _log_rows(params, ws)
    stamp = _digest({"model": read_json(ws.model_dir / "fingerprint.json")["fingerprint"],
                     "data": read_json(ws.data_dir / "manifest.json").get("files"), "log": log_rows,
                     "sequences": p.sequences, "answer_tokens": p.answer_tokens, "seed": e.seed,
                     "held": e.prompts + e.calibration, "format": FORMAT})
    cache = ws.distill_work_dir / "texts.json"
    cached = _cached_json(cache, stamp)
    if cached is not None:
        return cached["texts"], cached["sources"]
    texts, sources = _make_texts(params, ws, teacher, tok, log_rows)
    ws.distill_work_dir.mkdir(parents=True, exist_ok=True)
    _store_json(cache, stamp, {"texts": texts, "sources": sources})
    return texts, sources


def _make_texts(params: Params, ws: Workspace, teacher: Any, tok: Any,
                log_rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, int]]:
    from costopt.distill.teacher import training_conversations
    from costopt.evaluation.reference import read_jsonl
    from costopt.runtimes.engine import greedy_answers

    p, e = params.distill, params.evaldata
    rows = training_conversations(e.seed, e.prompts + e.calibration, read_jsonl(ws.data_dir / "prompts.jsonl"),
                                  read_jsonl(ws.data_dir / "crosscheck.jsonl"),
                                  read_jsonl(ws.data_dir / "calibration.jsonl"), log_rows, p.sequences)
    need = [i for i, r in enumerate(rows) if not r.get("reference")]
    answers = greedy_answers(teacher, tok, [rows[i]["messages"] for i in need], p.answer_tokens,
                             desc="teacher answers") if need else []
    for i, a in zip(need, answers):
        rows[i] = {**rows[i], "reference": a}
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) + r["reference"]
             for r in rows]
    return texts, {"rows": len(rows), "teacher_answered": len(need), "request_log_rows": len(log_rows)}


def supervised_blocks(layers: int, n: int) -> list[int]:
    """`n` student blocks spread evenly, the last included (e.g. 16 blocks, 3 -> [4, 10, 15])."""
    if n <= 0:
        return []
    return sorted({round((k + 1) * layers / n) - 1 for k in range(n)})


def save_student(student: Any, tok: Any, out_dir: Any, provenance: dict[str, Any]) -> None:
    """Write `student` as a model folder, `out_dir`/student (weights, tokenizer, fingerprint.json with
    `provenance`), replacing the old one only once the new one is whole."""
    stage = staging_dir(out_dir / "student")
    student.save_pretrained(str(stage), safe_serialization=True)
    tok.save_pretrained(str(stage))
    write_json(stage / "fingerprint.json", {"fingerprint": fingerprint_dir(stage, ("*.safetensors",)), **provenance})
    replace_dir(stage, out_dir / "student")


def measure(model: Any, params: Params, ws: Workspace) -> dict[str, Any]:
    """Every gate metric against the fp32 reference, with 95% CIs (the validate phase's measurement)."""
    from costopt.evaluation.reference import load_reference
    from costopt.evaluation.quality import measure_quality

    return measure_quality(model, load_reference(params, ws), params.validate.bootstrap)


def speed_of(model: Any, tok: Any, name: str, params: Params, ws: Workspace) -> dict[str, Any]:
    """The benchmark phase's speed record (decode tok/s, the served cost on the torch engine)."""
    from tqdm import tqdm

    from costopt.evaluation.served import SERVED_MAX_LEN
    from costopt.evaluation.speed import measure as measure_speed
    from costopt.runtimes.engine import Engine
    from tasks.benchmark import held_out_prompts

    cfg = params.benchmark
    engine = Engine(model, eos_token_ids=[], max_batch=cfg.served_concurrency, max_len=SERVED_MAX_LEN)
    with tqdm(total=cfg.served_requests, desc=f"speed {name}", unit="req") as bar:
        return measure_speed(model, tok, held_out_prompts(ws), cfg, params.cost.price_per_hour_usd, name, engine, bar)


def distill(params: Params, ws: Workspace, speed: bool = False) -> dict[str, Any]:
    """Build, train and measure the student (see the module docstring); `speed`: also time it next to
    the teacher."""
    from costopt.distill.student import StudentShape, build, check_shape, importance, param_count, plan
    from costopt.distill.teacher import Targets, compute
    from costopt.distill.train import TrainConfig, train
    from costopt.evaluation.reference import batches, shared_prefix_len
    from costopt.models.source import load_model_dir

    out_dir = ws.distill_dir
    p = params.distill
    if not p.enabled:
        write_json(out_dir / "distill.json", {"enabled": False})
        return {"enabled": False}
    torch.set_num_threads(params.benchmark.threads)
    teacher, tok = load_model_dir(ws.model_dir)
    shape = StudentShape(p.layers, p.intermediate_size)
    n_student = check_shape(teacher.config, shape)  # before any long computation
    identity = _identity(params, ws)
    record_file = out_dir / "distill.json"
    if record_file.is_file() and read_json(record_file).get("identity") == identity and \
            (out_dir / "student" / "config.json").is_file() and (not speed or read_json(record_file).get("speed")):
        return {"cached": True, **read_json(record_file)["summary"]}
    t0 = time.perf_counter()
    work = ws.distill_work_dir
    work.mkdir(parents=True, exist_ok=True)
    targets_file = work / "targets.safetensors"
    texts, sources = training_texts(params, ws, teacher, tok)
    skip = shared_prefix_len(tok, texts)
    enc = list(batches(tok, texts[:IMPORTANCE_SEQUENCES], p.max_seq_len))
    the_plan = plan(importance(teacher, enc), shape)
    kept = the_plan["kept_layers"]
    blocks = supervised_blocks(p.layers, p.hidden_layers)
    t_data = time.perf_counter()
    from safetensors.torch import load_file, save_file

    # what the targets are made of, and nothing else: a change of the training settings reuses them
    stamp = {"texts": _digest(texts), "kept": str(kept), "blocks": str(blocks),
             "max_seq_len": str(p.max_seq_len), "top_k": str(p.top_k), "format": str(FORMAT)}
    targets = None
    if targets_file.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(targets_file), "pt") as fh:
                if fh.metadata() == stamp:
                    targets = Targets.from_tensors(load_file(str(targets_file)))
        except Exception:  # unreadable: computed again below
            targets = None
    if targets is None:
        targets = compute(teacher, tok, texts, [kept[j] for j in blocks], p.max_seq_len, skip, k=p.top_k)
        tmp = targets_file.with_suffix(".tmp")
        save_file(targets.tensors(), str(tmp), metadata=stamp)
        tmp.replace(targets_file)
    t_targets = time.perf_counter()
    before = measure(build(teacher, the_plan), params, ws)
    t_before = time.perf_counter()
    cfg = TrainConfig(steps=p.steps, batch=p.batch, lr=p.lr, t_start=p.t_start, t_end=p.t_end,
                      hidden_weight=p.hidden_weight, seed=params.evaldata.seed)
    student = build(teacher, the_plan)
    run_key = hashlib.sha256(json.dumps([stamp, cfg.__dict__], sort_keys=True).encode()).hexdigest()[:12]
    ckpt_dir = work / f"run-{run_key}"  # one folder per setting: a stale run's checkpoint never blocks a new one
    result = train(student, targets, blocks, cfg, ckpt_dir, identity={"run": stamp})
    t_train = time.perf_counter()
    after = measure(student, params, ws)
    t_after = time.perf_counter()
    speeds = None
    if speed:  # side by side, same engine and trace
        speeds = {"student": speed_of(student, tok, "student", params, ws),
                  "teacher": speed_of(teacher, tok, "fp32", params, ws)}
    t_speed = time.perf_counter()
    n_teacher = param_count(teacher)
    save_student(student, tok, out_dir, {"distilled_from": identity["model"]})
    kl_before, kl_after = before["kl_mean"]["value"], after["kl_mean"]["value"]
    summary = {"student_params": param_count(student), "teacher_params": n_teacher,
               "param_ratio": param_count(student) / n_teacher, "kept_layers": kept,
               "kl_mean_before": kl_before, "kl_mean_after": kl_after,
               "kl_reduction": kl_before / kl_after if kl_after else None,
               "top_k_mass": targets.mass, "train_seconds": result["seconds"], "resumed_from": result["resumed_from"]}
    if speeds:
        s, t = speeds["student"], speeds["teacher"]
        summary.update({"student_cost_per_1m_requests_usd": s["cost_per_1m_requests_usd"],
                        "teacher_cost_per_1m_requests_usd": t["cost_per_1m_requests_usd"],
                        "cost_ratio": s["cost_per_1m_requests_usd"] / t["cost_per_1m_requests_usd"],
                        "student_decode_tok_s_bs1": s["decode_tok_s_bs1"],
                        "teacher_decode_tok_s_bs1": t["decode_tok_s_bs1"]})
    assert summary["student_params"] == n_student, "the shape check and the built student disagree"
    record = {"identity": identity, "summary": summary, "plan": the_plan, "sources": sources,
              "supervised_blocks": blocks, "teacher_blocks": [kept[j] for j in blocks], "prefix_skipped": skip,
              "before": before, "after": after, "speed": speeds, "train": {"config": cfg.__dict__, "history": result["history"]},
              "seconds": {"data": t_data - t0, "targets": t_targets - t_data, "measure_before": t_before - t_targets,
                          "train": t_train - t_before, "measure_after": t_after - t_train, "speed": t_speed - t_after,
                          "total": time.perf_counter() - t0}}
    write_json(record_file, record)
    for old in work.glob("run-*"):  # finished: no checkpoint is needed any more
        shutil.rmtree(old, ignore_errors=True)
    return summary


ABLATIONS = {  # name -> (t_start, t_end, hidden_weight): what each of the seed's two techniques adds
    "kl_only": (1.0, 1.0, 0.0),
    "kl_temperature_schedule": (None, None, 0.0),
    "kl_schedule_hidden": (None, None, None),
}


def ablation(params: Params, ws: Workspace) -> dict[str, Any]:
    """The same pruned student and targets trained three ways (KL at T = 1; KL with the temperature
    schedule; schedule + hidden-state loss), each measured against the fp32 reference. Needs a finished
    `python -m tasks.distill` with the same settings (its targets and plan); the way that run trained
    (the defaults: schedule + hidden states) is read from its record, not trained again (training is
    deterministic). Writes artifacts/distill/ablation.json."""
    from costopt.distill.student import build
    from costopt.distill.teacher import Targets
    from costopt.distill.train import TrainConfig, train
    from costopt.models.source import load_model_dir
    from safetensors.torch import load_file

    record = _finished_record(params, ws)
    targets_file = ws.distill_work_dir / "targets.safetensors"
    if not targets_file.is_file():
        raise MissingArtifactError(f"{targets_file}: the distill run's targets are gone; run python -m tasks.distill "
                                   "with the same params and profile first")
    torch.set_num_threads(params.benchmark.threads)
    teacher, _ = load_model_dir(ws.model_dir)
    targets = Targets.from_tensors(load_file(str(targets_file)))
    p = params.distill
    out: dict[str, Any] = {"before": {k: record["before"][k] for k in ("kl_mean", "kl_p99", "top1_agreement")}}
    for name, (t0, t1, hw) in ABLATIONS.items():
        cfg = TrainConfig(steps=p.steps, batch=p.batch, lr=p.lr, t_start=p.t_start if t0 is None else t0,
                          t_end=p.t_end if t1 is None else t1, hidden_weight=p.hidden_weight if hw is None else hw,
                          seed=params.evaldata.seed)
        if cfg.__dict__ == record["train"]["config"]:  # the distill run itself: training is deterministic
            m, seconds, reused = record["after"], record["summary"]["train_seconds"], True
        else:
            student = build(teacher, record["plan"])
            res = train(student, targets, record["supervised_blocks"], cfg, None)
            m, seconds, reused = measure(student, params, ws), res["seconds"], False
        out[name] = {"config": cfg.__dict__, "seconds": seconds, "reused_distill_run": reused,
                     **{k: m[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "task_retention")}}
    write_json(ws.distill_dir / "ablation.json", out)
    return {k: v["kl_mean"] for k, v in out.items()}


def export_gpu(params: Params, ws: Workspace, out: Any, part_mib: float = 48.0) -> dict[str, Any]:
    """Write the bundle `python -m tasks.distill_gpu` trains from (see that module): the teacher's weights
    in bf16 parts of at most `part_mib` MiB, its config and tokenizer, this workspace's pruning plan and
    supervised blocks (from a finished distill run with these settings) and every training prompt."""
    from pathlib import Path

    from costopt.distill.teacher import training_conversations
    from costopt.distill.transfer import TransferError, pack
    from costopt.evaluation.reference import read_jsonl
    from safetensors.torch import load_file

    record = _finished_record(params, ws)
    out = Path(out)
    meta = out / "meta"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TransferError(f"--export-gpu: {out} is not empty; name a new folder")
    meta.mkdir(parents=True)
    for f in ws.model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, meta / f.name)
    e = params.evaldata
    rows = training_conversations(e.seed, e.prompts + e.calibration, read_jsonl(ws.data_dir / "prompts.jsonl"),
                                  read_jsonl(ws.data_dir / "crosscheck.jsonl"),
                                  read_jsonl(ws.data_dir / "calibration.jsonl"), _log_rows(params, ws), 10 ** 6)
    p = params.distill
    plan = {"plan": record["plan"], "supervised_blocks": record["supervised_blocks"],
            "teacher_blocks": record["teacher_blocks"], "conversations": [r["messages"] for r in rows],
            "model_fingerprint": read_json(ws.model_dir / "fingerprint.json")["fingerprint"],
            "online": {"t_start": p.t_start, "t_end": p.t_end, "hidden_weight": p.hidden_weight,
                       "seed": params.evaldata.seed}}
    write_json(meta / "plan.json", plan)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(ws.model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    files = pack(state, out, int(part_mib * 2 ** 20), prefix="teacher-part")
    return {"bundle": str(out), "teacher_parts": [f"{f.name} ({f.stat().st_size / 2 ** 20:.1f} MiB)" for f in files],
            "prompts": len(rows)}


def _finished_record(params: Params, ws: Workspace) -> dict[str, Any]:
    record_file = ws.distill_dir / "distill.json"
    if not record_file.is_file() or read_json(record_file).get("identity") != _identity(params, ws):
        raise MissingArtifactError(f"{record_file}: no distillation with these settings; run python -m tasks.distill "
                                   "with the same params and profile first")
    return read_json(record_file)


def import_student(params: Params, ws: Workspace, src: Any) -> dict[str, Any]:
    """Make the student trained by `python -m tasks.distill_gpu` (its --out folder) this workspace's
    student: checked against this workspace's plan and teacher, measured against the fp32 reference like
    the CPU-trained one, then written to artifacts/distill/student with distill.json updated (the CPU
    run's "before" kept, "after" and the summary replaced, the GPU run's record under "gpu_run"). A
    folder that does not fit is refused before anything stored changes."""
    from pathlib import Path

    from costopt.distill.student import build, param_count
    from costopt.distill.transfer import TransferError, unpack
    from costopt.models.source import load_model_dir

    src = Path(src)
    record = _finished_record(params, ws)
    try:
        gpu = json.loads((src / "record.json").read_text())
    except (OSError, ValueError) as exc:
        raise MissingArtifactError(f"--import-student: {src / 'record.json'} cannot be read ({exc})") from exc
    if gpu.get("plan") != record["plan"]:
        raise TransferError(f"--import-student: {src / 'record.json'}: its plan (kept blocks, channels) is not this "
                            "workspace's; export the bundle from this workspace and train again")
    fp = read_json(ws.model_dir / "fingerprint.json")["fingerprint"]
    if gpu.get("model_fingerprint") != fp:
        raise TransferError(f"--import-student: {src / 'record.json'}: trained from teacher {gpu.get('model_fingerprint')}, "
                            f"this workspace's is {fp}")
    try:
        state = unpack(sorted(src.glob("student-part*.safetensors")), dtype=torch.float32)
    except TransferError as exc:
        raise TransferError(f"--import-student: {exc}") from exc
    torch.set_num_threads(params.benchmark.threads)
    teacher, tok = load_model_dir(ws.model_dir)
    student = build(teacher, record["plan"])
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("model.embed_tokens.weight", "lm_head.weight")]
    if missing or unexpected:
        raise TransferError(f"--import-student: {src}: the weights do not fit the student: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
    after = measure(student, params, ws)
    out_dir = ws.distill_dir
    save_student(student, tok, out_dir, {"distilled_from": record["identity"]["model"], "trained_on": gpu["device"]})
    kl_before, kl_after = record["before"]["kl_mean"]["value"], after["kl_mean"]["value"]
    summary = {**(record.get("cpu_run") or record)["summary"], "student_params": param_count(student), "kl_mean_after": kl_after,
               "kl_reduction": kl_before / kl_after if kl_after else None, "train_seconds": gpu["train"]["seconds"],
               "trained_on": gpu["device"]}
    for key in ("student_cost_per_1m_requests_usd", "cost_ratio", "student_decode_tok_s_bs1"):
        summary.pop(key, None)  # timed for the CPU-trained weights; the speed is the same shape's, the cost is not re-run
    cpu_run = record.get("cpu_run") or {k: record.get(k) for k in ("after", "summary", "train")}  # a second import keeps the CPU run's
    record.update({"summary": summary, "after": after, "speed": None, "cpu_run": cpu_run,
                   "gpu_run": {k: gpu[k] for k in ("device", "config", "data", "train", "holdout_before",
                                                   "holdout_after", "seconds")}})
    write_json(out_dir / "distill.json", record)
    return {"kl_mean_before": kl_before, "kl_mean_after_cpu": cpu_run["summary"]["kl_mean_after"],
            "kl_mean_after": kl_after, "top1_agreement": after["top1_agreement"]["value"],
            "task_retention": after["task_retention"]["value"], "trained_on": gpu["device"]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import execute, parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ablation", action="store_true",
                   help="after a distill run with the same settings: train the student three ways (KL at T=1; "
                        "+ temperature schedule; + hidden states) and measure each (artifacts/distill/ablation.json)")
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="leave out timing the student next to the teacher (the DAG's way: its student variants "
                        "are benchmarked like every other)")
    p.add_argument("--export-gpu", metavar="DIR",
                   help="after a distill run with the same settings: write the bundle python -m tasks.distill_gpu "
                        "trains from on a GPU machine (teacher weights in bf16 parts, plan, training prompts)")
    p.add_argument("--import-student", metavar="DIR",
                   help="make the student python -m tasks.distill_gpu trained (its --out folder) this workspace's "
                        "student, measured against the fp32 reference")
    args = p.parse_args(argv)
    if sum(map(bool, (args.ablation, args.export_gpu, args.import_student))) > 1:
        p.error("--ablation, --export-gpu and --import-student: expected at most one")
    if args.ablation:
        return execute(ablation, args)
    if args.export_gpu:
        return execute(lambda params, ws: export_gpu(params, ws, args.export_gpu), args)
    if args.import_student:
        return execute(lambda params, ws: import_student(params, ws, args.import_student), args)
    return execute(lambda params, ws: distill(params, ws, speed=args.speed), args, "distill")


if __name__ == "__main__":
    raise SystemExit(main())
