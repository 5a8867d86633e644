"""The semantic cache's hit decision: verification rules, exact bounds, calibration with a known answer,
the labeled pair set, and the calibrated rule on the real embedder (held split: false-hit bound <= 1%)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from costopt.cache.calibrate import (Scored, Setting, clopper_pearson, fit, rates, score,
                                     upper_bound)
from costopt.cache.pairs import NEAR_MISS_KINDS, SAME_KINDS, Pair, labeled_pairs, slot_names, split_pairs, templates
from costopt.cache.verify import verify


def same_sim(a: str, b: str) -> float:
    """A fake phrase similarity: 0.9 for the synonym pairs listed, 0.3 otherwise."""
    close = {frozenset(p) for p in (("simple terms", "plain language"), ("big", "large"))}
    return 0.9 if frozenset((a.lower(), b.lower())) in close else 0.3


@pytest.mark.parametrize("a,b,why", [
    ("What is 17 times 3?", "What is 17 times 4?", "numbers"),
    ("What is 17 minus 3?", "What is 3 minus 17?", "numbers"),
    ("Is coffee good for you?", "Is coffee not good for you?", "hard words"),
    ("Is coffee good for you?", "Isn't coffee good for you?", "hard words"),
    ("Is coffee good for you?", "Is coffee bad for you?", "content differs"),
    ("Is a salad healthy?", "Is a salad unhealthy?", "negated word"),
    ("What is the capital of France?", "What is the capital of Spain?", "numbers or names"),
    ("what is the capital of france", "what is the capital of spain", "content differs"),
    ("How long is the flight from Paris to Rome?", "How long is the flight from Rome to Paris?", "numbers or names"),
    ("Convert 5 miles to kilometers.", "Convert 5 kilometers to miles.", "numbers or names"),
    ("Is Norway north of Spain?", "Is Norway south of Spain?", "hard words"),
    ("Do all birds migrate?", "Do some birds migrate?", "hard words"),
    ("What happened in March 1990?", "What happened in April 1990?", "numbers or names"),
    ("Why do owls hunt at night?", "When do owls hunt at night?", "hard words"),
    ("Explain photosynthesis.", "Explain photosynthesis to a child.", "one side only"),
])
def test_near_misses_are_refused_with_a_reason(a, b, why):
    v = verify(a, b, same_sim, min_phrase_sim=0.8)
    assert not v.ok and why in v.reason, f"{a!r} / {b!r} must be refused for {why}: {v}"


@pytest.mark.parametrize("a,b", [
    ("Explain photosynthesis in simple terms.", "Could you explain photosynthesis in plain language?"),
    ("What is two plus three?", "What's 2 + 3?"),
    ("Add 26 and 47.", "What is 26 plus 47?"),
    ("Write a short poem about the sea.", "Compose a brief poem about the sea"),
    ("Who wrote Moby Dick?", "who wrote moby dick"),
    ("WHO WROTE MOBY DICK?", "Who wrote Moby Dick?"),
    ("Which language is spoken in Peru?", "Which langauge is spoken in Peru?"),
    ("Is a big dog expensive to keep?", "Is a large dog expensive to keep?"),
    ("How do I stop my swimming goggles fogging?", "How do I stop my swimming goggles from fogging?"),
])
def test_same_answer_pairs_agree(a, b):
    v = verify(a, b, same_sim, min_phrase_sim=0.8)
    assert v.ok, f"{a!r} / {b!r} should be served from cache: {v}"


def test_without_a_phrase_scorer_any_content_difference_is_refused():
    assert not verify("Is a big dog loud?", "Is a large dog loud?", None).ok
    assert verify("Is a big dog loud?", "is a big dog loud", None).ok


def test_clopper_pearson_matches_closed_forms():
    for n in (10, 300, 1000):
        assert upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9), f"0 of {n}"
        lo, hi = clopper_pearson(0, n)
        assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
        lo, hi = clopper_pearson(n, n)
        assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / n), rel=1e-9)
    assert upper_bound(0, 298) > 0.01 >= upper_bound(0, 299), "299 clean trials prove <= 1% at 95%"


def _synthetic(neg_cos: float, n_neg: int = 400) -> list[Scored]:
    near = [Scored(Pair("a", "b", False, "number", 0), neg_cos, True, None) for _ in range(n_neg)]
    same = [Scored(Pair("a", "a", True, "paraphrase", 0), c, True, None) for c in np.linspace(0.55, 0.99, 200)]
    return near + same


def test_calibration_returns_the_known_threshold():
    """Every near-miss sits at cosine 0.70: the lowest threshold that refuses them all is the next grid step."""
    s, r = fit(_synthetic(0.70))
    assert s.threshold == pytest.approx(0.71) and r.false_hits == 0, f"{s} {r}"
    assert r.hits == sum(c >= 0.71 for c in np.linspace(0.55, 0.99, 200)), f"hits at 0.71: {r}"
    # with too few near-miss pairs nothing can be proven: no setting qualifies, and the error says why
    with pytest.raises(ValueError, match="false-hit upper bound"):
        fit(_synthetic(0.70, n_neg=100))


def test_phrase_similarity_setting_is_calibrated_too():
    near = [Scored(Pair("a", "b", False, "antonym", 0), 0.95, True, 0.72) for _ in range(400)]
    same = [Scored(Pair("a", "b", True, "paraphrase", 0), 0.95, True, 0.9) for _ in range(100)]
    s, r = fit(near + same)
    assert 0.72 < s.min_phrase_sim <= 0.9 and r.hits == 100 and r.false_hits == 0, f"{s} {r}"


def test_pairs_are_deterministic_balanced_and_split_by_template():
    a, b = labeled_pairs(3), labeled_pairs(3)
    assert a == b, "one seed, one pair set"
    assert labeled_pairs(4) != a
    kinds = {p.kind for p in a}
    assert set(SAME_KINDS) <= kinds and set(NEAR_MISS_KINDS) <= kinds, f"kinds: {sorted(kinds)}"
    fit_set, held = split_pairs(a)
    assert not {p.template for p in fit_set} & {p.template for p in held}, "a template is on both sides"
    assert all(p.a != p.b for p in a if not p.same), "a near-miss must change the text"
    for phrasings in templates():
        assert all(set(slot_names(q)) == set(slot_names(phrasings[0])) for q in phrasings), phrasings


def test_embedder_is_offline_unit_length_and_refuses_a_broken_folder(embedder, tmp_path):
    from costopt.cache.embed import Embedder, EmbedderUnavailable

    v = embedder.encode(["What is the capital of France?", "Name the capital city of France."])
    assert v.shape == (2, embedder.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert float(v[0] @ v[1]) > 0.8, "a paraphrase embeds close"
    with pytest.raises(EmbedderUnavailable, match="modules.json"):
        Embedder(tmp_path)


def test_onnx_backends_agree_with_sentence_transformers_and_repair_a_corrupt_export(embedder, tmp_path):
    """The fp32 export equals sentence-transformers to float precision; the INT8 one (the default) stays
    close; padding in a batch changes nothing; a corrupt exported file is made again, not trusted."""
    from costopt.cache.embed import Embedder

    assert embedder.backend == "onnx-int8", "the gateway's default embedder"
    texts = ["hi", "What is the capital of France?", "Summarise this note: " + "the river rose after rain. " * 40,
             "", "¿Cuál es la capital de Francia?", "17 times 3"]
    ref = Embedder(backend="torch").encode(texts)
    fp32 = Embedder(backend="onnx", export_root=tmp_path)
    got = fp32.encode(texts)
    assert np.abs(got - ref).max() < 1e-4, f"fp32 export differs from torch by {np.abs(got - ref).max()}"
    cos = (embedder.encode(texts) * ref).sum(1)
    assert cos.min() > 0.95, f"INT8 embeddings drift from fp32: cosines {cos.round(4).tolist()}"
    one_by_one = np.concatenate([embedder.encode([t]) for t in texts])
    assert np.abs(one_by_one - embedder.encode(texts)).max() < 1e-4, "padding in a batch changed an embedding"
    (onnx_file,) = tmp_path.glob("*/model-onnx.onnx")
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    again = Embedder(backend="onnx", export_root=tmp_path)
    assert np.abs(again.encode(texts) - ref).max() < 1e-4, "a truncated export must be made again"
    assert again.identity != embedder.identity, "calibrations must tell backends apart"


def test_calibrated_rule_bounds_false_hits_on_the_held_split(calibration_file):
    """The acceptance property on the project's pairs, as the gateway calibrates at start: fit on one
    split, the false-hit bound <= 1% on the other, every kind of near-miss present there."""
    import json

    cal = json.loads(calibration_file.read_text())
    overall, kinds = cal["held"]["overall"], cal["held"]["kinds"]
    assert overall["near_misses"] >= 400 and overall["false_hit_upper95"] <= 0.01, \
        f"held split: {overall} with {cal['setting']}"
    assert overall["hit_rate"] >= 0.4, f"the rule must still serve same-answer pairs: {overall}"
    assert set(NEAR_MISS_KINDS) <= {k for k, v in kinds.items() if v["near_misses"]}, sorted(kinds)
    curve = cal["curve"]
    assert all(x["false_hit_rate"] >= y["false_hit_rate"] for x, y in zip(curve, curve[1:])), \
        "raising the threshold never adds false hits"


def test_batched_scoring_equals_one_pair_at_a_time(embedder):
    pairs = labeled_pairs(5, per_template=2)
    batched = score(pairs, embedder.encode)
    single = score(pairs, embedder.encode, embedder.phrase_sim)
    for b, s in zip(batched, single):
        assert b.structural_ok == s.structural_ok and (b.phrase_sim is None) == (s.phrase_sim is None)
        if b.phrase_sim is not None:
            assert b.phrase_sim == pytest.approx(s.phrase_sim, abs=1e-4), b.pair
    assert not math.isnan(rates(batched, Setting(0.99, 1.01)).hit_rate)


def test_cosine_alone_is_the_comparison_curve():
    from costopt.cache.calibrate import sweep_cosine_only

    curve = sweep_cosine_only(_synthetic(0.70))
    at = {round(c["threshold"], 2): c for c in curve}
    assert at[0.7]["false_hit_rate"] == 1.0 and at[0.71]["false_hit_rate"] == 0.0, "near-misses sit at 0.70"
