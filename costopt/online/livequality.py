"""Quality drift: the validate phase's prompt gates, measured again on a sample of live traffic.

The prompt drift test (`costopt.online.drift`) asks whether users now ask different things; this one
asks whether the variant in service still answers what they ask like the fp32 model does. A seeded
sample of the window's logged prompts gets the fp32 model's greedy answer (as the held-out prompts got
theirs in evaldata); the served variant, on its own runtime (llama.cpp's logits for a GGUF variant),
is teacher-forced over prompt + answer, and KL mean, KL p99 and top-1 agreement are measured at every
position past the shared chat-template prefix by the validate phase's own code
(`costopt.evaluation.quality.compare_prompts` against `Ref.logits`), each with its 95% bootstrap CI.

Verdict (`judge`):
- "drift" when a prompt gate fails for sure on live traffic (the whole 95% CI on the failing side of
  `validate.gates`), or when the live KL mean is significantly worse than the variant's validated one
  (the live 95% CI's lower end above the validated CI's upper end: two 95% intervals apart, a test at
  well under the 5% level);
- "no drift" otherwise; "undecided", with the reason, when nothing can be measured (too few logged
  prompts, no fp32 reference, the variant not built in this workspace, or fp32 itself in service).

Why in the DAG rather than in the predictor's shadow route (`POST /v2/compare`, the canary's judge):
the predictor holds fp32 only when it serves it, and this check needs the fp32 answers the gates
are defined on; the DAG process loads fp32 anyway for the reference, and a sample of 32 prompts is a
minute of CPU a day, off the serving path.

    prompts = live_prompt_set(fp32_model, ref, sample_conversations(records, 32), answer_tokens=48)
    decision, reasons = judge(measure_live(variant_model, ref, prompts, 1000), validated_metrics, gates)
"""
from __future__ import annotations

import json
import random
from typing import Any, Sequence

from costopt.evaluation.sequential import PROMPT_METRICS, failed_for_sure

ROLES = ("system", "user", "assistant")


def conversation(rec: dict[str, Any]) -> list[dict[str, str]] | None:
    """The chat a logged request asked (a completion's prompt as one user turn); None when it has none or
    its turns are not {role, content} strings (the log is production data: never trusted)."""
    if isinstance(rec.get("messages"), list):
        turns = rec["messages"]
        if turns and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                         for m in turns) and any(m["content"].strip() for m in turns):
            return [{"role": m["role"], "content": m["content"]} for m in turns]
        return None
    if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
        return [{"role": "user", "content": rec["prompt"]}]
    return None


def distinct_conversations(records: Sequence[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The window's logged conversations, each once, in log order."""
    seen: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        conv = conversation(rec)
        if conv is not None:
            seen.setdefault(json.dumps(conv, sort_keys=True), conv)
    return list(seen.values())


def sample(convs: list[list[dict[str, str]]], n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Up to `n` of `convs`, a seeded sample (the same log gives the same sample, so a re-run measures the
    same prompts)."""
    return random.Random(seed).sample(convs, n) if len(convs) > n else list(convs)


def sample_conversations(records: Sequence[dict[str, Any]], n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Up to `n` distinct logged conversations, a seeded sample of the window."""
    return sample(distinct_conversations(records), n, seed)


def live_prompt_set(fp32: Any, ref: Any, conversations: Sequence[Sequence[dict]], answer_tokens: int) -> Any:
    """The live prompts as the reference stores its held-out set (`PromptSet`): each conversation followed
    by fp32's greedy answer, and fp32's final hidden state at every position past the shared prefix
    (`ref` gives the tokenizer and the sequence cap). Computed once, measured against any variant."""
    from costopt.evaluation.reference import PromptSet, final_hidden, prompt_texts
    from costopt.runtimes.engine import greedy_answers

    if not conversations:
        raise ValueError("live_prompt_set: no conversations to measure")
    # eager: for a few dozen prompts compiling the step costs more than it saves (its tokens are equal)
    answers = greedy_answers(fp32, ref.tok, conversations, answer_tokens, compile=False, desc="live fp32 answers")
    texts = prompt_texts(ref.tok, [{"messages": list(c), "reference": a} for c, a in zip(conversations, answers)])
    hidden, skip = final_hidden(fp32, ref.tok, texts, ref.max_len, "live fp32 reference")
    return PromptSet("live", texts, skip, hidden)


def measure_live(model: Any, ref: Any, prompts: Any, resamples: int) -> dict[str, Any]:
    """KL mean, KL p99 and top-1 agreement of `model` against fp32 on the live `prompts`
    (`live_prompt_set`), as {metric: {"value", "ci95"}}, measured by the validate phase's code, and each
    prompt's mean KL (`per_prompt_kl`)."""
    from costopt.evaluation.quality import Tally, compare_prompts, prompt_estimates

    tally = Tally()
    compare_prompts(model, ref, tally, prompts=prompts)
    out = {k: v.to_dict() for k, v in prompt_estimates(tally, resamples).items()}
    out["prompts"], out["positions"] = len(prompts.texts), int(prompts.hidden.shape[0])
    # each prompt's mean KL (None where no position was measured): the units a paired A/B guard compares
    out["per_prompt_kl"] = [round(k / n, 8) if n else None for k, n in zip(tally.kl_sum, tally.count)]
    return out


def judge(live: dict[str, Any], validated: dict[str, Any] | None, gates: Any) -> tuple[str, list[str]]:
    """("drift" | "no drift", the reasons) from live metrics and the variant's validated ones (None when the
    quality file is missing: only the gates judge)."""
    reasons = []
    for metric in PROMPT_METRICS:
        lo, hi = live[metric]["ci95"]
        if failed_for_sure(metric, lo, hi, gates):
            reasons.append(f"{metric} fails its gate on live traffic: 95% CI [{lo:.4g}, {hi:.4g}] lies wholly on "
                           f"the failing side of validate.gates")
    before = ((validated or {}).get("kl_mean") or {}).get("ci95")
    if before and before[1] is not None:
        lo, hi = live["kl_mean"]["ci95"]
        if lo > before[1]:
            reasons.append(f"kl_mean is worse on live traffic than when validated: 95% CI [{lo:.4g}, {hi:.4g}] "
                           f"against [{before[0]:.4g}, {before[1]:.4g}]")
    return ("drift" if reasons else "no drift"), reasons
