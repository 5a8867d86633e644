"""The cache bench's judge (`tasks.cachebench._replay`): the trace's own truth decides which hits are false."""
from __future__ import annotations

import pytest

from costopt.workload.trace import TraceItem

RULE = {"threshold": 0.5, "min_phrase_sim": 0.85}


def _item(i: int, kind: str, text: str, source: str | None = None) -> TraceItem:
    return TraceItem(f"r{i}", kind, source, ({"role": "user", "content": text},), 32, "normal", "t", 5000, float(i))


def test_replay_counts_repeats_as_hits_and_a_hit_on_a_fresh_request_as_false(embedder):
    from tasks.cachebench import _replay
    from costopt.cache.store import DecayPolicy

    items = [_item(0, "fresh", "What is the capital of Peru?"),
             _item(1, "fresh", "How many legs does a spider have?"),
             _item(2, "repeat", "What is the capital of Peru?", "r0"),
             _item(3, "fresh", "What is the capital of Peru?"),  # the trace says new: a hit here is false
             _item(4, "paraphrase", "what is the capital of peru", "r1")]  # the wrong source: a false hit
    out = _replay(embedder, RULE, items, embedder.encode([it.prompt for it in items]), 10, DecayPolicy())
    assert out["hits"] == 3 and out["hits_by_kind"] == {"repeat": 1, "fresh": 1, "paraphrase": 1}, out
    assert out["false_hits"] == 2 and out["false_hit_upper95"] > 0.5, out


def test_decision_part_on_a_short_trace_serves_every_repeat(embedder, calibration_file):
    import json

    from tasks.cachebench import decision_part

    out = decision_part(embedder, json.loads(calibration_file.read_text())["setting"], 120)
    assert out["hits_by_kind"].get("repeat", 0) == out["kinds"]["repeat"], f"a repeat missed: {out}"
    assert out["false_hits"] == 0, f"the calibrated rule served a wrong answer on the trace: {out}"


@pytest.mark.parametrize("argv, field", [(["--parts", "pairs,nonsense"], "--parts"), (["--parts", ","], "--parts"),
                                          (["--concurrency", "0"], "--concurrency")])
def test_cli_rejects_bad_parts_and_concurrency(argv, field, capsys):
    from tasks.cachebench import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and field in err, f"exit {exc.value.code}, stderr: {err}"
