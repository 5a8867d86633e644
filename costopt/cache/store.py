"""The semantic cache: three levels, keys that keep tenants and settings apart, a calibrated hit rule.

- **Keys.** A request's `CacheKey` holds the tenant, the model fingerprint, the variant and every
  generation setting that changes the answer, plus the conversation before the last user turn (system
  message included). Together they name a *namespace*; only the last user turn is matched by meaning,
  and only inside its namespace, so a tenant's lookup never even searches another tenant's entries.
- **Levels.** L1 in memory (entries and a usearch HNSW index per namespace), L2 on local disk (one
  JSON file per entry), L3 in S3 (one object per entry, boto3). Every level keeps its own vector index
  of what it holds (L2 and L3 build theirs from their files and listings). A lookup tries L1, then L2,
  then L3; a hit below L1 is promoted (copied up). Stores write through to every level.
- **Hits.** The nearest candidates at or above the calibrated cosine threshold are checked by
  `costopt.cache.verify` against the stored prompt; the first that agrees is served. With
  `store_prompts=False` the prompt text never leaves memory: L2/L3 entries carry only the embedding,
  a salted hash of the normalized prompt and the answer, so below L1 only an exact repeat can hit.
- **Eviction.** Each level has a capacity; the entries with the lowest `popularity x decay` score go
  first: (1 + hits) * 0.5 ** (idle seconds / half-life), the seed's "time decay and popularity". A full
  level drops the lowest 1% of its capacity at once (at least one entry), so the scan over its entries
  runs once per hundred stores.
  Entries older than the TTL are never served and are removed when met. `LruPolicy` is the plain LRU
  it is compared with (BENCHMARKS).
- **Faults.** An unreadable L2 file is skipped, counted and removed; an S3 error is counted and the
  lookup or store goes on without L3. Nothing here raises into a request.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from costopt.cache.calibrate import Setting
from costopt.cache.verify import PhraseSim, verify

LEVELS = ("l1", "l2", "l3")
CANDIDATES = 4  # nearest entries checked per level


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def normalize_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@dataclass(frozen=True)
class CacheKey:
    """Everything but the last user turn that decides an answer."""
    tenant: str
    model: str  # fingerprint of the base model
    variant: str
    params: tuple[tuple[str, Any], ...]  # generation settings, sorted (max_tokens, temperature, stop, ...)
    context: str = ""  # JSON of the messages before the last user turn

    @property
    def namespace(self) -> str:
        return _sha("ns", self.tenant, self.model, self.variant, self.params, self.context)[:32]

    @property
    def tenant_id(self) -> str:
        return _sha("tenant", self.tenant)[:16]


@dataclass
class Entry:
    id: str
    namespace: str
    tenant_id: str
    prompt: str | None  # None where store_prompts is off (L2/L3 copies)
    prompt_hash: str
    vector: np.ndarray
    answer: dict[str, Any]  # {"text", "finish_reason", "usage", "variant", ...}
    created: float
    hits: int = 0
    last_used: float = 0.0

    def to_json(self) -> bytes:
        d = {k: v for k, v in asdict(self).items() if k != "vector"}
        d["vector"] = self.vector.astype(np.float32).tolist()
        return json.dumps(d, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Entry":
        d = json.loads(data)
        vec = np.asarray(d.pop("vector"), dtype=np.float32)
        if vec.ndim != 1 or not np.isfinite(vec).all():
            raise ValueError("vector is not a finite 1-d array")
        e = cls(vector=vec, **d)
        if not isinstance(e.answer, dict) or not isinstance(e.answer.get("text"), str):
            raise ValueError("answer.text missing")
        return e

    def without_prompt(self) -> "Entry":
        return Entry(**{**self.__dict__, "prompt": None})


class Policy(Protocol):
    def score(self, e: Entry, now: float) -> float: ...


@dataclass(frozen=True)
class DecayPolicy:
    """popularity x time decay: (1 + hits) * 0.5 ** (idle / half_life_s); the lowest goes first."""
    half_life_s: float = 600.0

    def score(self, e: Entry, now: float) -> float:
        idle = max(0.0, now - max(e.last_used, e.created))
        return (1 + e.hits) * math.pow(0.5, idle / self.half_life_s)


@dataclass(frozen=True)
class LruPolicy:
    """Least recently used goes first (the baseline the decay policy is measured against)."""

    def score(self, e: Entry, now: float) -> float:
        return max(e.last_used, e.created)


class _Index:
    """usearch HNSW indexes, one per namespace, over unit vectors (cosine)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.by_ns, self.keys, self.ids, self.next = dim, {}, {}, {}, 1

    def add(self, ns: str, entry_id: str, vec: np.ndarray) -> None:
        from usearch.index import Index

        if (ns, entry_id) in self.keys:
            return
        index = self.by_ns.get(ns)
        if index is None:
            index = self.by_ns[ns] = Index(ndim=self.dim, metric="cos", dtype="f32")
        key, self.next = self.next, self.next + 1
        index.add(key, vec.astype(np.float32))
        self.keys[(ns, entry_id)], self.ids[key] = key, (ns, entry_id)

    def remove(self, ns: str, entry_id: str) -> None:
        key = self.keys.pop((ns, entry_id), None)
        if key is not None:
            self.ids.pop(key, None)
            self.by_ns[ns].remove(key)

    def search(self, ns: str, vec: np.ndarray, k: int, min_sim: float) -> list[tuple[str, float]]:
        index = self.by_ns.get(ns)
        if index is None or len(index) == 0:
            return []
        m = index.search(vec.astype(np.float32), min(k, len(index)))
        out = [(self.ids[int(key)][1], 1.0 - float(d)) for key, d in zip(m.keys, m.distances)
               if int(key) in self.ids]
        return [(i, s) for i, s in out if s >= min_sim]

    def drop_namespace(self, ns: str) -> None:
        for (n, entry_id) in [k for k in self.keys if k[0] == ns]:
            self.remove(n, entry_id)


class Level:
    """Entries of one level with their index and capacity; subclasses keep them somewhere."""
    name = "l1"

    def __init__(self, dim: int, capacity: int, policy: Policy, stats: Counter) -> None:
        self.index, self.capacity, self.policy, self.stats = _Index(dim), capacity, policy, stats
        self.meta: dict[tuple[str, str], Entry] = {}  # what the index holds (L2/L3: without a prompt)
        self.lock = threading.RLock()

    # storage, overridden below levels
    def _read(self, e: Entry) -> Entry | None:
        return e

    def _write(self, e: Entry) -> None:
        pass

    def _delete(self, e: Entry) -> None:
        pass

    def _touch(self, e: Entry) -> None:
        pass

    def get(self, ns: str, entry_id: str) -> Entry | None:
        with self.lock:
            e = self.meta.get((ns, entry_id))
        return self._read(e) if e is not None else None

    def search(self, ns: str, vec: np.ndarray, min_sim: float) -> list[tuple[str, float]]:
        with self.lock:
            return self.index.search(ns, vec, CANDIDATES, min_sim)

    def put(self, e: Entry, now: float) -> None:
        with self.lock:
            self._write(e)
            self.meta[(e.namespace, e.id)] = e
            self.index.add(e.namespace, e.id, e.vector)
            if len(self.meta) > self.capacity:
                # the lowest-scored go, 1% of the capacity at once: one pass over the entries per hundred
                # stores instead of one per store (a full 100k-entry L2 would spend ~50 ms a store)
                over = len(self.meta) - self.capacity + self.capacity // 100
                for victim in heapq.nsmallest(over, self.meta.values(), key=lambda x: self.policy.score(x, now)):
                    self.remove(victim)
                    self.stats[f"{self.name}_evictions"] += 1

    def remove(self, e: Entry) -> None:
        with self.lock:
            self.meta.pop((e.namespace, e.id), None)
            self.index.remove(e.namespace, e.id)
            self._delete(e)

    def used(self, e: Entry, now: float) -> None:
        with self.lock:
            held = self.meta.get((e.namespace, e.id))
            if held is not None:
                held.hits, held.last_used = held.hits + 1, now
                self._touch(held)

    def purge_tenant(self, tenant_id: str) -> int:
        with self.lock:
            victims = [e for e in self.meta.values() if e.tenant_id == tenant_id]
            for e in victims:
                self.remove(e)
            return len(victims)

    def __len__(self) -> int:
        return len(self.meta)


class DiskLevel(Level):
    """L2: `root/<tenant>/<namespace>/<id>.json`; an unreadable file is skipped, counted and removed."""
    name = "l2"

    def __init__(self, root: Path, dim: int, capacity: int, policy: Policy, stats: Counter) -> None:
        super().__init__(dim, capacity, policy, stats)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("*/*/*.json")):
            e = self._load(path)
            if e is not None:
                self.meta[(e.namespace, e.id)] = e
                self.index.add(e.namespace, e.id, e.vector)

    def _path(self, e: Entry) -> Path:
        return self.root / e.tenant_id / e.namespace / f"{e.id}.json"

    def _load(self, path: Path) -> Entry | None:
        try:
            e = Entry.from_json(path.read_bytes())
            if path != self._path(e):
                raise ValueError("file name does not match its entry")
            return e
        except (OSError, ValueError, TypeError, KeyError) as exc:  # corrupt: never served
            self.stats["l2_corrupt"] += 1
            path.unlink(missing_ok=True)
            _log(f"cache L2: removed unreadable {path}: {exc}")
            return None

    def _read(self, e: Entry) -> Entry | None:
        got = self._load(self._path(e))
        if got is None:
            with self.lock:
                self.meta.pop((e.namespace, e.id), None)
                self.index.remove(e.namespace, e.id)
        return got

    def _write(self, e: Entry) -> None:
        path = self._path(e)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(e.to_json())
        tmp.replace(path)

    def _delete(self, e: Entry) -> None:
        self._path(e).unlink(missing_ok=True)

    def _touch(self, e: Entry) -> None:
        try:
            self._write(e)
        except OSError:
            self.stats["l2_errors"] += 1


class S3Level(Level):
    """L3: objects `prefix/<tenant>/<namespace>/<id>.json` in a bucket; any S3 error is counted and the
    request goes on without L3."""
    name = "l3"
    REST_S = 30.0

    def __init__(self, client: Any, bucket: str, prefix: str, dim: int, capacity: int, policy: Policy,
                 stats: Counter) -> None:
        super().__init__(dim, capacity, policy, stats)
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.failures, self.failed_at = 0, 0.0
        self.loaded = self._load_listing()

    def _key(self, e: Entry) -> str:
        return f"{self.prefix}/{e.tenant_id}/{e.namespace}/{e.id}.json"

    def _call(self, fn: Callable[[], Any]) -> Any:
        """fn(), or None on any error. After three errors in a row L3 rests for `REST_S` (each call
        skipped and counted), so an endpoint that hangs costs at most a few timeouts, not one per request."""
        if self.failures >= 3 and time.monotonic() - self.failed_at < self.REST_S:
            self.stats["l3_skipped"] += 1
            return None
        try:
            out = fn()
        except Exception as exc:  # botocore errors, timeouts, an endpoint that is gone
            self.stats["l3_errors"] += 1
            self.failures, self.failed_at = self.failures + 1, time.monotonic()
            _log(f"cache L3: {type(exc).__name__}: {exc}")
            return None
        self.failures = 0
        return out

    def _load_listing(self) -> bool:
        def listing() -> list[str]:
            keys, token = [], None
            while True:
                kw = {"Bucket": self.bucket, "Prefix": self.prefix + "/"}
                if token:
                    kw["ContinuationToken"] = token
                page = self.client.list_objects_v2(**kw)
                keys += [o["Key"] for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return keys
                token = page["NextContinuationToken"]
        keys = self._call(listing)
        if keys is None:
            return False
        for key in keys:
            data = self._call(lambda key=key: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            try:
                e = Entry.from_json(data) if data is not None else None
            except (ValueError, TypeError, KeyError):
                self.stats["l3_corrupt"] += 1
                e = None
            if e is not None:
                self.meta[(e.namespace, e.id)] = e
                self.index.add(e.namespace, e.id, e.vector)
        return True

    def _read(self, e: Entry) -> Entry | None:
        data = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(e))["Body"].read())
        if data is None:
            return None
        try:
            return Entry.from_json(data)
        except (ValueError, TypeError, KeyError):
            self.stats["l3_corrupt"] += 1
            return None

    def _write(self, e: Entry) -> None:
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(e), Body=e.to_json()))

    def _delete(self, e: Entry) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(e)))


def _log(msg: str) -> None:
    import logging

    logging.getLogger("costopt.cache").warning(msg)


@dataclass
class Hit:
    entry: Entry
    level: str  # "l1" | "l2" | "l3"
    similarity: float


@dataclass
class CacheConfig:
    setting: Setting = field(default_factory=lambda: Setting(0.8, 0.85))
    ttl_s: float = 24 * 3600.0
    l1_capacity: int = 10_000
    l2_capacity: int = 100_000
    l3_capacity: int = 1_000_000
    store_prompts: bool = True
    salt: str = "costopt"  # for the prompt hashes that stand in for prompt text


class SemanticCache:
    """lookup / store / purge over the levels given (L1 always; L2 and L3 when configured)."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], phrase_sim: PhraseSim, dim: int,
                 config: CacheConfig | None = None, policy: Policy | None = None,
                 l2_root: Path | None = None, s3: tuple[Any, str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.encode, self.phrase_sim, self.clock = encode, phrase_sim, clock
        self.config = config or CacheConfig()
        self.stats: Counter = Counter()
        policy = policy or DecayPolicy()
        cfg = self.config
        self.levels: list[Level] = [Level(dim, cfg.l1_capacity, policy, self.stats)]
        if l2_root is not None:
            self.levels.append(DiskLevel(l2_root, dim, cfg.l2_capacity, policy, self.stats))
        if s3 is not None:
            client, bucket, prefix = s3
            self.levels.append(S3Level(client, bucket, prefix, dim, cfg.l3_capacity, policy, self.stats))

    def _prompt_hash(self, key: CacheKey, prompt: str) -> str:
        return _sha(self.config.salt, key.namespace, normalize_prompt(prompt))

    def _fresh(self, e: Entry, now: float) -> bool:
        return now - e.created <= self.config.ttl_s

    def lookup(self, key: CacheKey, prompt: str, vector: np.ndarray | None = None) -> Hit | None:
        """The cached answer for `prompt` in `key`'s namespace, or None. Counts hits per level."""
        now = self.clock()
        vec = vector if vector is not None else self.encode([prompt])[0]
        ns, phash = key.namespace, self._prompt_hash(key, prompt)
        for depth, level in enumerate(self.levels):
            for entry_id, sim in level.search(ns, vec, self.config.setting.threshold):
                e = level.get(ns, entry_id)
                if e is None:
                    continue
                if not self._fresh(e, now):
                    level.remove(e)
                    self.stats["expired"] += 1
                    continue
                if e.prompt_hash == phash:
                    ok = True
                elif e.prompt is None:
                    ok = False  # no text below L1 with store_prompts off: exact repeats only
                else:
                    ok = verify(e.prompt, prompt, self.phrase_sim, self.config.setting.min_phrase_sim).ok
                if not ok:
                    self.stats["refused_by_verify"] += 1
                    continue
                level.used(e, now)
                if depth > 0:  # promote: the upper levels get a copy (L1 with the prompt we just saw)
                    up = Entry(**{**e.__dict__, "prompt": prompt if e.prompt is None else e.prompt})
                    for upper in self.levels[:depth]:
                        upper.put(up if upper.name == "l1" or self.config.store_prompts else up.without_prompt(), now)
                self.stats[f"hit_{level.name}"] += 1
                return Hit(e, level.name, sim)
        self.stats["miss"] += 1
        return None

    def store(self, key: CacheKey, prompt: str, answer: dict[str, Any], vector: np.ndarray | None = None) -> Entry:
        """Write an answer through every level. The caller stores only complete answers."""
        now = self.clock()
        vec = vector if vector is not None else self.encode([prompt])[0]
        phash = self._prompt_hash(key, prompt)
        e = Entry(id=phash[:32], namespace=key.namespace, tenant_id=key.tenant_id, prompt=prompt,
                  prompt_hash=phash, vector=np.asarray(vec, dtype=np.float32), answer=dict(answer),
                  created=now, last_used=now)
        for level in self.levels:
            level.put(e if level.name == "l1" or self.config.store_prompts else e.without_prompt(), now)
        self.stats["stored"] += 1
        return e

    def purge(self, tenant: str) -> dict[str, int]:
        """Remove every entry of `tenant` from every level; {level: entries removed}."""
        tid = CacheKey(tenant, "", "", ()).tenant_id
        return {level.name: level.purge_tenant(tid) for level in self.levels}

    def sizes(self) -> dict[str, int]:
        return {level.name: len(level) for level in self.levels}

    def entries(self) -> Iterable[Entry]:
        return list(self.levels[0].meta.values())
