"""Phase 5b, route: fit the precision router's thresholds and judge it, on held-out prompts.

Run it as `python -m tasks.route` (the DAG's `route` task, after the search). Steps:
1. tiers: `route.tiers`, or the search's pick (the reference: the cheapest variant that passed its
   gates) and the cheapest variants below it on the cost / KL-mean front, at most `route.max_tiers`
   in all, ordered by measured cost (the benchmark phase's served cost);
2. the first half of `route.prompts` held-out prompts fits each cheap tier's threshold
   (`costopt.routing.fit`): the tier's greedy answers with its token probabilities, each token judged
   by the reference teacher-forced on the same answer, and the lowest threshold whose retention (token
   agreement with the reference) has a 95% lower bound at or above the tier's share of
   `route.retention_target`; and the same on the first half of `route.task_items` labeled items for
   task accuracy (generated answers, `costopt.routing.fit.fit_task_threshold`): the higher of the two
   thresholds is kept;
3. the other halves judge the router itself: the real router (`costopt.routing.router`) over the
   tiers' own engines, many requests at once (`costopt.routing.local`); per request, which tiers
   answered, the escalations, and the routed answer's agreement with and KL to the reference
   (teacher-forced, each token under the tier that generated it), against the reference answering
   alone; the cost per 1M requests with routing on (each tier's served cost per token, times the
   tokens it generated, dropped ones included; an escalation's prefill is not counted) and off; and
   the routed task accuracy on the labeled items the fit did not see, against the reference alone;
4. writes artifacts/route/router.json (what the gateway loads) and artifacts/route/route.json (the
   tiers, the fits with their curves, the judgement).
Skipped (a record saying why) when route.enabled is false or no variant passed its gates; a router
with only the reference tier (everything to the best passing tier) when no cheaper tier is usable.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from costopt.params import Params, ParamsError
from costopt.storage.layout import Workspace, read_json, write_json

FORMAT = 3  # 2: the judge's task accuracy on the labeled set; 3: thresholds fitted on task accuracy too
TASK_TOKENS = 8  # new tokens per labeled item: every answer of the labeled set is a word or a number


class RouteError(ParamsError):
    """A tier list that cannot be routed (the message names the field)."""


def _cost(ws: Workspace, name: str) -> float | None:
    path = ws.bench_file(name)
    return read_json(path).get("cost_per_1m_requests_usd") if path.is_file() else None


def choose_tiers(params: Params, ws: Workspace) -> tuple[list[dict[str, Any]], str | None]:
    """([{"name", "cost_per_1m_requests_usd", "kl_mean"}] cheapest first, the reference last; or [] and why)."""
    from costopt.models.variants import read_failure

    search = read_json(ws.search_dir / "search.json")
    quality = read_json(ws.search_dir / "quality.json").get("variants", {})
    picked = search.get("picked")
    if not picked:
        return [], "no variant passed its gates: there is no reference tier to route up to"

    def row(name: str) -> dict[str, Any] | None:
        cost = _cost(ws, name)
        kl = ((quality.get(name) or {}).get("kl_mean") or {}).get("value")
        if cost is None or read_failure(ws, name) or not (ws.variant_dir(name) / "spec.json").is_file():
            return None
        return {"name": name, "cost_per_1m_requests_usd": float(cost), "kl_mean": kl}

    if params.route.tiers:
        rows = []
        for i, name in enumerate(params.route.tiers):
            r = row(name)
            if r is None:
                raise RouteError(f"route.tiers[{i}]: {name!r} was not built and benchmarked in this run; expected "
                                 f"variants of quantize.variants that were")
            rows.append(r)
        costs = [r["cost_per_1m_requests_usd"] for r in rows]
        if costs != sorted(costs):
            raise RouteError(f"route.tiers: expected cheapest first by measured cost, got "
                             f"{[(r['name'], r['cost_per_1m_requests_usd']) for r in rows]}")
        return rows, None
    ref = row(picked)
    if ref is None:
        return [], f"the pick {picked!r} has no benchmark record"
    from costopt.search.frontier import pareto_front

    cheaper = {n: r for n in dict.fromkeys(params.quantize.variants) if n != picked
               for r in [row(n)] if r is not None and r["kl_mean"] is not None
               and r["cost_per_1m_requests_usd"] < ref["cost_per_1m_requests_usd"]}
    front = pareto_front([(n, r["cost_per_1m_requests_usd"], r["kl_mean"]) for n, r in cheaper.items()])
    return [*[cheaper[n] for n in front[: params.route.max_tiers - 1]], ref], None


def _prompts(params: Params, ws: Workspace, tok: Any) -> list[list[int]]:
    from costopt.evaluation.reference import read_jsonl

    rows = read_jsonl(ws.data_dir / "prompts.jsonl")[: params.route.prompts]
    if len(rows) < 4:
        raise RouteError(f"route.prompts: {len(rows)} held-out prompts available; expected at least 4 "
                         f"(evaldata.prompts)")
    out = []
    for r in rows:
        ids = tok.apply_chat_template(list(r["messages"]), add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _engine(ws: Workspace, name: str, eos: list[int], max_batch: int, max_len: int, threads: int) -> Any:
    from costopt.models.variants import read_spec
    from costopt.runtimes.registry import spec_runtime

    spec = read_spec(ws, name)
    runtime, _ = spec_runtime(spec)
    return runtime.engine(ws, spec, eos_token_ids=eos, max_batch=max_batch, max_len=max_len, threads=threads)


def _generate(engine: Any, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """Greedy answers (tokens, each token's probability), the engine kept full."""
    from costopt.routing.local import LocalTiers, pumped
    from costopt.routing.router import Finish

    tiers = LocalTiers({"t": engine})

    async def one(ids: list[int]) -> tuple[list[int], list[float]]:
        toks, probs = [], []
        async for ev in tiers.generate("t", ids, max_new):
            if isinstance(ev, Finish):
                break
            toks.append(ev.id)
            probs.append(ev.prob)
        return toks, probs

    return asyncio.run(pumped(tiers, [lambda ids=p: one(ids) for p in prompts], engine.max_batch))


def _teacher_forced(scorer: Any, prompts: list[list[int]], answers: list[list[int]], batch: int = 8) -> list[Any]:
    """The scorer's log-probs [len(answer), vocab] at each answer position, prompt + answer teacher-forced."""
    import torch

    out: list[Any] = []
    for b in range(0, len(prompts), batch):
        seqs = [p + a for p, a in zip(prompts[b:b + batch], answers[b:b + batch])]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.no_grad():
            logits = scorer(input_ids=ids, attention_mask=mask).logits.float()
        for i, (p, a) in enumerate(zip(prompts[b:b + batch], answers[b:b + batch])):
            # the logits at position t predict token t + 1: the answer's tokens from len(p) - 1 on
            out.append(torch.log_softmax(logits[i, len(p) - 1: len(p) - 1 + len(a)], dim=-1))
    return out


def _agreement(ref_lp: Any, answer: list[int]) -> list[bool]:
    """Whether the reference's argmax at each answer position is the answer's token."""
    import torch

    return (ref_lp.argmax(-1) == torch.tensor(answer, dtype=torch.long)).tolist() if answer else []


def _task_prompts(items: list[dict[str, Any]], tok: Any) -> list[list[int]]:
    """Each labeled item's context as a completion prompt (tokenized as the validate phase scores it)."""
    return [list(tok(it["context"], add_special_tokens=True)["input_ids"]) for it in items]


def _task_samples(engine: Any, ref_right: list[bool], items: list[dict[str, Any]], prompts: list[list[int]],
                  tok: Any) -> list[Any]:
    """One cheap tier's `TaskSample` per labeled item: its greedy answer's probabilities, how many of its
    tokens settle the verdict, and both verdicts."""
    from costopt.evaluation.taskscore import generated_correct
    from costopt.routing.fit import TaskSample, judged_tokens

    out = []
    for (toks, probs), it, ref_ok in zip(_generate(engine, prompts, TASK_TOKENS), items, ref_right):
        texts = [tok.decode(toks[:k]) for k in range(1, len(toks) + 1)]
        out.append(TaskSample(probs, judged_tokens(texts, it["choices"][it["answer"]]),
                              generated_correct(tok.decode(toks), it), ref_ok))
    return out


def fit(params: Params, ws: Workspace, tiers: list[dict[str, Any]], prompts: list[list[int]], engines: dict[str, Any],
        ref_scorer: Any, max_new: int, items: list[dict[str, Any]] | None = None, tok: Any = None
        ) -> list[dict[str, Any]]:
    """Each cheap tier's threshold, fitted on `prompts` (module docstring, step 2): the lowest meeting the
    retention target on token agreement and, with labeled `items`, on task accuracy too (the higher of
    the two, since a threshold met on one can lose the other: a confident wrong first word keeps the
    answer's tokens mostly right but the answer wrong)."""
    from costopt.evaluation.taskscore import generated_correct
    from costopt.routing.fit import (MIN_TOKEN_SHARE, TierSample, fit_task_threshold, fit_threshold, retention,
                                     tier_targets)

    ref = tiers[-1]["name"]
    ref_len = [len(t) for t, _ in _generate(engines[ref], prompts, max_new)]
    target = tier_targets(params.route.retention_target, len(tiers) - 1)
    task_prompts = _task_prompts(items, tok) if items else []
    ref_right = [generated_correct(tok.decode(t), it)
                 for (t, _), it in zip(_generate(engines[ref], task_prompts, TASK_TOKENS), items)] if items else []
    fits = []
    for tier in tiers[:-1]:
        answers = _generate(engines[tier["name"]], prompts, max_new)
        lps = _teacher_forced(ref_scorer, prompts, [a for a, _ in answers])
        samples = [TierSample(probs, _agreement(lp, toks), n) for (toks, probs), lp, n in zip(answers, lps, ref_len)]
        row = {"tier": tier["name"], **fit_threshold(samples, target, params.route.bootstrap)}
        if task_prompts and not any(ref_right):
            row["tasks"] = {"items": len(items), "skipped": "the reference answers none of the fit items right: "
                                                              "task retention is undefined there"}
        elif task_prompts:
            task = fit_task_threshold(_task_samples(engines[tier["name"]], ref_right, items, task_prompts, tok),
                                      target, params.route.bootstrap)
            row["tasks"] = {**task, "items": len(items)}
            if task["threshold"] > row["threshold"]:  # the task fit decides: the token figures at its threshold
                est, stay, tokens = retention(samples, task["threshold"], params.route.bootstrap)
                row.update({"threshold": task["threshold"], "retention": est.to_dict(), "stay": stay,
                            "token_share": tokens, "useful": tokens >= MIN_TOKEN_SHARE, "decided_by": "tasks"})
        fits.append(row)
    return fits


def judge(params: Params, config: Any, prompts: list[list[int]], engines: dict[str, Any], scorers: dict[str, Any],
          max_new: int) -> dict[str, Any]:
    """The router on `prompts` against the reference alone (module docstring, step 3)."""
    from tqdm import tqdm

    from costopt.evaluation.metrics import Estimate, bootstrap_ci, ratio_of_sums
    from costopt.routing.local import LocalTiers, route_all

    ref = config.reference.name
    local = LocalTiers({t.name: engines[t.name] for t in config.tiers})  # a dropped tier is not asked
    with tqdm(total=len(prompts), desc="route (held-out)", unit="req") as bar:
        results = asyncio.run(route_all(config, prompts, max_new, local, concurrency=16, progress=bar))
    alone = _generate(engines[ref], prompts, max_new)
    answers = [r.token_ids for r in results]
    ref_lp = _teacher_forced(scorers[ref], prompts, answers)
    agree = np.array([sum(_agreement(lp, a)) for lp, a in zip(ref_lp, answers)], dtype=float)
    length = np.array([max(len(a), 1) for a in answers], dtype=float)
    kl = np.zeros(len(answers))
    owners = [_owners(r, config.tiers[0].name) for r in results]
    for t in config.tiers[:-1]:  # each token's KL(reference || the tier that generated it)
        if not any(t.name in o for o in owners):
            continue
        lps = _teacher_forced(scorers[t.name], prompts, answers)
        for i, (lp, r_lp, o) in enumerate(zip(lps, ref_lp, owners)):
            pos = [j for j, name in enumerate(o) if name == t.name]
            if pos:
                p = r_lp[pos].exp()
                kl[i] += float((p * (r_lp[pos] - lp[pos])).sum())
    n = len(results)
    boot = params.route.bootstrap
    ret_lo, ret_hi = bootstrap_ci(lambda i: ratio_of_sums(agree[i], length[i]), n, boot)
    kl_lo, kl_hi = bootstrap_ci(lambda i: ratio_of_sums(kl[i], length[i]), n, boot, seed=1)
    cheaper = np.array([r.finished_on != ref for r in results], dtype=float)
    ch_lo, ch_hi = bootstrap_ci(lambda i: float(cheaper[i].mean()), n, boot, seed=2)
    exact = np.array([a == b for a, (b, _) in zip(answers, alone)], dtype=float)
    per_token = {t.name: t.cost_per_1m_requests_usd / max(1.0, float(np.mean([len(b) for b, _ in alone])))
                 for t in config.tiers}  # USD per 1M requests, per answer token
    routed_cost = float(sum(per_token[t.name] * local.tokens.get(t.name, 0) for t in config.tiers)) / n
    return {
        "requests": n,
        "finished_on": {t.name: int(sum(r.finished_on == t.name for r in results)) for t in config.tiers},
        "finished_cheaper": Estimate(float(cheaper.mean()), ch_lo, ch_hi).to_dict(),
        "escalation_rate": float(np.mean([bool(r.escalations) for r in results])),
        "escalations": int(sum(len(r.escalations) for r in results)),
        "skipped": int(sum(len(r.skipped) for r in results)),
        "retention": Estimate(ratio_of_sums(agree, length), ret_lo, ret_hi).to_dict(),
        "kl_mean": Estimate(ratio_of_sums(kl, length), kl_lo, kl_hi).to_dict(),
        "same_answer_as_reference": float(exact.mean()),
        "tokens_per_tier": dict(local.tokens),
        "cost_per_1m_requests_usd": {"routed": round(routed_cost, 4),
                                     "reference_alone": config.reference.cost_per_1m_requests_usd,
                                     "note": "modelled: each tier's served cost per answer token times the tokens "
                                             "it generated (dropped ones included); an escalation's prefill is not "
                                             "counted"},
    }


def judge_tasks(params: Params, config: Any, items: list[dict[str, Any]], tok: Any, engines: dict[str, Any],
                max_new: int = TASK_TOKENS) -> dict[str, Any]:
    """Task accuracy of routed answers on the labeled set against the reference tier alone: each item's
    context as a completion prompt, the answer generated greedily (the router's tiers and escalations as
    for chat prompts) and right when it starts with the item's answer (`generated_correct`); retention is
    routed accuracy over the reference's, with a paired bootstrap interval over items."""
    from tqdm import tqdm

    from costopt.evaluation.metrics import Estimate, bootstrap_ci, ratio_of_sums
    from costopt.evaluation.taskscore import generated_correct
    from costopt.routing.local import LocalTiers, route_all

    ref = config.reference.name
    prompts = _task_prompts(items, tok)
    local = LocalTiers({t.name: engines[t.name] for t in config.tiers})
    with tqdm(total=len(prompts), desc="route (labeled set)", unit="item") as bar:
        results = asyncio.run(route_all(config, prompts, max_new, local, concurrency=16, progress=bar))
    alone = _generate(engines[ref], prompts, max_new)
    routed = np.array([generated_correct(tok.decode(r.token_ids), it) for r, it in zip(results, items)], dtype=float)
    base = np.array([generated_correct(tok.decode(a), it) for (a, _), it in zip(alone, items)], dtype=float)
    n, boot = len(items), params.route.bootstrap
    lo, hi = bootstrap_ci(lambda i: ratio_of_sums(routed[i], base[i]), n, boot, seed=3)
    acc_lo, acc_hi = bootstrap_ci(lambda i: float(routed[i].mean()), n, boot, seed=4)
    ref_lo, ref_hi = bootstrap_ci(lambda i: float(base[i].mean()), n, boot, seed=5)
    cheaper = float(np.mean([r.finished_on != ref for r in results]))
    return {"items": n, "max_tokens": max_new,
            "accuracy_routed": Estimate(float(routed.mean()), acc_lo, acc_hi).to_dict(),
            "accuracy_reference": Estimate(float(base.mean()), ref_lo, ref_hi).to_dict(),
            "retention": Estimate(ratio_of_sums(routed, base), lo, hi).to_dict() if base.sum() else None,
            "same_verdict": float((routed == base).mean()), "finished_cheaper": cheaper,
            "note": "generated answers (greedy, the first word judged), not the validate phase's "
                    "log-likelihood ranking of the choices"}


def _owners(result: Any, first: str) -> list[str]:
    """The tier that generated each token of a routed answer (escalations and skips hand over at "at")."""
    out: list[str] = []
    events = sorted([(e["at"], e["to"]) for e in [*result.escalations, *result.skipped]], key=lambda c: c[0])
    tier, k = first, 0
    for j in range(len(result.token_ids)):
        while k < len(events) and events[k][0] <= j:
            tier = events[k][1]
            k += 1
        out.append(tier)
    return out


def route(params: Params, ws: Workspace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from costopt.routing.router import RouterConfig, Tier
    from costopt.runtimes.registry import load_scorer
    import torch

    cfg, out = params.route, ws.root / "artifacts" / "route"
    if not cfg.enabled:
        write_json(out / "route.json", {"enabled": False, "reason": "route.enabled is false"})
        (out / "router.json").unlink(missing_ok=True)
        return {"enabled": False}
    tiers, why = choose_tiers(params, ws)
    if not tiers:
        write_json(out / "route.json", {"enabled": False, "reason": why})
        (out / "router.json").unlink(missing_ok=True)
        return {"enabled": False, "reason": why}
    torch.set_num_threads(params.benchmark.threads)
    tok = AutoTokenizer.from_pretrained(str(ws.model_dir), local_files_only=True)
    prompts = _prompts(params, ws, tok)
    half = len(prompts) // 2
    max_new = params.evaldata.reference_tokens
    eos = tok.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    max_len = max(map(len, prompts)) + 2 * max_new + 8
    engines = {t["name"]: _engine(ws, t["name"], eos_ids, 16, max_len, params.benchmark.threads) for t in tiers}
    scorers = {t["name"]: load_scorer(ws, t["name"])[0] for t in tiers}
    record: dict[str, Any] = {"format": FORMAT, "tiers": tiers, "retention_target": cfg.retention_target,
                              "fit_prompts": half, "judge_prompts": len(prompts) - half, "max_tokens": max_new}
    from costopt.evaluation.reference import read_jsonl

    items = read_jsonl(ws.data_dir / "tasks.jsonl")[: cfg.task_items] if cfg.task_items else []
    fit_items, judge_items = items[: len(items) // 2], items[len(items) // 2:]
    record.update({"fit_items": len(fit_items), "judge_items": len(judge_items)})
    if len(tiers) == 1:
        config = RouterConfig.reference_only(cfg.model, tiers[0]["name"])
        record["note"] = "no variant below the reference on the cost/KL front: everything on the reference"
    else:
        fits = fit(params, ws, tiers, prompts[:half], engines, scorers[tiers[-1]["name"]], max_new, fit_items, tok)
        record["fits"] = fits
        kept = [(t, f) for t, f in zip(tiers[:-1], fits) if f["useful"]]
        record["dropped"] = [f["tier"] for f in fits if not f["useful"]]  # would generate too few tokens to pay
        config = RouterConfig(cfg.model, tuple(
            [Tier(t["name"], t["cost_per_1m_requests_usd"], f["threshold"]) for t, f in kept]
            + [Tier(tiers[-1]["name"], tiers[-1]["cost_per_1m_requests_usd"], None)]),
            {"retention_target": cfg.retention_target, "fit_prompts": half})
    record["router"] = config.to_dict()
    record["judge"] = judge(params, config, prompts[half:], engines, scorers, max_new)
    if judge_items:
        record["judge"]["tasks"] = judge_tasks(params, config, judge_items, tok, engines)
    write_json(out / "route.json", record)
    write_json(out / "router.json", config.to_dict())
    j = record["judge"]
    return {"tiers": [t.name for t in config.tiers], "thresholds": [t.threshold for t in config.tiers],
            "finished_cheaper": j["finished_cheaper"]["value"], "retention": j["retention"],
            "cost": j["cost_per_1m_requests_usd"]}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import execute, parser

    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    return execute(route, args)


if __name__ == "__main__":
    raise SystemExit(main())
