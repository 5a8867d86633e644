"""S3 storage for the DVC remote: reach the endpoint, make the bucket, run moto_server on loopback.

The artifact remote is S3 (AWS, MinIO, or `moto_server` on 127.0.0.1 for the demo and the tests). This
module checks, before anything is pushed, that the endpoint in `params.yaml` (`version.endpoint_url`)
answers and holds the bucket, and starts a throwaway moto_server when asked:

    with MotoServer() as s3:                  # port 0: the server picks a free port
        check_endpoint(s3.endpoint_url, "costopt-artifacts", create=True)

A loopback endpoint with no AWS credentials configured gets dummy ones ("testing", us-east-1); they
are passed explicitly to boto3 and to child processes, never written into `os.environ`.
"""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

DUMMY_REGION = "us-east-1"  # moto's default; CreateBucket there needs no LocationConstraint
_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_NETWORK_PROVIDERS = ("iam-role", "container-role")  # metadata lookups; would hang without a network


class StorageError(RuntimeError):
    """The S3 endpoint, bucket or remote URL is unusable. The message names the params field."""


class TransientStorageError(RuntimeError):
    """A storage fault that may pass: a timeout, a 5xx, a connection reset or refused. The DAG's tasks
    let it through so Airflow retries them with back-off; everything else about storage (a bad bucket
    name, denied credentials) is a user error that fails at once."""


class EndpointUnreachableError(StorageError, TransientStorageError):
    """Nothing answers S3 requests at the endpoint (refused, timed out, bad host or URL)."""


class EndpointFaultError(StorageError, TransientStorageError):
    """The endpoint answered with a server error (5xx, SlowDown): it may answer properly later."""


# What a transient fault looks like in boto3's, s3fs's and dvc's messages, and what a user error looks
# like (checked first: a denied request is not retried even if a 5xx was seen on the way).
_PERMANENT = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "InvalidBucketName",
              "403 Forbidden", "(403)", "Forbidden", "NoCredentials", "Unable to locate credentials")
_TRANSIENT = ("timed out", "Timeout", "TimeoutError", "Connection reset", "ConnectionReset", "Connection refused",
              "ConnectionRefused", "Connection aborted", "ConnectionClosedError", "EndpointConnectionError",
              "Connection was closed", "Could not connect", "Cannot connect to host", "ServerDisconnected", "ClientOSError",
              "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Bad Gateway", "Gateway Timeout",
              "500 Internal Server Error", "(500)", "(502)", "(503)", "(504)", "Broken pipe", "RemoteDisconnected")
# (bare status digits would match object hashes in dvc's messages: only the bracketed codes count)


def is_transient(message: str) -> bool:
    """Whether a storage failure's text reads as a fault that may pass (see `TransientStorageError`)."""
    text = message.lower()
    return not any(m.lower() in text for m in _PERMANENT) and any(m.lower() in text for m in _TRANSIENT)


class S3Url(NamedTuple):
    """`s3://bucket/prefix`, split; a tuple, so `bucket, prefix = parse_s3_url(url)` works too."""
    bucket: str
    prefix: str  # "" for the bucket root, no leading or trailing slash

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules, minus dotted IPs


def parse_s3_url(url: str, field: str = "version.remote") -> S3Url:
    """Split `s3://bucket/prefix` into its bucket and prefix; a malformed URL names `field`."""
    parsed = urlparse(url or "")
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{field}: expected an S3 URL such as s3://bucket/prefix, got {url!r}")
    if not _BUCKET.match(parsed.netloc):
        raise StorageError(f"{field}: bucket {parsed.netloc!r} is not a valid S3 bucket name "
                           "(3-63 characters: lowercase letters, digits, '.' and '-')")
    return S3Url(parsed.netloc, parsed.path.strip("/"))


def is_loopback(endpoint_url: str) -> bool:
    host = urlparse(endpoint_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _credentials_configured() -> bool:
    """True when env vars, ~/.aws files or a profile give credentials (instance metadata is not asked)."""
    import botocore.session

    session = botocore.session.Session()
    resolver = session.get_component("credential_provider")
    for name in _NETWORK_PROVIDERS:
        resolver.remove(name)
    return resolver.load_credentials() is not None


def credentials_env(endpoint_url: str) -> dict[str, str]:
    """AWS variables to add for this endpoint: dummy ones for an unconfigured loopback server, else none."""
    if not endpoint_url or not is_loopback(endpoint_url) or _credentials_configured():
        return {}
    env = dict(_DUMMY_CREDENTIALS)
    if not (os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")):
        env["AWS_DEFAULT_REGION"] = DUMMY_REGION
    return env


def s3_client(endpoint_url: str, timeout_s: float = 3.0):
    """A boto3 S3 client with short timeouts and no retries, so a dead endpoint fails in seconds."""
    import boto3
    from botocore.config import Config

    extra = credentials_env(endpoint_url)
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or None, config=config,
        aws_access_key_id=extra.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=extra.get("AWS_SECRET_ACCESS_KEY"),
        region_name=extra.get("AWS_DEFAULT_REGION"))


def _unreachable(endpoint_url: str, exc: Exception) -> EndpointUnreachableError:
    where = endpoint_url or "AWS S3 (empty endpoint)"
    return EndpointUnreachableError(
        f"version.endpoint_url: cannot reach the S3 endpoint {where} ({type(exc).__name__}: {exc}); "
        "expected a running S3-compatible server there (start moto_server or MinIO, or fix the URL "
        "in params.yaml)")


def check_endpoint(endpoint_url: str, bucket: str, create: bool, timeout_s: float = 3) -> None:
    """Fail fast unless `endpoint_url` answers S3 requests and holds `bucket` (made if `create`).

    Raises EndpointUnreachableError when nothing answers, StorageError for a missing bucket (with
    create=False), refused access or missing credentials."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     NoCredentialsError)

    try:
        client = s3_client(endpoint_url, timeout_s)
        client.head_bucket(Bucket=bucket)
        return
    except (BotoConnectionError, ValueError) as exc:  # refused, timed out, bad host; ValueError: bad URL
        raise _unreachable(endpoint_url, exc) from exc
    except NoCredentialsError as exc:
        raise StorageError(f"version.endpoint_url: no AWS credentials for {endpoint_url or 'AWS S3'}; "
                           "expected AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or code.startswith("5") or code in ("InternalError", "ServiceUnavailable", "SlowDown"):
            raise EndpointFaultError(f"version.endpoint_url: {endpoint_url or 'AWS S3'} answered HEAD on bucket "
                                     f"{bucket!r} with a server error ({code}); retrying later may succeed") from exc
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"version.endpoint_url: {endpoint_url or 'AWS S3'} refused HEAD on bucket "
                               f"{bucket!r} ({code}: {exc}); expected access with the configured "
                               "credentials") from exc
    except BotoCoreError as exc:
        raise _unreachable(endpoint_url, exc) from exc
    if not create:
        raise StorageError(f"version.remote: bucket {bucket!r} does not exist at "
                           f"{endpoint_url or 'AWS S3'}; expected an existing bucket")
    _create_bucket(client, endpoint_url, bucket)


def _create_bucket(client, endpoint_url: str, bucket: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    region = client.meta.region_name
    kwargs = {} if region in (None, "us-east-1", "aws-global") else {
        "CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **kwargs)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code != "BucketAlreadyOwnedByYou":  # a concurrent creator won the race: fine
            raise StorageError(f"version.remote: cannot create bucket {bucket!r} at "
                               f"{endpoint_url or 'AWS S3'} ({code}: {exc})") from exc
    except BotoCoreError as exc:
        raise _unreachable(endpoint_url, exc) from exc


class MotoServer:
    """A real S3-compatible HTTP server (`moto_server`) on 127.0.0.1, in a child process.

    Port 0 lets the server bind any free port; the port it got is read from its log, so two servers
    never race for one port. Use it as a context manager, or call start() and stop().
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", start_timeout_s: float = 20.0,
                 stop_timeout_s: float = 5.0):
        self.host, self.port = host, port
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self._proc: subprocess.Popen | None = None
        self._logdir: tempfile.TemporaryDirectory | None = None

    @property
    def endpoint_url(self) -> str:
        if self._proc is None:
            raise StorageError("MotoServer: not started; call start() or use it in a `with` block")
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._logdir is not None, "MotoServer: not started"
        return Path(self._logdir.name) / "moto_server.log"

    def start(self) -> "MotoServer":
        if self._proc is not None:
            return self
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise StorageError(f"MotoServer: {exe} not found; expected moto[server] installed in this "
                               "Python environment (pip install 'moto[server]')")
        self._logdir = tempfile.TemporaryDirectory(prefix="costopt-moto-")
        with open(self.log_path, "wb") as log:  # a file, not a pipe: an undrained pipe would stall the server
            self._proc = subprocess.Popen([str(exe), "-H", self.host, "-p", str(self.port)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Wait for the server's own "Running on ...:<port>" line (printed once it has bound the port,
        so another server already on that port is never mistaken for ours), then for an HTTP answer."""
        deadline = time.monotonic() + self.start_timeout_s
        bound = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StorageError(f"MotoServer: moto_server exited with code {self._proc.returncode} "
                                   f"before answering on {self.host}:{self.port}; its log:\n{self._log_tail()}")
            if bound is None:
                found = re.search(r"Running on https?://[^\s:]+:(\d+)", self._log_tail(10_000))
                bound = int(found.group(1)) if found else None
            if bound is not None and self._answers(bound):
                self.port = bound
                return
            time.sleep(0.05)
        raise StorageError(f"MotoServer: no answer on {self.host}:{bound or self.port} within "
                           f"{self.start_timeout_s:.0f} s; its log:\n{self._log_tail()}")

    def _answers(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{port}/", timeout=1) as resp:
                return resp.status < 500
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:  # refused or timed out (URLError is an OSError)
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
