"""Where calibration data comes from: serving logs when they hold prompts, else the project's prompts;
never empty, never overlapping the held-out prompts."""
import json

import pytest

from costopt.storage.layout import Workspace
from costopt.params import ParamsError, params_from_dict
from costopt.quantization.calibset import calibration_rows


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def chat(i, text):
    return {"id": i, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def ws(tmp_path):
    data = tmp_path / "artifacts" / "data"
    _jsonl(data / "prompts.jsonl", [chat("p0", "What is the capital of France?"), chat("p1", "Name a river.")])
    _jsonl(data / "calibration.jsonl", [chat(f"c{i}", f"Calibration prompt number {i}") for i in range(6)])
    return Workspace(tmp_path)


def test_project_prompts_when_there_is_no_log(ws):
    rows, source = calibration_rows(params_from_dict({"calibrate": {"samples": 4}}), ws)
    assert source == "prompts" and [r["id"] for r in rows] == ["c0", "c1", "c2", "c3"], f"{source}: {rows}"


def test_serving_log_wins_when_it_holds_prompts(ws):
    _jsonl(ws.root / "logs" / "requests.jsonl",
           [{"prompt": f"user asked {i}", "tenant": "t"} for i in range(5)] + [{"tenant": "no text"}])
    rows, source = calibration_rows(params_from_dict({"calibrate": {"samples": 3}}), ws)
    assert source == "logs", "a log with prompt text is the calibration source under 'auto'"
    assert [r["messages"][0]["content"] for r in rows] == ["user asked 2", "user asked 3", "user asked 4"], \
        "the latest traffic is used"
    rows, source = calibration_rows(params_from_dict({"calibrate": {"source": "prompts"}}), ws)
    assert source == "prompts", "source: prompts ignores the log"


def test_log_overlapping_held_out_prompts_is_refused(ws):
    _jsonl(ws.root / "logs" / "requests.jsonl", [{"prompt": "what is the capital of  FRANCE?"}])
    with pytest.raises(ParamsError, match="disjoint"):
        calibration_rows(params_from_dict({}), ws)


def test_log_without_prompts_is_an_error_when_required(ws):
    _jsonl(ws.root / "logs" / "requests.jsonl", [{"tenant": "t", "tokens": 3}])
    with pytest.raises(ParamsError, match="calibrate.source: 'logs'"):
        calibration_rows(params_from_dict({"calibrate": {"source": "logs"}}), ws)
    rows, source = calibration_rows(params_from_dict({}), ws)
    assert source == "prompts", "under 'auto' a log without prompt text falls back to the project's prompts"


def test_empty_calibration_set_is_refused(ws):
    _jsonl(ws.data_dir / "calibration.jsonl", [])
    with pytest.raises(ParamsError, match="empty"):
        calibration_rows(params_from_dict({}), ws)


def test_corrupt_log_lines_are_skipped_and_counted(ws, caplog):
    (ws.root / "logs").mkdir()
    (ws.root / "logs" / "requests.jsonl").write_text('{"prompt": "ok"}\n{not json\n[1, 2]\n{"prompt": "fine too"}\n')
    with caplog.at_level("WARNING", logger="costopt.calibset"):
        rows, source = calibration_rows(params_from_dict({}), ws)
    assert source == "logs" and [r["messages"][0]["content"] for r in rows] == ["ok", "fine too"], rows
    assert "skipped 2 corrupt line(s), the first line 2" in caplog.text, caplog.text


def test_log_overlapping_the_crosscheck_set_is_refused(ws):
    _jsonl(ws.data_dir / "crosscheck.jsonl", [chat("x0", "How many legs does a spider have?")])
    _jsonl(ws.root / "logs" / "requests.jsonl", [{"prompt": "How many legs does a spider have?"}])
    with pytest.raises(ParamsError, match=r"= x0\); calibration data must be disjoint"):
        calibration_rows(params_from_dict({}), ws)
