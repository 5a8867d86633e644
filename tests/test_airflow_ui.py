"""The trigger form, tested the way users meet it: in a browser, on the Airflow `make airflow-ui` starts.

Playwright drives Debian's Chromium (/usr/bin/chromium; `make browser` installs it, no browser is ever
downloaded). The test
1. copies the project into a temporary workspace (tests/test_e2e.py's `make_workspace`: a moto_server
   S3 endpoint as the DVC remote) and writes distinctive values into its params.yaml (two variants, a
   price, gates, the search off) before Airflow starts;
2. starts `make -C <workspace> airflow-ui` (`airflow standalone`: scheduler, DAG processor, API server,
   triggerer) with its own AIRFLOW_HOME and a free port, in its own process group;
3. logs in through the login page with the password `airflow standalone` generated, opens
   `optimize_model`'s trigger form and checks that its fields show params.yaml's values;
4. raises one gate (kl_mean_max), picks the quick profile, points the workspace field at the copy,
   screenshots the form and triggers the run;
5. waits for the scheduler to finish the run and checks that the run's conf, its frozen settings
   (artifacts/run/params.yaml) and its summary (reports/latest/summary.json) carry the changed gate.
Teardown stops every process the Airflow started (its process group, the task processes that run in
groups of their own, the model server deploy starts) and checks that none is left.

It takes several minutes (a quick-profile run on the real model), so it runs in `make test-full` and
`make test-browser`, not in `make test`. COSTOPT_UPDATE_SCREENSHOT=1 also writes the form's
screenshot to docs/airflow-trigger-form.png (README.md shows it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from costopt.storage.s3 import MotoServer
from test_e2e import PROJECT, make_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
# A fresh profile with Chromium's own background traffic off: on a closed network its connections are
# refused, and a headless run must not depend on them.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = PROJECT / "docs" / "airflow-trigger-form.png"
DAG = "optimize_model"
VARIANTS = ["int8_weight_only", "gguf_q8_0"]  # one torch and one llama.cpp variant: a short run
FILE_GATES = {"kl_mean_max": 0.031, "kl_p99_max": 0.61, "top1_agreement_min": 0.91, "ppl_ratio_max": 1.07,
              "task_retention_min": 0.96, "statistic": "point"}
PRICE = 0.37
CHANGED = {"kl_mean_max": 0.0425}  # the gate the test changes in the form
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 25 * 60


def require_browser() -> None:
    """Fail when the browser test is required (CI, COSTOPT_REQUIRE_BROWSER: `make test-full` and `make
    test-browser` set it) and cannot run; otherwise skip, saying why."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} is missing (install Debian's chromium: `make browser` or "
                       "`apt-get install chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        missing.append(f"the Python package playwright is missing ({exc}); it is in requirements/pipeline.txt")
    if missing:
        why = "the browser test cannot run: " + "; ".join(missing)
        if os.environ.get("CI") or os.environ.get("COSTOPT_REQUIRE_BROWSER"):
            pytest.fail(why + " (CI or COSTOPT_REQUIRE_BROWSER is set, so this is a failure)", pytrace=False)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def _edit_params(params: dict) -> None:
    """The values the form must show: all differ from the shipped params.yaml."""
    params["quantize"]["variants"] = list(VARIANTS)
    params["validate"]["gates"] = dict(FILE_GATES)
    params["cost"]["price_per_hour_usd"] = PRICE
    params["search"]["enabled"] = False  # the form's switch shows it off; no sensitivity scan or mixes
    params["calibrate"]["curve_variant"] = ""  # no calibration curve: the run stays short
    params["serve"]["keep"] = False  # no lasting deployment left behind (tests/test_e2e.py covers it)


# ----------------------------------------------------------------------------------- the Airflow

def _ours(home: Path):
    """Every live process whose environment names this test's AIRFLOW_HOME: the Airflow components, the
    task processes (each in a process group of its own) and anything they started."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("AIRFLOW_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def stop_airflow(proc: subprocess.Popen, home: Path) -> list[str]:
    """Stop the whole `make airflow-ui` tree; returns what is still alive afterwards (should be nothing)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    procs = {p.pid: p for p in [*tree, *_ours(home)]}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # make runs as a session (and group) leader: start_new_session
        except ProcessLookupError:
            pass
        for p in procs.values():  # the task processes' own groups, the model server
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=30 if sig == signal.SIGTERM else 10)
        if not alive:
            break
        procs = {p.pid: p for p in alive}
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    left = []
    for p in _ours(home):
        try:
            left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def wait_ready(proc: subprocess.Popen, url: str, home: Path, log: Path) -> dict[str, str]:
    """Wait for the API server to answer and for the generated password file; returns {user: password}."""
    passwords = home / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`make airflow-ui` exited with code {proc.returncode}; its log ({log}) ends:\n"
                        f"{_tail(log)}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as resp:
                up = resp.status == 200
        except (urllib.error.URLError, OSError):
            up = False
        if up and passwords.is_file():
            return json.loads(passwords.read_text())
        time.sleep(2)
    pytest.fail(f"Airflow did not answer at {url} within {START_TIMEOUT_S} s; its log ({log}) ends:\n"
                f"{_tail(log)}", pytrace=False)


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    require_browser()
    base = tmp_path_factory.mktemp("airflow-ui")
    venv_stamp = PROJECT / ".venv" / ".costopt-installed"
    assert venv_stamp.is_file(), f"{venv_stamp} is missing: create the environment first (make venv)"
    with MotoServer(port=0) as s3:
        ws = make_workspace(base / "ws", s3.endpoint_url, edit=_edit_params)
        # the workspace is the project `make airflow-ui` runs in; it uses this checkout's environment
        (ws / ".venv").symlink_to(PROJECT / ".venv", target_is_directory=True)
        home, port, log = base / "airflow", free_port(), base / "airflow-ui.log"
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items()  # a fresh make, not a sub-make of `make test-full`
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("AIRFLOW")}
        env.update({"AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
                    # task processes reach the API server's execution API here (default: localhost:8080)
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
                    "AIRFLOW_HOME": str(home), "NO_COLOR": "1"})
        # `make airflow-ui` as a user runs it; AIRFLOW_HOME on make's command line overrides the
        # Makefile's export (the DAGs folder stays <workspace>/dags). -o: never rebuild the environment
        # (it is this checkout's, through the symlink).
        cmd = ["make", "--no-print-directory", "-C", str(ws), "-o", ".venv/.costopt-installed", "airflow-ui",
               f"AIRFLOW_HOME={home}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            users = wait_ready(proc, url, home, log)
            yield {"url": url, "users": users, "ws": ws, "home": home, "log": log, "base": base}
        finally:
            left = stop_airflow(proc, home)
        assert not left, f"processes left after stopping Airflow: {left}"


# ----------------------------------------------------------------------------------- the browser

def _editor_json(editor) -> dict:
    """The JSON a Monaco editor holds (it renders spaces as no-break spaces; every line is visible)."""
    return json.loads(editor.locator(".view-lines").inner_text().replace("\xa0", " "))


def _paste(editor, text: str) -> None:
    """Replace a Monaco editor's text the way a user pastes it: select all, paste. (Typing would go
    through the editor's auto-closing brackets and auto-indent.)"""
    editor.locator(".view-lines").click()
    editor.page.keyboard.press("ControlOrMeta+a")
    editor.locator("textarea").first.evaluate(
        """(area, text) => { const data = new DataTransfer(); data.setData('text/plain', text);
            area.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true})); }""",
        text)


def _api(page, url: str, path: str) -> dict:
    """GET the REST API with the browser's session (the UI's token cookie)."""
    resp = page.request.get(f"{url}/api/v2{path}")
    assert resp.ok, f"GET /api/v2{path}: {resp.status} {resp.text()[:500]}"
    return resp.json()


def _failed_tasks(page, ui: dict, run_id: str) -> str:
    """States of the run's task instances and the log tails of the failed ones."""
    tis = _api(page, ui["url"], f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances?limit=200")
    states = ", ".join(f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in tis["task_instances"])
    out = [f"task states: {states}"]
    for t in tis["task_instances"]:
        if t["state"] in ("failed", "up_for_retry"):
            logs = sorted((ui["home"] / "logs").glob(f"dag_id={DAG}/run_id={run_id}/task_id={t['task_id']}/**/*.log"),
                          key=lambda p: p.stat().st_mtime)
            for log in logs[-1:]:
                out.append(f"--- {log} ends:\n{_tail(log, 3000)}")
    return "\n".join(out)


def test_trigger_form_shows_params_yaml_and_runs_with_a_changed_gate(airflow_ui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ui, ws = airflow_ui, airflow_ui["ws"]
    user, password = next(iter(ui["users"].items()))
    failure_dir = tmp_path / "browser"
    failure_dir.mkdir()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        step = "start"
        try:
            step = "log in"
            page.goto(ui["url"] + "/")
            expect(page).to_have_url(re.compile(r"/auth/login"))
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            expect(page).not_to_have_url(re.compile(r"/auth/login"))

            step = f"wait for the DAG processor to list {DAG}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while page.request.get(f"{ui['url']}/api/v2/dags/{DAG}").status != 200:
                assert time.monotonic() < deadline, f"{DAG} was not parsed within {START_TIMEOUT_S} s"
                time.sleep(2)

            step = "open the trigger form"
            page.goto(f"{ui['url']}/dags/{DAG}")
            page.get_by_role("button", name="Trigger Dag", exact=True).click()
            form = page.get_by_role("dialog")
            expect(form.get_by_text(f"Trigger Dag - {DAG}")).to_be_visible()
            expect(form.get_by_text("Run Parameters")).to_be_visible()
            # Airflow names each param's input element_<param>; the labels of text inputs point elsewhere
            model = form.locator("[name=element_model]")
            variants = form.locator("[name=element_variants]")
            gates = form.locator(".monaco-editor").first  # the first JSON editor: gates (the conf's is collapsed)
            search = form.get_by_role("checkbox", name="mixed_precision_search")
            price = form.get_by_role("spinbutton", name="price_per_hour_usd")
            profile = form.get_by_role("combobox", name="profile")
            workspace = form.locator("[name=element_workspace]")

            step = "check the form shows params.yaml's values"
            params = yaml.safe_load((ws / "params.yaml").read_text())
            expect(model).to_have_value(params["ingest"]["model"])
            expect(variants).to_have_value("\n".join(VARIANTS))
            expect(gates.locator(".view-lines")).to_contain_text("kl_mean_max")
            assert _editor_json(gates) == FILE_GATES, "the gates editor shows params.yaml's validate.gates"
            expect(search).not_to_be_checked()  # search.enabled: false
            expect(price).to_have_value(str(PRICE))
            expect(form.locator("input[name=element_profile]")).to_have_value("full")  # the DAG's default
            expect(workspace).to_have_value("")
            expect(form.get_by_role("checkbox", name=f"Unpause {DAG} on trigger")).to_be_checked()

            step = "change a gate, pick the quick profile, point the workspace at the copy"
            _paste(gates, json.dumps({**FILE_GATES, **CHANGED}, indent=2))
            expect(gates.locator(".view-lines")).to_contain_text(str(CHANGED["kl_mean_max"]))
            assert _editor_json(gates) == {**FILE_GATES, **CHANGED}
            profile.click()
            page.get_by_role("option", name="quick", exact=True).click()
            expect(form.locator("input[name=element_profile]")).to_have_value("quick")
            workspace.fill(str(ws))

            step = "screenshot the filled form"
            page.set_viewport_size({"width": 1400, "height": 1700})  # the whole dialog, no scrolling
            page.wait_for_timeout(500)
            shot = failure_dir / "airflow-trigger-form.png"
            form.screenshot(path=str(shot))
            if os.environ.get("COSTOPT_UPDATE_SCREENSHOT"):
                shutil.copyfile(shot, SCREENSHOT)
            page.set_viewport_size({"width": 1400, "height": 1000})

            step = "trigger"
            submit = form.get_by_test_id("trigger-dag-submit")
            expect(submit).to_be_enabled()
            submit.click()
            expect(form).to_be_hidden()
            deadline = time.monotonic() + 120
            while not (runs := _api(page, ui["url"], f"/dags/{DAG}/dagRuns")["dag_runs"]):
                assert time.monotonic() < deadline, "no DAG run appeared within 120 s of the trigger"
                time.sleep(2)
            assert len(runs) == 1, [r["dag_run_id"] for r in runs]
            run = runs[0]
            run_id, conf = run["dag_run_id"], run["conf"]
            assert run["triggered_by"] == "ui", run
            assert conf["gates"] == {**FILE_GATES, **CHANGED}, f"the form sent the changed gate: {conf}"
            assert conf["profile"] == "quick" and conf["variants"] == VARIANTS and conf["price_per_hour_usd"] == PRICE \
                and conf["mixed_precision_search"] is False and conf["workspace"] == str(ws), conf

            step = f"wait for run {run_id}"
            deadline, path = time.monotonic() + RUN_TIMEOUT_S, f"/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"
            while (state := _api(page, ui["url"], path)["state"]) not in ("success", "failed"):
                assert time.monotonic() < deadline, \
                    f"run {run_id} still {state} after {RUN_TIMEOUT_S} s\n{_failed_tasks(page, ui, run_id)}"
                time.sleep(10)
            assert state == "success", f"run {run_id} {state}\n{_failed_tasks(page, ui, run_id)}"

            step = "show the run in the UI"
            page.goto(f"{ui['url']}/dags/{DAG}/runs/{quote(run_id, safe='')}")
            expect(page.get_by_text(run_id).first).to_be_visible()
        except Exception as exc:
            page.screenshot(path=str(failure_dir / "failure.png"), full_page=True)
            (failure_dir / "failure.html").write_text(page.content())
            raise AssertionError(f"browser step '{step}' failed: {exc}\nscreenshot and page HTML: {failure_dir}; "
                                 f"Airflow's log: {ui['log']}") from exc
        finally:
            context.close()

    # the run used the changed gate: the frozen settings every task read, and the summary's thresholds
    frozen = yaml.safe_load((ws / "artifacts" / "run" / "params.yaml").read_text())
    assert frozen["run"]["dag_run_id"] == run_id, f"frozen by run {frozen['run']}, not by {run_id}"
    assert frozen["validate"]["gates"] == {**FILE_GATES, **CHANGED}, frozen["validate"]
    assert frozen["profile"] == "quick" and frozen["quantize"]["variants"] == VARIANTS, frozen["quantize"]
    assert frozen["cost"]["price_per_hour_usd"] == PRICE and frozen["search"]["enabled"] is False
    summary = json.loads((ws / "reports" / "latest" / "summary.json").read_text())
    assert summary["profile"] == "quick", summary["profile"]
    assert summary["search"]["gates"] == {**FILE_GATES, **CHANGED}, summary["search"]["gates"]
    assert summary["search"]["statistic"] == "point", summary["search"]
    assert [v["name"] for v in summary["variants"]] == VARIANTS, [v["name"] for v in summary["variants"]]
