"""The cache's levels and keys through its public interface: tenant isolation under concurrency, eviction
order, TTL, L2 persistence and corrupt files, store_prompts=False, L3 on a real moto_server and its
outage, purges. Embeddings here are a deterministic bag-of-words hash (fast, and paraphrases that
share words land close); the real embedder's rule is tested in test_cache_decision.py."""
from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from costopt.cache.calibrate import Setting
from costopt.cache.store import CacheConfig, CacheKey, DecayPolicy, LruPolicy, SemanticCache

DIM = 64


def encode(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % DIM] += 1
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
    return out


def phrase_sim(a: str, b: str) -> float:
    return 0.3


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path | None = None, clock=None, **kw) -> SemanticCache:
    cfg = CacheConfig(setting=Setting(0.5, 0.85), **{k: v for k, v in kw.items() if k != "policy"})
    return SemanticCache(encode, phrase_sim, DIM, cfg, policy=kw.get("policy"), clock=clock or Clock(),
                         l2_root=tmp_path)


def key(tenant="acme", **params) -> CacheKey:
    return CacheKey(tenant, "model-fp", "int8", tuple(sorted({"max_tokens": 32, "temperature": 0, **params}.items())))


def answer(text: str) -> dict:
    return {"text": text, "finish_reason": "stop", "usage": {"completion_tokens": 3}}


def test_exact_and_paraphrased_prompts_hit_and_near_misses_do_not():
    cache = make()
    cache.store(key(), "What is the capital of France?", answer("Paris"))
    hit = cache.lookup(key(), "what is the capital of france")
    assert hit is not None and hit.level == "l1" and hit.entry.answer["text"] == "Paris", f"{hit}"
    assert cache.lookup(key(), "What is the capital of Spain?") is None, "another country must miss"
    assert cache.lookup(key(), "Could you tell me the capital of France?") is not None, "a politeness wrapper hits"
    assert cache.lookup(key(max_tokens=64), "What is the capital of France?") is None, \
        "another max_tokens is another namespace"
    assert cache.stats["hit_l1"] == 2 and cache.stats["miss"] == 2, f"{cache.stats}"


def test_tenants_never_see_each_others_entries_under_concurrency():
    cache = make(l1_capacity=100_000)
    tenants = [f"tenant{i}" for i in range(12)]
    prompts = [f"Explain topic number {n} in simple terms." for n in range(30)]
    wrong: list[str] = []

    def work(t: str) -> None:
        for p in prompts:
            if cache.lookup(key(t), p) is None:
                cache.store(key(t), p, answer(f"{t}:{p}"))
            hit = cache.lookup(key(t), p)
            if hit is None or not hit.entry.answer["text"].startswith(f"{t}:"):
                wrong.append(f"{t} got {hit.entry.answer['text'] if hit else None}")

    threads = [threading.Thread(target=work, args=(t,)) for t in tenants for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong, f"{len(wrong)} lookups returned another tenant's answer or nothing: {wrong[:3]}"
    assert cache.lookup(key("intruder"), prompts[0]) is None, "a tenant with no entries gets nothing"


def test_decay_policy_keeps_popular_entries_that_lru_drops():
    for policy, survivor in ((DecayPolicy(half_life_s=100), "popular"), (LruPolicy(), "recent")):
        clock = Clock()
        cache = make(clock=clock, l1_capacity=2, policy=policy)
        cache.store(key(), "popular question about tides", answer("a"))
        for _ in range(5):
            clock.t += 1
            assert cache.lookup(key(), "popular question about tides") is not None
        clock.t += 10
        cache.store(key(), "recent question about volcanoes", answer("b"))
        clock.t += 1
        cache.store(key(), "newest question about glaciers", answer("c"))  # over capacity: one goes
        kept = {e.prompt for e in cache.entries()}
        want = "popular question about tides" if survivor == "popular" else "recent question about volcanoes"
        assert want in kept and "newest question about glaciers" in kept, f"{type(policy).__name__}: {kept}"
        assert cache.stats["l1_evictions"] == 1


def test_expired_entries_are_never_served():
    clock = Clock()
    cache = make(clock=clock, ttl_s=60)
    cache.store(key(), "How do tides work?", answer("moon"))
    clock.t += 61
    assert cache.lookup(key(), "How do tides work?") is None and cache.stats["expired"] == 1
    assert cache.sizes()["l1"] == 0, "an expired entry is removed when met"


def test_l2_survives_a_restart_and_promotes_and_skips_corrupt_files(tmp_path):
    first = make(tmp_path)
    first.store(key(), "Name three uses for a paper clip.", answer("hold paper"))
    first.store(key(), "Name three healthy breakfast ideas.", answer("oats"))
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 2
    files[1].write_text("{not json")
    second = make(tmp_path)
    assert second.stats["l2_corrupt"] == 1 and not files[1].exists(), "a corrupt file is counted and removed"
    hit = second.lookup(key(), "Name three uses for a paper clip.")
    assert hit is not None and hit.level == "l2", f"{hit}"
    again = second.lookup(key(), "Name three uses for a paper clip.")
    assert again is not None and again.level == "l1", "a lower-level hit is promoted"


def test_store_prompts_false_keeps_text_out_of_l2(tmp_path):
    cache = make(tmp_path, store_prompts=False)
    cache.store(key(), "My secret plan is to bake a cake for Maria.", answer("nice"))
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*.json"))
    assert b"secret" not in on_disk and b"Maria" not in on_disk, "prompt text reached L2"
    restarted = make(tmp_path, store_prompts=False)
    assert restarted.lookup(key(), "my secret plan is to bake a cake for maria.") is not None, \
        "an exact repeat (case and spacing aside) still hits from L2"
    assert restarted.lookup(key(), "Could you say: my secret plan is to bake a cake for Maria") is None, \
        "without the text, L2 cannot verify a paraphrase: no hit"


def test_purge_removes_one_tenant_everywhere(tmp_path):
    cache = make(tmp_path)
    for t in ("acme", "globex"):
        cache.store(key(t), "What is a black hole?", answer(t))
    removed = cache.purge("acme")
    assert removed == {"l1": 1, "l2": 1}, f"{removed}"
    assert cache.lookup(key("acme"), "What is a black hole?") is None
    assert cache.lookup(key("globex"), "What is a black hole?").entry.answer["text"] == "globex"
    assert make(tmp_path).lookup(key("acme"), "What is a black hole?") is None, "gone from disk too"


@pytest.fixture
def s3():
    import boto3

    from costopt.storage.s3 import MotoServer

    with MotoServer(port=0) as server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket="cache")
        yield server, client


def test_l3_on_s3_serves_a_new_instance_and_an_outage_never_fails_a_request(tmp_path, s3):
    server, client = s3
    cfg = CacheConfig(setting=Setting(0.5, 0.85))
    a = SemanticCache(encode, phrase_sim, DIM, cfg, l2_root=tmp_path / "a", s3=(client, "cache", "l3"))
    a.store(key(), "Why is the sky blue?", answer("scattering"))
    b = SemanticCache(encode, phrase_sim, DIM, cfg, l2_root=tmp_path / "b", s3=(client, "cache", "l3"))
    hit = b.lookup(key(), "Why is the sky blue?")
    assert hit is not None and hit.level == "l3", f"{hit} {b.stats}"
    assert b.lookup(key(), "Why is the sky blue?").level == "l1", "promoted from L3"
    server.stop()  # the endpoint is gone: L3 calls fail, requests do not
    c = SemanticCache(encode, phrase_sim, DIM, cfg, l2_root=tmp_path / "c", s3=(client, "cache", "l3"))
    assert c.lookup(key(), "Why is the sky blue?") is None
    c.store(key(), "Why is grass green?", answer("chlorophyll"))
    assert c.lookup(key(), "Why is grass green?").level == "l1"
    assert c.stats["l3_errors"] >= 2, f"the failures are counted: {c.stats}"
    assert isinstance(c.stats, Counter)
