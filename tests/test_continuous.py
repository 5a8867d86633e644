"""The continuous_optimization DAG: real `airflow dags test` runs on recorded request logs, one with a
planted shift in the prompts (it re-optimizes: an optimize_model run is queued) and one without (it
does nothing); corrupt log lines are skipped and counted; the decisions land in a report."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from costopt.evaluation.evaldata import chat_pool, split_prompts

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
SEED = 7
# a domain the project's prompts never visit: code, SQL and German (the planted shift)
SHIFTED = ["Why does this Python raise KeyError: d = {{}}; d['{w}'] += 1 ?", "Write a SQL query that counts {w} per month.",
           "Übersetze bitte ins Englische: Der {w} ist heute geschlossen.", "Fix the bug: for i in range(len({w})) print(i)",
           "What does `git rebase -i HEAD~3` do to the {w} branch?", "Explain this regex: ^{w}[0-9]+$"]
WORDS = ["orders", "cache", "users", "bahnhof", "feature", "invoice", "laden", "tmp", "events", "report", "museum"]


def _workspace(root: Path, drifted: bool) -> Path:
    ws = root / ("drift" if drifted else "steady")
    data = ws / "artifacts" / "data"
    data.mkdir(parents=True)
    held, cal = split_prompts(SEED, 60, 60)
    for name, rows in (("prompts.jsonl", held), ("calibration.jsonl", cal)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = (PROJECT / "params.yaml").read_text()
    (ws / "params.yaml").write_text(params)
    rng = random.Random(3)
    unseen = [conv for _fam, conv in chat_pool(SEED)[140:260]]  # the same distribution, prompts not in the sets
    lines = []
    for i in range(120):
        if drifted and i % 2:
            messages = [{"role": "user", "content": SHIFTED[i % len(SHIFTED)].format(w=rng.choice(WORDS))}]
        else:
            messages = unseen[i % len(unseen)]
        variant = "gguf_q8_0" if i % 2 else "gguf_q6_k"
        lines.append(json.dumps({"time": f"2026-12-05T03:{i // 60:02d}:{i % 60:02d}.000Z", "tenant": "acme",
                                 "variant": variant, "priority": "normal", "prompt_sha256": "x",
                                 "prompt_tokens": 40, "completion_tokens": rng.randint(8, 48),
                                 "latency_ms": rng.uniform(300, 1500), "outcome": "ok", "finish_reason": "stop",
                                 "status": 200, "messages": messages}))
    lines.insert(30, '{"time": "2026-12-05T03:00:30.000Z", "tenant": "ac')  # a write cut off by a crash
    lines.insert(60, "\x00\x00garbage")
    (ws / "logs").mkdir()
    (ws / "logs" / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return ws


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-continuous")
    env = {**__import__("os").environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONUNBUFFERED": "1"}
    exe = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([exe, "db", "migrate"], env=env, check=True, capture_output=True)
    return env, exe


def _run(airflow, ws: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env, exe = airflow
    proc = subprocess.run([exe, "dags", "test", "continuous_optimization", "--conf",
                           json.dumps({"workspace": str(ws), "profile": "quick"})],
                          env=env, capture_output=True, text=True, timeout=900)
    reports = sorted((ws / "reports" / "continuous").glob("*/decisions.json"))
    assert proc.returncode == 0 and reports, f"the run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(reports[-1].read_text())


def _queued_optimize_runs(airflow) -> list[dict]:
    env, _exe = airflow
    code = ("from airflow.models import DagRun\nfrom airflow.utils.session import create_session\nimport json\n"
            "with create_session() as s:\n"
            "    print(json.dumps([r.conf for r in s.query(DagRun).filter(DagRun.dag_id == 'optimize_model')]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_drift_does_nothing(airflow, tmp_path_factory):
    ws = _workspace(tmp_path_factory.mktemp("cont"), drifted=False)
    _proc, report = _run(airflow, ws)
    assert report["traffic"]["skipped"] == 2 and report["traffic"]["records"] == 120, report["traffic"]
    assert report["drift"]["decision"] == "no drift", report["drift"]
    # no model, reference or variant in this workspace: the quality check says why it cannot judge
    assert report["quality"]["decision"] == "undecided" and "not built" in report["quality"]["reason"], \
        report["quality"]
    assert report["decision"]["reoptimize"] is False and report["decision"]["trigger"] is None, report["decision"]
    assert _queued_optimize_runs(airflow) == [], "no drift must not trigger a re-optimization"
    assert report["ab"]["decision"] in ("undecided", "A") and set(report["ab"]["requests"]) == \
        {"gguf_q8_0", "gguf_q6_k"}, report["ab"]
    guard = report["ab"]["metrics"]["kl_mean (live prompts, paired)"]
    assert guard["verdict"] == "not measured" and "not built" in guard["reason"], \
        "quality unknown: B may not win on cost alone"


def test_drift_triggers_reoptimization(airflow, tmp_path_factory):
    ws = _workspace(tmp_path_factory.mktemp("cont"), drifted=True)
    _proc, report = _run(airflow, ws)
    assert report["drift"]["decision"] == "drift" and report["drift"]["p_value"] < 0.01, report["drift"]
    assert report["decision"]["reoptimize"] is True, report["decision"]
    runs = _queued_optimize_runs(airflow)
    assert runs == [{"workspace": str(ws), "profile": "quick", "distill": True}], \
        f"one optimize_model run queued for this workspace, re-distilling (continuous.redistill): {runs}"


def test_quality_drift_alone_triggers_reoptimization(tmp_path):
    """decide re-optimizes on a quality drift even when the prompts did not drift, and says why; with
    continuous.reoptimize false it records the drift and triggers nothing."""
    import dataclasses

    from costopt.params import load_params
    from costopt.storage.layout import Workspace, write_json
    from tasks import continuous

    ws = Workspace.from_env(tmp_path)
    params = load_params(PROJECT / "params.yaml", profile="quick")
    folder = tmp_path / "artifacts" / "continuous" / "r1"
    folder.mkdir(parents=True)
    write_json(folder / "drift.json", {"decision": "no drift", "reason": "p = 0.4"})
    write_json(folder / "quality.json", {"decision": "drift", "variant": "int8_weight_only",
                                         "reason": "kl_mean fails its gate on live traffic"})
    result = continuous.decide(params, ws, "r1")
    assert result["reoptimize"] is True and result["trigger"]["conf"]["distill"] is True, result
    assert any("quality of int8_weight_only drifted" in r for r in result["reasons"]), result["reasons"]
    off = dataclasses.replace(params, continuous=dataclasses.replace(params.continuous, reoptimize=False,
                                                                     redistill=False))
    result = continuous.decide(off, ws, "r1")
    assert result["reoptimize"] is False and result["trigger"] is None, result
    assert any("not triggered" in r for r in result["reasons"]), result["reasons"]


def _asset_events(airflow) -> list[tuple[str, dict]]:
    env, _exe = airflow
    code = ("from airflow.models.asset import AssetEvent\nfrom airflow.utils.session import create_session\nimport json\n"
            "with create_session() as s:\n"
            "    print(json.dumps([[e.asset.name, e.extra] for e in s.query(AssetEvent).order_by(AssetEvent.id)]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def test_traffic_watch_posts_the_request_log_event_once_enough_traffic_came(airflow, tmp_path_factory):
    """traffic_watch (real `airflow dags test` runs): 122 logged lines, 120 of them requests, pass the
    quick profile's 20 -> one request-log asset event (the asset continuous_optimization is scheduled
    on); a second run with nothing new posts none; no deployment runs, so no serving-metrics event."""
    env, exe = airflow
    ws = _workspace(tmp_path_factory.mktemp("watch"), drifted=False)
    before = len(_asset_events(airflow))

    def run_watch():
        proc = subprocess.run([exe, "dags", "test", "traffic_watch", "--conf",
                               json.dumps({"workspace": str(ws), "profile": "quick"})],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return _asset_events(airflow)[before:]

    events = run_watch()
    assert events == [("costopt_request_log", {"requests": 120, "new": 120})], events
    assert json.loads((ws / ".costopt" / "continuous" / "watch.json").read_text()) == {"request_log": 120}
    assert run_watch() == events, "nothing new: no second event"
