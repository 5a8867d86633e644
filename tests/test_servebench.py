"""The serving bench's overload verdict, computed from load-test records (no server)."""
from tasks.loadtest import LoadResult, RequestRecord
from tasks.servebench import overload_checks


def rec(seq, priority, outcome, latency_ms, deadline_ms=5000):
    return RequestRecord(seq=seq, id=f"r{seq}", priority=priority, tenant="t", kind="fresh",
                         deadline_ms=deadline_ms, sent_s=seq * 0.1, outcome=outcome,
                         status={"ok": 200, "rejected": 429}.get(outcome), latency_ms=latency_ms)


def test_overload_checks_count_what_the_targets_need():
    records = [rec(0, "high", "ok", 1200.0), rec(1, "high", "ok", 4800.0), rec(2, "high", "rejected", 3.0),
               rec(3, "normal", "ok", 9000.0, 20_000), rec(4, "normal", "ok", 21_000.0, 20_000),
               rec(5, "normal", "rejected", 5.0, 20_000), rec(6, "low", "lost", None, 120_000)]
    result = LoadResult(mode="open", concurrency=None, rate_req_s=4.0, stream=False, duration_s=10.0,
                        max_in_flight=5, records=records)
    got = overload_checks(result, sustainable=2.0, rate=4.0)
    assert (got["sent"], got["admitted"], got["refused_429"], got["lost"], got["errors"]) == (7, 4, 2, 1, 0), got
    assert got["admitted_deadline_met"] == 0.75, "one of four answered requests came after its deadline"
    assert (got["high_sent"], got["high_admitted"], got["high_slo_ms"]) == (3, 2, 5000), got
    assert 4700 < got["high_p99_ms"] <= 4800, f"p99 of 1.2 s and 4.8 s is near 4.8 s, got {got['high_p99_ms']}"
    assert got["refused_p50_ms"] == 4.0 and got["refused_p99_ms"] <= 5.0, got


def test_overload_summary_takes_the_median_and_the_worst_of_the_runs():
    from tasks.servebench import overload_summary

    runs = [{"admitted_deadline_met": m, "high_p99_ms": p, "refused_p99_ms": 10.0, "errors": e, "lost": 0,
             "admitted": a, "refused_429": 5} for m, p, e, a in ((1.0, 4000.0, 0, 30), (0.98, 8100.0, 1, 28),
                                                                 (0.99, 4500.0, 0, 31))]
    out = overload_summary(runs)
    assert out["median"]["admitted_deadline_met"] == 0.99 and out["worst"]["admitted_deadline_met"] == 0.98
    assert out["median"]["high_p99_ms"] == 4500.0 and out["worst"]["high_p99_ms"] == 8100.0
    assert out["worst"]["errors"] == 1 and out["median"]["admitted"] == 30 and len(out["runs"]) == 3
