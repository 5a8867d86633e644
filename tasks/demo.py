"""`make demo`: the whole roadmap on the built-in model through a real Airflow run, ending in a report.

Run it as `python -m tasks.demo [--profile full|quick] [--workspace DIR]`. It
1. prepares Airflow's SQLite metadata DB under `.airflow/` (first run only),
2. starts `moto_server` on the loopback endpoint named in params.yaml (`version.endpoint_url`) as the
   DVC remote, unless something already answers there,
3. triggers the `optimize_model` DAG with `airflow dags test` (a real DagRun, tasks run in order),
4. prints where the report is, a short table, and how to call the deployment the run left serving
   (`costopt.deploy.lasting`; `make serve-stop` stops it).
Airflow is driven through its CLI, so this module imports no Airflow code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

from costopt.storage.layout import Workspace, read_json
from costopt.params import ParamsError, load_params

PROJECT = Path(__file__).resolve().parents[1]


def airflow_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(PROJECT / ".airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT / "dags"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def ensure_airflow_db(env: dict[str, str]) -> None:
    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    if not db.exists():
        print(f"== preparing Airflow's metadata DB in {db.parent} (first run only)", flush=True)
        subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)


def loopback_port(endpoint_url: str) -> int | None:
    url = urlparse(endpoint_url)
    if url.hostname in ("127.0.0.1", "localhost", "::1") and url.port:
        return url.port
    return None


def start_remote(stack: ExitStack, endpoint_url: str, remote: str) -> str:
    """Start moto_server for a loopback endpoint nobody serves yet; returns what happened."""
    from costopt.storage.s3 import EndpointUnreachableError, MotoServer, check_endpoint, parse_s3_url

    port = loopback_port(endpoint_url)
    if port is None:
        return f"using the configured S3 endpoint {endpoint_url or '(AWS)'}"
    try:
        check_endpoint(endpoint_url, parse_s3_url(remote).bucket, create=True, timeout_s=1)
        return f"an S3 endpoint already answers at {endpoint_url}"
    except EndpointUnreachableError:
        pass
    stack.enter_context(MotoServer(port=port))
    return f"started moto_server at {endpoint_url} (in-memory: it lives as long as this demo)"


def trigger(conf: dict, env: dict[str, str], log: Path) -> int:
    """`airflow dags test optimize_model --conf ...`, streamed to the terminal and to `log`."""
    cmd = [airflow_bin(), "dags", "test", "optimize_model", "--conf", json.dumps(conf)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="full", choices=["quick", "full"])
    p.add_argument("--workspace", default=str(PROJECT))
    args = p.parse_args(argv)
    try:
        params = load_params(Path(args.workspace) / "params.yaml", profile=args.profile)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = airflow_env()
    started = time.perf_counter()
    with ExitStack() as stack:
        ensure_airflow_db(env)
        print(f"== {start_remote(stack, params.version.endpoint_url, params.version.remote)}", flush=True)
        conf = {"profile": args.profile, "workspace": str(Path(args.workspace).resolve())}
        code = trigger(conf, env, Path(env["AIRFLOW_HOME"]) / "logs" / "demo-last.log")
    wall = time.perf_counter() - started
    if code != 0:
        print(f"\nerror: the optimize_model run failed (exit {code}); the log is in "
              f"{Path(env['AIRFLOW_HOME']) / 'logs' / 'demo-last.log'}", file=sys.stderr)
        return code
    return show(Workspace.from_env(args.workspace), wall)


def show(ws: Workspace, wall_s: float) -> int:
    from tasks.report import summary_table

    latest = ws.reports_dir / "latest"
    summary = read_json(latest / "summary.json")
    print("\n" + summary_table(summary))
    print(f"\nreport:  {latest.resolve() / 'report.html'}")
    print(f"summary: {latest.resolve() / 'summary.json'}")
    print(f"run {summary['run_id']} finished in {wall_s / 60:.1f} min")
    from costopt.deploy import lasting

    state = lasting.status(ws.root)
    if state is not None and state["running"]:
        print("\n" + lasting.how_to_call(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
