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

import json
import os
import re
from pathlib import Path
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


SAVED_LOCK = Path(".dvc") / "tmp" / "dvc.lock.before-version.json"  # git-ignored with .dvc/tmp/


def _save_lock(ws: Workspace) -> None:
    """Keep the lock as it is before `dvc commit` rewrites it (or that there was none), atomically."""
    lock, saved = ws.root / "dvc.lock", ws.root / SAVED_LOCK
    state = {"existed": lock.is_file(), "text": lock.read_text(encoding="utf-8") if lock.is_file() else None}
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, saved)


def _put_lock_back(ws: Workspace) -> bool:
    """Return dvc.lock to the state `_save_lock` kept and drop the copy; False when nothing was kept."""
    lock, saved = ws.root / "dvc.lock", ws.root / SAVED_LOCK
    if not saved.is_file():
        return False
    state = json.loads(saved.read_text(encoding="utf-8"))
    if state["existed"]:
        tmp = lock.with_name(".dvc.lock.restore.tmp")
        tmp.write_text(state["text"], encoding="utf-8")
        os.replace(tmp, lock)
    else:
        lock.unlink(missing_ok=True)
    saved.unlink()
    return True


_OBJECT = re.compile(r"(?:failed to transfer '|/files/md5/)([0-9a-f]{2})/?([0-9a-f]{30})(\.dir)?")


def _name_objects(ws: Workspace, dvc_output: str) -> list[str]:
    """The workspace paths behind the object hashes dvc's failure output names (from the new lock's outs
    and the directory manifests in the cache), `path (md5 ...)`; hashes it cannot place stay bare."""
    import yaml

    try:
        lock = yaml.safe_load((ws.root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        lock = {}
    where: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            md5 = str(out.get("md5", ""))
            where[md5] = out["path"]
            if md5.endswith(".dir"):
                manifest = ws.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
                try:
                    for entry in json.loads(manifest.read_text(encoding="utf-8")):
                        where.setdefault(entry["md5"], f"{out['path']}/{entry['relpath']}")
                except (OSError, ValueError, KeyError, TypeError):
                    pass
    named = []
    for m in _OBJECT.finditer(dvc_output):
        md5 = m.group(1) + m.group(2) + (m.group(3) or "")
        label = f"{where[md5]} (md5 {md5})" if md5 in where else f"md5 {md5}"
        if label not in named:
            named.append(label)
    return named


def version(params: Params, ws: Workspace) -> dict[str, Any]:
    """Record every stage output in dvc.lock and push it to `params.version.remote`; return the record.

    dvc.lock moves only once every object it names is in the remote: the lock before this run is kept
    aside, and put back if the commit or the push fails (or, after a run killed mid-push, at the start
    of the next one), so the lock never names objects the remote may lack. Transient faults raise
    `DvcTransientError` / `EndpointUnreachableError` (Airflow retries the task with back-off)."""
    cfg = params.version
    env = _prepare(params, ws, create_bucket=True)
    if _put_lock_back(ws):
        print("version: an earlier run stopped before its push finished; dvc.lock is back to the lock before it")
    missing = missing_paths(ws.root, env)
    if missing:
        listed = "; ".join(f"{path} (stage {', '.join(stages)})" for path, stages in sorted(missing.items()))
        raise DvcError(f"workspace {ws.root}: cannot version, these dvc.yaml deps/outs are missing: {listed}; "
                       "expected a complete run of the pipeline first")
    configure_remote(ws.root, cfg, env)
    _save_lock(ws)
    try:
        run_dvc(ws.root, ["commit", "--force", "--no-relink"], env, timeout_s=cfg.timeout_s)
        out = run_dvc(ws.root, ["push", "--remote", REMOTE], env, timeout_s=cfg.timeout_s)
    except DvcError as exc:
        named = _name_objects(ws, str(exc))
        _put_lock_back(ws)
        raise type(exc)(f"version: pushing to {cfg.remote} at {cfg.endpoint_url or 'AWS S3'} failed"
                        f"{'; not stored: ' + ', '.join(named) if named else ''}. dvc.lock is left as it was before "
                        f"this run, the artifacts are untouched, and objects already pushed stay in the remote "
                        f"(content-addressed: a retry skips them). {exc}") from exc
    except BaseException:  # interrupted (Ctrl-C, task killed): the same, before going
        _put_lock_back(ws)
        raise
    (ws.root / SAVED_LOCK).unlink(missing_ok=True)  # every object is in the remote: the new lock stands
    lock = ws.root / "dvc.lock"
    return {"remote": cfg.remote, "endpoint": cfg.endpoint_url,
            "pushed": _count(r"(\d+) files? pushed", out), "lock": str(lock),
            "lock_sha256": sha256_file(lock)}


def pull(ws: Workspace, params: Params) -> dict[str, Any]:
    """Fetch the outputs recorded in ws.root's dvc.lock from the remote and check them out."""
    env = _prepare(params, ws, create_bucket=False)
    _put_lock_back(ws)  # a version run killed mid-push: its lock may name objects the remote lacks
    lock = ws.root / "dvc.lock"
    if not lock.is_file():
        raise DvcError(f"workspace {ws.root}: no dvc.lock, so nothing is versioned here; expected a "
                       "checkout of a commit that `python -m tasks.version` recorded")
    configure_remote(ws.root, params.version, env)
    out = run_dvc(ws.root, ["pull", "--remote", REMOTE], env, timeout_s=params.version.timeout_s)
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
