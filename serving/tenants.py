"""Who may do what on the server: tenants from API keys, priority ceilings, quotas, the admin key.

The trust boundary is one ASGI middleware, `Guard`, in front of every route (costopt's and KServe's):

- **Admin routes** (anything that changes what serves: `POST /v2/repository/...` load, unload, index;
  the gateway's rollout, `/v2/rollout...`; and the shadow judgements of `POST /v2/compare`) need `Authorization: Bearer <admin key>`, always, open mode included. The admin key comes from
  `COSTOPT_ADMIN_KEY` or a file; when neither exists the server generates one at first start into a
  file only its user can read (mode 0600, as Jupyter does with its token) and the deploy phase reads it
  from there (`costopt.storage.layout.Workspace.admin_key_file`). 401 without a key, 403 with a tenant's.
- **Inference routes** (everything else that is not a read of health, metadata or metrics): with tenant
  keys configured (`--keys FILE` or `COSTOPT_TENANT_KEYS`), the key names the tenant; an unknown or
  missing key is a 401. Without tenant keys the routes are open, as before, and the server says so at
  start (and refuses to listen beyond loopback that way unless `--allow_open` says so).
- **Priority is granted, not claimed.** Each tenant has a ceiling; a request asking for more is served
  at the ceiling (not refused: a client that always sends `high` still gets served) and the response
  says what it got in `x-costopt-priority-granted`. The middleware rewrites `x-costopt-priority` and
  `x-costopt-tenant` before any handler reads them, so every route downstream sees granted values only.
- **Quotas.** Per tenant, a token bucket (`rate` requests/s, `burst`) and a concurrency limit
  (`max_concurrent` requests in flight, streams included until their last byte); over either, a 429
  with `Retry-After` (the bucket's refill time; 1 s for concurrency) naming the tenant's limit.

Keys are compared by SHA-256 digest; a keys file may hold `sha256:<hex>` digests instead of keys
(`python -m serving.tenants new-key` prints a key and its digest). A keys file:

    defaults: {max_priority: normal, rate: 20, burst: 40, max_concurrent: 16}
    tenants:
      search-team: {keys: ["sha256:9f86d0...", "..."], max_priority: high}
      batch-jobs:  {keys: ["..."], max_priority: low, rate: 2, max_concurrent: 4}

Why our own: KServe 0.21 leaves authentication to the ingress (Istio, Knative) and has none in the
model server; FastAPI's `HTTPBearer` only parses the header; rate-limit libraries (slowapi, limits) key
on the client address, not a tenant, have no concurrency limit and cannot rewrite the priority a
request claims. The whole check is a dict lookup and a few arithmetic steps per request.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from serving.admission import Priority

ENV_KEYS = "COSTOPT_TENANT_KEYS"  # a keys file's path, or inline "tenant=key,tenant=key"
ENV_ADMIN = "COSTOPT_ADMIN_KEY"
ADMIN_TENANT = "admin"  # the admin key also serves inference, at any priority, without quota
OPEN_TENANT = "open"  # open mode's one tenant; a client's x-costopt-tenant is kept as a log label only
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
_PUBLIC_GET = ("/", "/v2", "/v2/", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


class ConfigError(ValueError):
    """A keys file or key setting that cannot be used; the message names the field and what was expected."""


@dataclass(frozen=True)
class Quota:
    max_priority: Priority = Priority.NORMAL
    rate: float | None = 20.0  # requests per second, refilled continuously; None: no rate limit
    burst: int | None = 40  # bucket size (requests at once after a quiet spell); None: max(1, ceil(rate))
    max_concurrent: int | None = 16  # requests in flight at once; None: no limit

    def describe(self) -> str:
        rate = "no rate limit" if self.rate is None else f"{self.rate:g} req/s (burst {self.bucket_size()})"
        conc = "no concurrency limit" if self.max_concurrent is None else f"{self.max_concurrent} in flight"
        return f"priority up to {self.max_priority.name.lower()}, {rate}, {conc}"

    def bucket_size(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate or 1))


UNLIMITED = Quota(max_priority=Priority.HIGH, rate=None, burst=None, max_concurrent=None)


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _quota(raw: Any, where: str, base: Quota) -> Quota:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"keys", "max_priority", "rate", "burst", "max_concurrent"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected keys, max_priority, rate, burst, "
                          f"max_concurrent")
    values: dict[str, Any] = {}
    if "max_priority" in raw:
        try:
            values["max_priority"] = Priority.parse(raw["max_priority"])
        except ValueError:
            raise ConfigError(f"{where}.max_priority: expected high, normal or low, got {raw['max_priority']!r}") \
                from None
    for name, kind, lo in (("rate", float, 0.0), ("burst", int, 1), ("max_concurrent", int, 1)):
        if name not in raw:
            continue
        v = raw[name]
        ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and v >= lo and (v > 0 if kind is float else float(v).is_integer()))
        if not ok:
            what = "a number > 0" if kind is float else f"an integer >= {lo}"
            raise ConfigError(f"{where}.{name}: expected {what} or null (no limit), got {v!r}")
        values[name] = None if v is None else kind(v)
    return Quota(**{**base.__dict__, **values})


@dataclass
class TenantKeys:
    """Key digests -> tenants, from a keys file or `COSTOPT_TENANT_KEYS`."""
    by_digest: dict[str, Tenant] = field(default_factory=dict)
    source: str = ""

    @property
    def tenants(self) -> list[Tenant]:
        return sorted({t.name: t for t in self.by_digest.values()}.values(), key=lambda t: t.name)

    def lookup(self, key: str) -> Tenant | None:
        return self.by_digest.get(digest(key))

    def _add(self, tenant: Tenant, key: str, where: str) -> None:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: expected a string, got {type(key).__name__}")
        m = _DIGEST.match(key)
        if m is None:
            if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS and _KEY.match(key)):
                raise ConfigError(f"{where}: expected a key of {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII "
                                  f"characters without spaces, or 'sha256:<64 hex digits>'")
        d = m.group(1) if m else digest(key)
        other = self.by_digest.get(d)
        if other is not None and other.name != tenant.name:
            raise ConfigError(f"{where}: the same key is also listed for tenant {other.name!r}; a key names one tenant")
        self.by_digest[d] = tenant

    @classmethod
    def parse(cls, doc: Any, source: str) -> TenantKeys:
        if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict) or not doc["tenants"]:
            raise ConfigError(f"{source}: expected a mapping with a non-empty 'tenants' mapping "
                              f"(tenant name -> {{keys: [...], max_priority, rate, burst, max_concurrent}})")
        unknown = set(doc) - {"tenants", "defaults"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level field(s) {sorted(unknown)}; expected tenants, defaults")
        base = _quota(doc.get("defaults") or {}, f"{source}: defaults", Quota())
        if "keys" in (doc.get("defaults") or {}):
            raise ConfigError(f"{source}: defaults.keys: keys belong to a tenant, not to the defaults")
        out = cls(source=source)
        for name, raw in doc["tenants"].items():
            where = f"{source}: tenants.{name}"
            if not isinstance(name, str) or not _TENANT.match(name) or name in (ADMIN_TENANT, OPEN_TENANT):
                raise ConfigError(f"{where}: a tenant name is 1 to 64 letters, digits, _ . - (and not "
                                  f"{ADMIN_TENANT!r} or {OPEN_TENANT!r}), got {name!r}")
            tenant = Tenant(name, _quota(raw, where, base))
            keys = raw.get("keys")
            if not isinstance(keys, list) or not keys:
                raise ConfigError(f"{where}.keys: expected a non-empty list of keys or sha256 digests")
            for i, key in enumerate(keys):
                out._add(tenant, key, f"{where}.keys[{i}]")
        return out

    @classmethod
    def from_file(cls, path: Path) -> TenantKeys:
        import yaml

        _check_private(path, "keys file")
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"keys file {path}: cannot read it ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"keys file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.parse(doc, f"keys file {path}")

    @classmethod
    def from_env(cls, value: str) -> TenantKeys:
        """`COSTOPT_TENANT_KEYS`: a keys file's path, or `tenant=key[,tenant=key...]` (default quotas)."""
        if "=" not in value:
            return cls.from_file(Path(value))
        tenants: dict[str, dict[str, list[str]]] = {}
        for i, pair in enumerate(value.split(",")):
            name, sep, key = pair.strip().partition("=")
            if not sep or not name or not key:
                raise ConfigError(f"{ENV_KEYS}: item {i} is not 'tenant=key' (expected tenant=key[,tenant=key...] "
                                  f"or a keys file's path)")
            tenants.setdefault(name, {"keys": []})["keys"].append(key)
        return cls.parse({"tenants": tenants}, ENV_KEYS)


def _check_private(path: Path, what: str) -> None:
    """Refuse a secrets file others can read, as ssh does with a private key."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"{what} {path}: readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"`chmod 600 {path}`")


def load_keys(path: Path | None) -> TenantKeys | None:
    """`--keys FILE` wins over `COSTOPT_TENANT_KEYS`; neither: None (open mode)."""
    if path is not None:
        return TenantKeys.from_file(path)
    env = os.environ.get(ENV_KEYS, "").strip()
    return TenantKeys.from_env(env) if env else None


def admin_key(path: Path) -> tuple[str, str]:
    """(admin key, where it came from): `COSTOPT_ADMIN_KEY`, else `path`, created on first start (mode 0600)."""
    env = os.environ.get(ENV_ADMIN, "").strip()
    if env:
        if not (MIN_KEY_CHARS <= len(env) <= MAX_KEY_CHARS and _KEY.match(env)):
            raise ConfigError(f"{ENV_ADMIN}: expected {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters "
                              f"without spaces")
        return env, ENV_ADMIN
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another server of this workspace wrote it first: use theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
            return key, f"{path} (generated)"
    _check_private(path, "admin key file")
    key = path.read_text(encoding="utf-8").strip()
    if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS and _KEY.match(key)):
        raise ConfigError(f"admin key file {path}: expected one key of {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable "
                          f"ASCII characters; delete the file to have a new one generated")
    return key, str(path)


def is_loopback(host: str) -> bool:
    """Whether `--host` is a loopback address (the same test as the S3 endpoint's)."""
    from costopt.storage.s3 import is_loopback as url_is_loopback

    return url_is_loopback(f"http://[{host}]" if ":" in host else f"http://{host}")


class TokenBucket:
    def __init__(self, rate: float, size: int, now: float) -> None:
        self.rate, self.size, self.tokens, self.at = rate, size, float(size), now

    def take(self, now: float) -> float:
        """0 and one token taken, or the seconds until a token is there (nothing taken)."""
        self.tokens = min(self.size, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class OverQuota(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Quotas:
    """Each tenant's bucket and in-flight count (one event loop: no locks)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[str, int] = {}

    def enter(self, tenant: Tenant) -> None:
        q, name = tenant.quota, tenant.name
        if q.max_concurrent is not None and self.in_flight.get(name, 0) >= q.max_concurrent:
            raise OverQuota(f"tenant {name!r}: {q.max_concurrent} requests in flight, its concurrency limit; "
                            f"retry when one has finished", 1.0)
        if q.rate is not None:
            now = self.clock()
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(q.rate, q.bucket_size(), now)
            wait = bucket.take(now)
            if wait > 0:
                raise OverQuota(f"tenant {name!r}: over its rate limit of {q.rate:g} requests/s (burst "
                                f"{q.bucket_size()}); retry after {math.ceil(wait)} s", wait)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def leave(self, tenant: Tenant) -> None:
        self.in_flight[tenant.name] -= 1


_ADMIN_PATHS = ("/v2/compare", "/v2/rollout", "/v2/rollout/canary")  # shadow judgements; the gateway's rollout


def _route(method: str, path: str) -> str:
    """'admin', 'public' (reads of health, metadata, metrics, docs) or 'tenant' (everything else)."""
    if path.startswith("/v2/repository") or path in _ADMIN_PATHS:
        return "admin"
    if method in ("GET", "HEAD") and (path in _PUBLIC_GET or path.startswith(("/v2/health/", "/v2/models/",
                                                                               "/v1/models"))):
        return "public"
    return "tenant"


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_CHARS:
        return ""  # present but unusable: treated as a wrong key
    return token


class Guard:
    """ASGI middleware: authenticate, grant the priority, apply the quota; see the module docstring."""

    def __init__(self, app: Any, keys: TenantKeys | None, admin: str, quotas: Quotas | None = None) -> None:
        self.app, self.keys, self.admin, self.quotas = app, keys, admin, quotas or Quotas()
        self._admin_tenant = Tenant(ADMIN_TENANT, UNLIMITED)
        self._open_tenant = Tenant(OPEN_TENANT, UNLIMITED)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        kind = _route(scope["method"], scope["path"])
        if kind == "public":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        token = _bearer(headers)
        is_admin = bool(token) and hmac.compare_digest(token.encode(), self.admin.encode())
        if kind == "admin":
            if is_admin:
                return await self.app(scope, receive, send)
            tenant = self.keys.lookup(token) if (self.keys and token) else None
            if tenant is not None:
                return await _refuse(send, 403, f"{scope['path']}: tenant {tenant.name!r} may not change what "
                                                f"serves; this route needs the admin key", "permission_error")
            return await _refuse(send, 401, f"{scope['path']}: needs `Authorization: Bearer <admin key>`; the "
                                            f"server wrote or read its admin key at start (its log says where)",
                                 "authentication_error", auth=True)
        if is_admin:
            tenant = self._admin_tenant
        elif self.keys is None:
            tenant = self._open_tenant
        elif not token:
            return await _refuse(send, 401, "Authorization: this server needs an API key "
                                            "(`Authorization: Bearer <key>`)", "authentication_error", auth=True)
        else:
            tenant = self.keys.lookup(token)
            if tenant is None:
                return await _refuse(send, 401, "Authorization: not a valid API key", "authentication_error",
                                     auth=True)
        try:
            self.quotas.enter(tenant)
        except OverQuota as exc:
            return await _refuse(send, 429, str(exc), "rate_limit_exceeded",
                                 headers=[(b"retry-after", str(max(1, math.ceil(exc.retry_after_s))).encode())])
        try:
            granted = self._grant(scope, headers, tenant)
            await self.app(scope, receive, _with_header(send, granted))
        finally:
            self.quotas.leave(tenant)

    def _grant(self, scope: dict, headers: dict[bytes, bytes], tenant: Tenant) -> bytes | None:
        """Rewrite x-costopt-priority (capped at the ceiling) and x-costopt-tenant in place; the granted
        priority's name, or None when the request's header is unreadable (the route's own 400 says why)."""
        asked = headers.get(b"x-costopt-priority")
        try:
            priority = Priority.parse(None if asked is None else asked.decode("latin-1"))
        except ValueError:
            return None
        granted = max(priority, tenant.quota.max_priority)  # HIGH = 0: the larger value is the lower priority
        out = [(k, v) for k, v in scope["headers"] if k != b"x-costopt-priority" and
               (k != b"x-costopt-tenant" or tenant.name == OPEN_TENANT)]
        out.append((b"x-costopt-priority", granted.name.lower().encode()))
        if tenant.name != OPEN_TENANT:  # a keyed tenant's name replaces whatever the client wrote
            out.append((b"x-costopt-tenant", tenant.name.encode()))
        scope["headers"] = out
        return granted.name.lower().encode()


def _with_header(send: Any, granted: bytes | None) -> Any:
    if granted is None:
        return send

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"x-costopt-priority-granted", granted)]}
        await send(message)
    return wrapped


async def _refuse(send: Any, status: int, message: str, type_: str, auth: bool = False,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """The OpenAI-shaped error every route answers with (`serving.protocol.ApiError`), sent from here because
    the request never reaches a route."""
    from serving.protocol import ApiError

    param = "authorization" if status in (401, 403) else None
    body = json.dumps(ApiError(status, message, param=param, type_=type_).body()).encode()
    extra = [(b"www-authenticate", b"Bearer")] if auth else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.tenants new-key`: print a new API key and the digest line for a keys file."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["new-key"]:
        print("usage: python -m serving.tenants new-key", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    print(f"key:    {key}\ndigest: sha256:{digest(key)}   (put this in the keys file; give the key to the tenant)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
