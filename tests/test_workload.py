"""The serving request trace: determinism, shares, repeat/paraphrase links, fingerprint and file checks."""
from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter

import pytest

from costopt.evaluation.evaldata import prompt_pool
from costopt.workload.trace import (DEADLINE_MS, KIND_SHARES, PRIORITY_SHARES, TRACE_NAME, TRACE_VERSION, TraceError,
                              build_trace, paraphrase, read_trace, trace_fingerprint, trace_meta, write_trace)

N = 2000  # large enough that shares sit within a few points of their targets


@pytest.fixture(scope="module")
def trace():
    return build_trace(N, seed=1234)


def _quoted(text: str) -> list[str]:
    return re.findall(r'"[^"]*"', text)


def test_same_seed_same_trace_other_seed_other_trace(trace):
    again = build_trace(N, seed=1234)
    assert again == trace and trace_fingerprint(again) == trace_fingerprint(trace), "seed 1234 built two traces"
    other = build_trace(N, seed=99)
    same = sum(a.prompt == b.prompt for a, b in zip(trace, other))
    assert trace_fingerprint(other) != trace_fingerprint(trace) and same < N // 10, \
        f"seeds 1234 and 99 share {same} of {N} prompts"


def test_a_shorter_trace_is_a_prefix_of_a_longer_one(trace):
    assert build_trace(300, seed=1234) == trace[:300], "build_trace(300) is not the first 300 of build_trace(2000)"
    assert build_trace(0, seed=1) == [], "an empty trace"
    with pytest.raises(ValueError, match="n must be"):
        build_trace(-1, seed=1)


@pytest.mark.parametrize("field, shares, tol", [("kind", KIND_SHARES, 0.03), ("priority", PRIORITY_SHARES, 0.03)])
def test_shares_match_their_targets(trace, field, shares, tol):
    counts = Counter(getattr(it, field) for it in trace)
    got = {k: counts[k] / N for k in shares}
    assert all(abs(got[k] - shares[k]) <= tol for k in shares), f"{field} shares {got}, targets {shares} ± {tol}"
    assert set(counts) == set(shares), f"unexpected {field} values: {set(counts) - set(shares)}"


def test_request_fields_are_mixed_and_consistent(trace):
    tokens = Counter(it.max_tokens for it in trace)
    assert min(tokens) >= 8 and max(tokens) <= 96 and {8, 48, 96} <= set(tokens), f"max_tokens spread: {tokens}"
    assert all(it.deadline_ms == DEADLINE_MS[it.priority] for it in trace), "deadline_ms differs from DEADLINE_MS"
    assert len({it.tenant for it in trace}) >= 3, f"tenants: {Counter(it.tenant for it in trace)}"
    systems = sum(it.messages[0]["role"] == "system" for it in trace)
    long_prompts = sum(len(it.prompt.split()) >= 60 for it in trace)
    assert N * 0.1 < systems < N * 0.4 and long_prompts > N * 0.05, \
        f"{systems} system messages, {long_prompts} long prompts"
    assert all(it.messages[-1]["role"] == "user" for it in trace), "every request ends with the user message"
    fresh = [it.prompt for it in trace if it.kind == "fresh"]
    assert len(set(fresh)) == len(fresh), f"{len(fresh) - len(set(fresh))} fresh prompts repeat an earlier one"
    pool = {text for _, text in prompt_pool(1234)}
    assert sum(p in pool for p in fresh) > len(fresh) // 2, "most fresh prompts come from costopt.evaluation.evaldata's pool"


def test_arrivals_are_poisson_at_one_request_per_second(trace):
    offsets = [it.offset_s for it in trace]
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and min(gaps) >= 0, "offsets start at 0 and never go back"
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert abs(mean - 1.0) < 0.08 and abs(cv - 1.0) < 0.1, f"gap mean {mean:.3f} s, CV {cv:.3f} (exponential: 1, 1)"


def test_repeats_equal_their_earlier_fresh_source(trace):
    by_id = {it.id: (i, it) for i, it in enumerate(trace)}
    for i, it in enumerate(trace):
        if it.kind == "repeat":
            j, src = by_id[it.source_id]
            assert j < i and src.kind == "fresh", f"{it.id}: source {it.source_id} is not an earlier fresh request"
            assert (it.messages, it.max_tokens) == (src.messages, src.max_tokens), f"{it.id} differs from {src.id}"
        elif it.kind == "fresh":
            assert it.source_id is None, f"{it.id}: a fresh request names a source"


def test_paraphrases_reword_their_source_and_keep_its_meaning_markers(trace):
    by_id = {it.id: (i, it) for i, it in enumerate(trace)}
    seen: set[str] = set()
    for i, it in enumerate(trace):
        if it.kind == "paraphrase":
            j, src = by_id[it.source_id]
            assert j < i and src.kind == "fresh", f"{it.id}: source {it.source_id} is not an earlier fresh request"
            assert it.prompt not in seen, f"{it.id}: the paraphrase {it.prompt!r} is an earlier prompt"
            assert _quoted(it.prompt) == _quoted(src.prompt), f"{it.id}: quoted text changed: {it.prompt!r}"
            assert set(re.findall(r"\d+", src.prompt)) <= set(re.findall(r"\d+", it.prompt)), \
                f"{it.id}: numbers lost: {src.prompt!r} -> {it.prompt!r}"
            assert (it.messages[:-1], it.max_tokens) == (src.messages[:-1], src.max_tokens), \
                f"{it.id}: system message or max_tokens differ from {src.id}"
        seen.add(it.prompt)


def test_paraphrase_rules_each_fire_and_keep_quotes():
    rng = random.Random(0)
    cases = {"Explain clouds in simple terms.": ("In simple terms", "plain language", "everyday words"),
             'Fix the grammar in this sentence: "we goes to the park"': ('"we goes to the park"\n',),
             "What is gravity? Answer in two sentences.": ("Answer in two sentences: what is gravity?",),
             "Give three tips for saving money.": ("For saving money, give three tips.", "Share", "Offer"),
             "List five cheap dinner recipes.": ("Could you list", "Please list", "Name five", "Give me five"),
             # "five" is a synonym-table word both outside and inside the quotes: only the outside one may change
             'Summarize in five words: "five friends went to the lake"': ("Sum up in five words",
                                                                          "Summarize in 5 words")}
    for text, markers in cases.items():
        outs = {paraphrase(text, rng) for _ in range(40)}
        assert text not in outs, f"{text!r} was returned unchanged"
        assert all(_quoted(o) == _quoted(text) for o in outs), f"quotes changed: {outs}"
        missing = [m for m in markers if not any(m in o for o in outs)]
        assert not missing, f"{text!r}: no paraphrase in 40 shows {missing}; got {sorted(outs)}"


def test_fingerprint_is_stable_and_changes_on_any_edit(trace):
    fp = trace_fingerprint(trace[:50])
    assert re.fullmatch(r"[0-9a-f]{64}", fp) and fp == trace_fingerprint(build_trace(50, seed=1234)), "unstable"
    edited = [dataclasses.replace(trace[0], max_tokens=trace[0].max_tokens + 1)] + trace[1:50]
    assert trace_fingerprint(edited) != fp, "changing one max_tokens kept the fingerprint"
    want = {"name": TRACE_NAME, "version": TRACE_VERSION, "requests": 50, "fingerprint": fp}
    assert trace_meta(trace[:50]) == want, \
        f"trace_meta: {trace_meta(trace[:50])}"


def test_write_read_round_trip(trace, tmp_path):
    path = write_trace(tmp_path / "t.jsonl", trace[:40], seed=1234)
    header = json.loads(path.read_text().splitlines()[0])
    assert header == {"trace": TRACE_NAME, "version": TRACE_VERSION, "seed": 1234, "requests": 40,
                      "fingerprint": trace_fingerprint(trace[:40])}, f"header: {header}"
    assert read_trace(path) == trace[:40], "read_trace(write_trace(items)) != items"


def _rewrite(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize("tamper, message", [
    (lambda ls: [ls[0], ls[1].replace('"max_tokens":', '"max_tokens":1', 1)] + ls[2:], "fingerprint mismatch"),
    (lambda ls: [ls[0].replace(f'"version":{TRACE_VERSION}', '"version":0')] + ls[1:], "trace version 0"),
    (lambda ls: ls[:-1], "header says 10 requests"),
    (lambda ls: ls[:3] + ["{not json"] + ls[3:], ":4: not valid JSON"),
    (lambda ls: ls[1:], "not a serving-v1 trace"),
])
def test_read_trace_rejects_tampered_files_naming_them(trace, tmp_path, tamper, message):
    path = write_trace(tmp_path / "t.jsonl", trace[:10], seed=1)
    _rewrite(path, tamper)
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    assert str(path) in str(exc.value) and message in str(exc.value), f"error: {exc.value}"
