"""Artifact versioning against a real S3 endpoint (moto_server on loopback) and the real dvc CLI.

Each test builds a throwaway git + DVC project from this repository's dvc.yaml, params.yaml, code and
.dvcignore, fills every stage output with small fake files, and runs `tasks.version` on it. No model
is needed: versioning only hashes and moves files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from costopt.storage.layout import Workspace
from costopt.params import Params, VersionParams
from costopt.storage.s3 import (EndpointUnreachableError, MotoServer, StorageError, check_endpoint,
                        parse_s3_url, s3_client)
from costopt.storage.dvc import DvcError
from tasks.version import pull, version

PROJECT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=costopt-test", "-c", "user.email=test@costopt.invalid",
       "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]

# Small stand-ins for every stage output; the symlink and the staging folder are not artifacts.
FAKE_OUTPUTS = {
    "artifacts/model/model.safetensors": 70_000,
    "artifacts/model/fingerprint.json": b'{"fingerprint": "0" }\n',
    "artifacts/data/prompts.jsonl": b'{"id": "p0000", "messages": []}\n',
    "artifacts/bench/baseline.json": b'{"variant": "fp32"}\n',
    "artifacts/bench/variants/x.json": b'{"variant": "x"}\n',
    "artifacts/variants/x/model.safetensors": 30_000,
    "artifacts/quality/variants/x.json": b'{"name": "x"}\n',
    "artifacts/reference/reference.json": b'{"skip": 0}\n',
    "artifacts/sensitivity/sensitivity.json": b'{"enabled": false}\n',
    "artifacts/calibration/curve.json": b'{"enabled": false}\n',
    "artifacts/search/search.json": b'{"picked": null}\n',
    "artifacts/search/data_docs/index.html": b"<html></html>\n",
    "artifacts/serving/serving.json": b'{"deployed": []}\n',
    "artifacts/distill/distill.json": b'{"enabled": false}\n',
    "artifacts/route/route.json": b'{"enabled": false}\n',
    "reports/r1/summary.json": b'{"run_id": "r1"}\n',
    "reports/r1/report.html": b"<html>r1</html>\n",
}
NOT_ARTIFACTS = ("artifacts/variants/.y.staging-abc123/model.safetensors",)


def _paths(items: list | None) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]  # `- reports: {persist: ...}`


def stage_paths(dvc_yaml: Path) -> tuple[list[str], list[str]]:
    """(deps, outs) named by the stages of a dvc.yaml, as plain relative paths."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"].values()
    return ([d for s in stages for d in _paths(s.get("deps"))],
            [o for s in stages for o in _paths(s.get("outs"))])


def make_project(root: Path) -> Path:
    """A git + DVC clone of this project's pipeline definition, with fake outputs for every stage."""
    (root / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        shutil.copy2(PROJECT / name, root / name)  # the project's own DVC setup, not a fresh `dvc init`
    for folder in ("tasks", "costopt"):
        shutil.copytree(PROJECT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    deps, outs = stage_paths(root / "dvc.yaml")
    for dep in deps:  # code deps the project has not written yet: dvc commit needs every dep to exist
        if not dep.startswith(("artifacts/", "reports")) and not (root / dep).exists():
            (root / dep).write_text("# placeholder for a module not yet in the project\n")
    from costopt.params import FROZEN, freeze, load_params

    freeze(load_params(root / "params.yaml"), root / FROZEN, None)  # the settings stage's output
    for rel, content in FAKE_OUTPUTS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
    for rel in NOT_ARTIFACTS:
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes(b"half-written")
    (root / "reports" / "latest").symlink_to("r1")
    for out in outs:
        assert (root / out).exists(), f"FAKE_OUTPUTS has nothing for the stage output {out}; add a file for it"
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "pipeline"], cwd=root, check=True)
    return root


def artifact_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under artifacts/ and reports/ (symlinks not followed)."""
    hashes = {}
    for top in ("artifacts", "reports"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and not path.is_symlink():
                hashes[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def params_for(endpoint_url: str, bucket: str) -> Params:
    cfg = VersionParams(remote=f"s3://{bucket}/dvc", endpoint_url=endpoint_url)
    cfg.check("version")
    return Params(version=cfg)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


@pytest.fixture(scope="module")
def s3():
    with MotoServer() as server:
        yield server


@pytest.fixture
def bucket() -> str:
    return f"costopt-test-{uuid.uuid4().hex[:12]}"


def test_version_then_pull_round_trips_every_artifact(tmp_path, s3, bucket):
    src = make_project(tmp_path / "src")
    before = artifact_hashes(src)
    params = params_for(s3.endpoint_url, bucket)

    result = version(params, Workspace(src))

    lock = src / "dvc.lock"
    assert lock.is_file(), "version() must write dvc.lock"
    assert result["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest(), f"lock hash: {result}"
    assert result["remote"] == f"s3://{bucket}/dvc" and result["endpoint"] == s3.endpoint_url, result
    stored = s3_client(s3.endpoint_url).list_objects_v2(Bucket=bucket, Prefix="dvc/").get("KeyCount", 0)
    assert result["pushed"] > 0 and stored >= result["pushed"], f"pushed {result['pushed']}, bucket holds {stored}"
    assert artifact_hashes(src) == before, "version() must not change the artifacts it versions"
    assert os.readlink(src / "reports" / "latest") == "r1", "reports/latest must survive dvc commit"
    assert "endpointurl" in (src / ".dvc" / "config.local").read_text(), "remote goes to config.local"

    again = version(params, Workspace(src))
    assert again["pushed"] == 0 and again["lock_sha256"] == result["lock_sha256"], \
        f"a second version() of the same outputs must push nothing and keep dvc.lock: {again}"

    dst = tmp_path / "dst"
    subprocess.run([*GIT, "clone", "-q", str(src), str(dst)], check=True)
    shutil.copy2(lock, dst / "dvc.lock")
    fetched = pull(Workspace(dst), params)

    expected = {k: v for k, v in before.items() if not k.startswith(NOT_ARTIFACTS)}
    got = artifact_hashes(dst)
    assert got == expected, (f"pulled artifacts differ: missing {sorted(set(expected) - set(got))}, "
                             f"extra {sorted(set(got) - set(expected))}, "
                             f"changed {sorted(k for k in expected if k in got and got[k] != expected[k])}")
    assert fetched["fetched"] > 0, f"pull() should report fetched files: {fetched}"
    assert not (dst / "reports" / "latest").exists(), \
        "reports/latest is .dvcignored (DVC does not version directory symlinks); pull must not invent it"


def test_unreachable_endpoint_fails_fast_and_changes_nothing(tmp_path, bucket):
    src = make_project(tmp_path / "src")
    before = artifact_hashes(src)
    url = f"http://127.0.0.1:{closed_port()}"

    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as err:
        version(params_for(url, bucket), Workspace(src))
    elapsed = time.monotonic() - start

    assert "version.endpoint_url" in str(err.value) and url in str(err.value), f"unclear error: {err.value}"
    assert elapsed < 5, f"an unreachable endpoint took {elapsed:.1f} s to report; expected a few seconds"
    assert not (src / "dvc.lock").exists(), "a failed version() must not write dvc.lock"
    assert not (src / ".dvc" / "config.local").exists(), "a failed version() must not configure the remote"
    assert artifact_hashes(src) == before, "a failed version() must not touch the artifacts"


def test_missing_output_is_named_before_anything_is_recorded(tmp_path, s3, bucket):
    src = make_project(tmp_path / "src")
    shutil.rmtree(src / "artifacts" / "quality")

    with pytest.raises(DvcError) as err:
        version(params_for(s3.endpoint_url, bucket), Workspace(src))

    assert "artifacts/quality" in str(err.value) and "validate" in str(err.value), \
        f"the error should name the missing output and its stage: {err.value}"
    assert not (src / "dvc.lock").exists(), "a refused version() must not write dvc.lock"


def test_workspace_that_is_not_a_dvc_project_is_refused(tmp_path, s3, bucket):
    with pytest.raises(DvcError, match="expected a DVC project"):
        version(params_for(s3.endpoint_url, bucket), Workspace(tmp_path))


def test_check_endpoint_creates_a_missing_bucket(s3, bucket):
    client = s3_client(s3.endpoint_url)

    def names() -> set[str]:
        return {b["Name"] for b in client.list_buckets()["Buckets"]}

    assert bucket not in names(), "the test bucket should not exist yet"

    with pytest.raises(StorageError, match=bucket):
        check_endpoint(s3.endpoint_url, bucket, create=False)
    assert bucket not in names(), "create=False must not create the bucket"

    check_endpoint(s3.endpoint_url, bucket, create=True)
    assert bucket in names(), "create=True must create the missing bucket"
    check_endpoint(s3.endpoint_url, bucket, create=True)  # an existing bucket is fine


def test_moto_server_stops_cleanly():
    server = MotoServer().start()
    url = server.endpoint_url
    check_endpoint(url, "costopt-stop-test", create=True)
    server.stop()
    with pytest.raises(EndpointUnreachableError, match="version.endpoint_url"):
        check_endpoint(url, "costopt-stop-test", create=False, timeout_s=1)


def test_moto_server_on_a_taken_port_fails_with_its_log(s3):
    with pytest.raises(StorageError, match="in use") as err:
        MotoServer(port=int(s3.endpoint_url.rsplit(":", 1)[1])).start()
    assert "exited" in str(err.value), f"the error should say the server exited: {err.value}"


def test_parse_s3_url():
    bucket, prefix = parse_s3_url("s3://costopt-artifacts/dvc/runs/")
    assert (bucket, prefix) == ("costopt-artifacts", "dvc/runs"), f"got {(bucket, prefix)}"
    assert parse_s3_url("s3://costopt-artifacts").url == "s3://costopt-artifacts", "a bare bucket round-trips"
    for bad in ("costopt-artifacts/dvc", "file:///tmp/remote", "s3://A_B/dvc", "s3:///dvc"):
        with pytest.raises(StorageError, match="version.remote"):
            parse_s3_url(bad)


def test_failing_dvc_command_quotes_dvc_and_records_nothing(tmp_path, s3, bucket):
    src = make_project(tmp_path / "src")
    with open(src / "dvc.yaml", "a") as fh:  # a stage without `cmd`: dvc rejects the whole file
        fh.write("  broken:\n    command: 'true'\n")
    before = artifact_hashes(src)

    with pytest.raises(DvcError) as err:
        version(params_for(s3.endpoint_url, bucket), Workspace(src))

    assert "validation failed" in str(err.value) and "broken" in str(err.value), \
        f"the error should quote dvc's own message: {err.value}"
    assert not (src / "dvc.lock").exists(), "a failed dvc command must not leave a dvc.lock"
    assert artifact_hashes(src) == before, "a failed dvc command must not touch the artifacts"


def test_deploy_fetches_missing_weights_from_the_remote(tmp_path, s3, bucket):
    from tasks.deploy import DeployError, DeployStorageFault, ensure_local

    src = make_project(tmp_path / "src")
    params = params_for(s3.endpoint_url, bucket)
    version(params, Workspace(src))
    dst = tmp_path / "dst"
    subprocess.run([*GIT, "clone", "-q", str(src), str(dst)], check=True)
    shutil.copy2(src / "dvc.lock", dst / "dvc.lock")
    ws = Workspace(dst)
    assert ensure_local(params, ws, ["fp32", "x"]) == ["fp32", "x"], "both were missing and fetched"
    for rel in ("artifacts/model/model.safetensors", "artifacts/variants/x/model.safetensors"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), f"{rel} differs from the versioned one"
    assert ensure_local(params, ws, ["fp32", "x"]) == [], "present weights are not fetched again"
    with pytest.raises(DeployError, match=r"still missing: .*variants/never_versioned/model.safetensors"):
        ensure_local(params, ws, ["never_versioned"])
    offline = params_for(f"http://127.0.0.1:{closed_port()}", bucket)
    (dst / "artifacts/variants/x/model.safetensors").unlink()
    with pytest.raises(DeployStorageFault, match="variants x: no weights .* fetching them from the DVC remote"):
        ensure_local(offline, ws, ["x"])  # an endpoint that does not answer may come back: the DAG retries
