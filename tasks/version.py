"""Last phase, version: record the run's artifacts in `dvc.lock` and push them to the S3 remote.

Run it as `python -m tasks.version` (or `python -m tasks.version --pull` to fetch a versioned run
into a checkout). The Airflow DAG runs the same functions as the `dvc.yaml` stages, so after a DAG
run the outputs on disk are exactly what the stages would have produced; `dvc commit -f` writes their
hashes (and those of the code and params they came from) to `dvc.lock`, and `dvc push` stores them
in the remote. With `dvc.lock` committed to git, `git checkout <rev> && python -m tasks.version
--pull` brings back that run's artifacts bit for bit.

The remote is configured in `.dvc/config.local` (git-ignored) as the default remote `costopt`,
because a loopback endpoint's port belongs to one machine, not to the project. The endpoint is
checked before anything changes; a failing dvc command raises `DvcError` with dvc's own message and
leaves the artifacts as they were (`dvc commit --no-relink` never rewrites workspace files).
"""
from __future__ import annotations

import re
from typing import Any

from costopt.models.source import sha256_file
from costopt.params import Params
from costopt.storage.dvc import (REMOTE, DvcError, configure_remote, dvc_env, missing_paths, require_dvc_repo,
                                 run_dvc)
from costopt.storage.layout import Workspace
from costopt.storage.s3 import check_endpoint, parse_s3_url


def _count(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0  # "Everything is up to date." prints no count


def _prepare(params: Params, ws: Workspace, create_bucket: bool) -> dict[str, str]:
    """Checks shared by push and pull; returns the dvc environment. Changes nothing but the bucket."""
    cfg = params.version
    require_dvc_repo(ws.root)
    bucket = parse_s3_url(cfg.remote).bucket
    check_endpoint(cfg.endpoint_url, bucket, create=create_bucket)
    return dvc_env(cfg.endpoint_url)


def version(params: Params, ws: Workspace) -> dict[str, Any]:
    """Record every stage output in dvc.lock and push it to `params.version.remote`; return the record."""
    env = _prepare(params, ws, create_bucket=True)
    missing = missing_paths(ws.root, env)
    if missing:
        listed = "; ".join(f"{path} (stage {', '.join(stages)})" for path, stages in sorted(missing.items()))
        raise DvcError(f"workspace {ws.root}: cannot version, these dvc.yaml deps/outs are missing: {listed}; "
                       "expected a complete run of the pipeline first")
    configure_remote(ws.root, params.version, env)
    run_dvc(ws.root, ["commit", "--force", "--no-relink"], env)
    out = run_dvc(ws.root, ["push", "--remote", REMOTE], env)
    lock = ws.root / "dvc.lock"
    return {"remote": params.version.remote, "endpoint": params.version.endpoint_url,
            "pushed": _count(r"(\d+) files? pushed", out), "lock": str(lock),
            "lock_sha256": sha256_file(lock)}


def pull(ws: Workspace, params: Params) -> dict[str, Any]:
    """Fetch the outputs recorded in ws.root's dvc.lock from the remote and check them out."""
    env = _prepare(params, ws, create_bucket=False)
    lock = ws.root / "dvc.lock"
    if not lock.is_file():
        raise DvcError(f"workspace {ws.root}: no dvc.lock, so nothing is versioned here; expected a "
                       "checkout of a commit that `python -m tasks.version` recorded")
    configure_remote(ws.root, params.version, env)
    out = run_dvc(ws.root, ["pull", "--remote", REMOTE], env)
    return {"remote": params.version.remote, "endpoint": params.version.endpoint_url,
            "fetched": _count(r"(\d+) files? fetched", out), "lock": str(lock),
            "lock_sha256": sha256_file(lock)}


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import execute, parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pull", action="store_true",
                   help="fetch the artifacts recorded in dvc.lock from the remote instead of pushing")
    args = p.parse_args(argv)
    return execute((lambda params, ws: pull(ws, params)) if args.pull else version, args)


if __name__ == "__main__":
    raise SystemExit(main())
