"""Storage faults lose nothing: the version phase against a real S3 endpoint (moto_server) behind a
fault-injecting proxy (tests/faultproxy.py), with the real dvc CLI.

Each test versions a fake pipeline run once (lock L1, every object in the remote), changes an
artifact, injects a fault during the next version run and checks: the run fails with a transient
error naming the endpoint (Airflow retries it), dvc.lock is still L1, the artifacts on disk are
untouched, no object the remote held is gone; then the fault clears and the retry succeeds with every
object of the new lock in the remote (pulled back bit for bit into a fresh clone in the first test).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
import uuid

import pytest

from costopt.storage.dvc import DvcTransientError, dvc_env, run_dvc
from costopt.storage.layout import Workspace
from costopt.storage.s3 import EndpointFaultError, MotoServer, TransientStorageError, s3_client
from faultproxy import FaultProxy
from tasks.version import SAVED_LOCK, pull, version
from test_version import GIT, artifact_hashes, make_project, params_for

CHANGED = "artifacts/variants/x/model.safetensors"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def proxy(moto):
    with FaultProxy(moto.endpoint_url) as p:
        yield p


def _lock_sha(root) -> str:
    return hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()


def _objects(endpoint: str, bucket: str) -> dict[str, str]:
    client = s3_client(endpoint)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def _first_run(tmp_path, proxy, moto, **timeouts):
    src = make_project(tmp_path / "src")
    bucket = f"costopt-fault-{uuid.uuid4().hex[:10]}"
    params = params_for(proxy.endpoint_url, bucket)
    if timeouts:
        params = dataclasses.replace(params, version=dataclasses.replace(params.version, **timeouts))
    version(params, Workspace(src))
    before = {"lock": _lock_sha(src), "objects": _objects(moto.endpoint_url, bucket)}
    (src / CHANGED).write_bytes(b"a new variant's weights " * 4000)
    before["artifacts"] = artifact_hashes(src)
    return src, bucket, params, before


def _check_nothing_lost(src, moto, bucket, before, exc) -> None:
    assert isinstance(exc, TransientStorageError), f"a transient fault, retried by Airflow: {exc!r}"
    assert _lock_sha(src) == before["lock"], "dvc.lock is the one from before the failed run"
    assert not (src / SAVED_LOCK).exists(), "the kept copy of the lock is gone once it is put back"
    assert artifact_hashes(src) == before["artifacts"], "the artifacts on disk are untouched"
    now = _objects(moto.endpoint_url, bucket)
    lost = {k for k, etag in before["objects"].items() if now.get(k) != etag}
    assert not lost, f"objects lost or changed in the remote: {sorted(lost)}"


def _check_complete(src, params) -> None:
    """Every object the (new) lock names is in the remote: `dvc status --cloud` has nothing to push."""
    env = dvc_env(params.version.endpoint_url)
    status = json.loads(run_dvc(src, ["status", "--cloud", "--json", "--remote", "costopt"], env) or "{}")
    assert status == {}, f"objects of dvc.lock missing from the remote: {status}"


def test_endpoint_stops_in_the_middle_of_a_push(tmp_path, proxy, moto):
    src, bucket, params, before = _first_run(tmp_path, proxy, moto)
    proxy.stop_after_puts(1)  # the first object goes in, then the endpoint dies
    with pytest.raises(DvcTransientError) as info:
        version(params, Workspace(src))
    message = str(info.value)
    assert proxy.endpoint_url in message and f"{CHANGED} (md5 " in message, message[:800]
    _check_nothing_lost(src, moto, bucket, before, info.value)

    proxy.heal()  # the endpoint is back: Airflow's retry runs the phase again
    result = version(params, Workspace(src))
    assert _lock_sha(src) != before["lock"] and result["lock_sha256"] == _lock_sha(src)
    _check_complete(src, params)
    dst = tmp_path / "dst"
    subprocess.run([*GIT, "clone", "-q", str(src), str(dst)], check=True)
    shutil.copy2(src / "dvc.lock", dst / "dvc.lock")
    pull(Workspace(dst), params)
    assert (dst / CHANGED).read_bytes() == (src / CHANGED).read_bytes(), "the retried push is complete"


def test_endpoint_answers_500_for_a_while_then_recovers(tmp_path, proxy, moto):
    src, bucket, params, before = _first_run(tmp_path, proxy, moto)
    proxy.error_500(10 ** 6)  # every request, the bucket check included
    with pytest.raises(EndpointFaultError) as info:
        version(params, Workspace(src))
    assert "server error" in str(info.value) and proxy.endpoint_url in str(info.value), str(info.value)
    _check_nothing_lost(src, moto, bucket, before, info.value)

    proxy.error_500(10 ** 6, methods=("PUT",))  # the bucket answers, uploads fail
    with pytest.raises(DvcTransientError) as info:
        version(params, Workspace(src))
    assert proxy.answered_500 > 1 and f"{CHANGED} (md5 " in str(info.value), str(info.value)[:800]
    _check_nothing_lost(src, moto, bucket, before, info.value)

    proxy.heal()
    version(params, Workspace(src))
    assert _lock_sha(src) != before["lock"]
    _check_complete(src, params)


def test_endpoint_that_hangs_is_cut_off_by_the_timeout(tmp_path, proxy, moto):
    src, bucket, params, before = _first_run(tmp_path, proxy, moto, timeout_s=12, request_timeout_s=2)
    proxy.hang(methods=("PUT",))  # uploads are read and never answered
    started = time.monotonic()
    with pytest.raises(DvcTransientError) as info:
        version(params, Workspace(src))
    took = time.monotonic() - started
    assert took < 120, f"the timeout fired: the run failed after {took:.0f} s"
    assert "version.timeout_s" in str(info.value) or "timed out" in str(info.value).lower(), str(info.value)[:800]
    _check_nothing_lost(src, moto, bucket, before, info.value)

    proxy.heal()
    version(params, Workspace(src))
    _check_complete(src, params)


def test_a_run_killed_mid_push_is_undone_by_the_next(tmp_path, proxy, moto):
    """A version run killed between `dvc commit` and the end of its push (no `finally` runs) leaves its
    kept lock behind; the next run puts that lock back before anything else, so even when the next run
    fails too, dvc.lock is the last one whose objects all reached the remote."""
    from tasks.version import _save_lock

    src, bucket, params, before = _first_run(tmp_path, proxy, moto)
    _save_lock(Workspace(src))  # what the killed run did before `dvc commit` ...
    (src / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n# the killed run's lock, objects never pushed\n")
    proxy.error_500(10 ** 6, methods=("PUT",))
    with pytest.raises(DvcTransientError) as info:
        version(params, Workspace(src))
    _check_nothing_lost(src, moto, bucket, before, info.value)
    proxy.heal()
    version(params, Workspace(src))
    _check_complete(src, params)


@pytest.mark.parametrize("text, transient", [
    ("Read timeout on endpoint URL", True),
    ("Connection was closed before we received a valid response", True),
    ("An error occurred (InternalError) when calling the PutObject operation", True),
    ("An error occurred (SlowDown) when calling the PutObject operation", True),
    ("Could not connect to the endpoint URL", True),
    ("An error occurred (AccessDenied) when calling the PutObject operation: 503 on the way", False),
    ("An error occurred (NoSuchBucket) when calling the PutObject operation", False),
    ("The AWS Access Key Id you provided does not exist (InvalidAccessKeyId)", False),
    ("ERROR: failed to push data to the cloud - 2 files failed to upload", False),  # says nothing about why
])
def test_transient_or_user_error_from_the_message(text, transient):
    from costopt.storage.s3 import is_transient

    assert is_transient(text) is transient


@pytest.mark.parametrize("field, value", [("timeout_s", 0), ("timeout_s", "60"), ("request_timeout_s", 1e9),
                                          ("request_timeout_s", True)])
def test_bad_storage_timeouts_name_the_field(field, value):
    from costopt.params import ParamsError, VersionParams

    with pytest.raises(ParamsError, match=f"version.{field}"):
        VersionParams(**{field: value}).check("version")


def test_an_object_hash_with_status_digits_is_not_a_server_error():
    from costopt.storage.s3 import is_transient

    assert not is_transient("ERROR: failed to transfer '2c3503e6fa06ebb307edc4f3ce4c5024' - AccessDenied")
    assert not is_transient("ERROR: failed to transfer '5035025045005035025045005035aaaa'")
