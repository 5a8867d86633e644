"""Admission control: priority order, reserved slots, queue bounds, deadlines, partial batches and the
adaptive wait and batch cap, all driven by a fake clock (no sleeping, no HTTP, no model)."""
import itertools
import json

import pytest

from serving.admission import (Admission, AdmissionConfig, DeadlineExceeded, Priority, QueueFull,
                               WouldMissDeadline)

H, N, L = Priority.HIGH, Priority.NORMAL, Priority.LOW


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make(clock=None, **overrides):
    cfg = AdmissionConfig(**{"adaptive": False, "deadline_admission": False, **overrides})
    clock = clock or Clock()
    return Admission(cfg, clock), clock


def payloads(tickets):
    return [t.payload for t in tickets]


def test_priority_parse_accepts_names_and_numbers():
    assert Priority.parse(None) is N, "no priority means NORMAL"
    assert Priority.parse("HiGh") is H and Priority.parse(" low ") is L, "names parse in any case"
    assert Priority.parse(0) is H and Priority.parse(2) is L, "0/1/2 parse as HIGH/NORMAL/LOW"
    for bad in ("urgent", 3, -1, True, 1.0):
        with pytest.raises(ValueError, match="priority.*'high', 'normal', 'low'"):
            Priority.parse(bad)


@pytest.mark.parametrize("field,value,expected", [
    ("max_queue", 0, r"\[1, "),
    ("high_queue_reserve", 256, r"\[0, 255\]"),
    ("max_batch", 2.5, "integer"),
    ("reserved_high", 32, r"\[0, 31\]"),
    ("max_wait_ms", -1.0, r"\[0, 10000\]"),
    ("max_wait_ms", float("nan"), "number"),
    ("default_deadline_s", 0, r"\(0, "),
    ("adaptive", "yes", "true or false"),
    ("deadline_admission", 1, "true or false"),
    ("deadline_margin", -0.1, r"\[0, 10\]"),
])
def test_config_errors_name_the_field_and_range(field, value, expected):
    with pytest.raises(ValueError, match=rf"AdmissionConfig\.{field}: expected .*{expected}"):
        AdmissionConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = AdmissionConfig(max_queue=64, high_queue_reserve=8, max_batch=8, reserved_high=1, max_wait_ms=20.0,
                          default_deadline_s=5.0, adaptive=False)
    again = AdmissionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg, f"to_dict/from_dict through JSON must give the same config, got {again}"
    assert AdmissionConfig.from_dict({}) == AdmissionConfig(), "an empty dict gives the defaults"
    with pytest.raises(ValueError, match="unknown key 'max_wait'"):
        AdmissionConfig.from_dict({"max_wait": 10})


def test_admits_by_priority_then_first_come():
    adm, _ = make(max_batch=16, reserved_high=0)
    for name, p in [("n1", N), ("l1", L), ("h1", H), ("n2", N), ("h2", H), ("l2", L)]:
        adm.submit(name, p)
    admitted, expired = adm.take(running=0, running_high=0)
    assert payloads(admitted) == ["h1", "h2", "n1", "n2", "l1", "l2"], f"order was {payloads(admitted)}"
    assert expired == [], "nothing was past its deadline"


def test_never_more_than_free_slots_and_rest_stay_queued():
    adm, _ = make(max_batch=4, reserved_high=0)
    for i in range(6):
        adm.submit(i)
    admitted, _ = adm.take(running=1, running_high=0)
    assert payloads(admitted) == [0, 1, 2], f"3 free slots (4 - 1 running) take the 3 oldest, got {payloads(admitted)}"
    assert adm.queued() == 3, "the rest stay queued"
    assert adm.take(running=4, running_high=0)[0] == [], "a full batch admits nothing"


def test_reserved_slots_are_left_for_high():
    adm, _ = make(max_batch=8, reserved_high=2)
    for i in range(10):
        adm.submit(f"n{i}", N)
    admitted, _ = adm.take(running=0, running_high=0)
    assert len(admitted) == 6, f"NORMAL may use 8 - 2 reserved = 6 slots, got {len(admitted)}"
    assert adm.take(running=6, running_high=0)[0] == [], "NORMAL never takes the 2 reserved slots"
    adm.submit("h0", H), adm.submit("h1", H), adm.submit("h2", H)
    admitted, _ = adm.take(running=6, running_high=0)
    assert payloads(admitted) == ["h0", "h1"], f"HIGH takes the 2 reserved slots and no more, got {payloads(admitted)}"
    # HIGH running does not use up NORMAL's share: 3 HIGH + 2 NORMAL running leave 3 slots, all usable by NORMAL
    admitted, _ = adm.take(running=5, running_high=3)
    assert payloads(admitted) == ["h2", "n6", "n7"], f"got {payloads(admitted)}"


def test_queue_bound_keeps_places_for_high():
    adm, clock = make(max_queue=10, high_queue_reserve=3)
    for i in range(7):
        adm.submit(i, N if i % 2 else L)
    for p in (N, L):
        with pytest.raises(QueueFull) as err:
            adm.submit("late", p)
        assert err.value.priority is p, "the error carries the rejected priority"
        assert err.value.retry_after_s >= 1, f"Retry-After is at least 1 s, got {err.value.retry_after_s}"
        assert err.value.retry_after_s == int(err.value.retry_after_s), "Retry-After is whole seconds"
    for i in range(3):
        adm.submit(f"h{i}", H)
    with pytest.raises(QueueFull):
        adm.submit("h-late", H)
    snap = adm.snapshot()
    assert snap["queued"] == {"high": 3, "normal": 3, "low": 4}, f"queue depths were {snap['queued']}"
    assert snap["counters"]["rejected"] == {"high": 1, "normal": 1, "low": 1}, f"got {snap['counters']['rejected']}"


def test_retry_after_is_the_drain_time_at_the_measured_service_rate():
    adm, clock = make(max_queue=40, high_queue_reserve=0, max_batch=4, reserved_high=0, default_deadline_s=600)
    # an engine finishing 4 requests every 0.5 s (8 req/s) for 3 s, with the queue kept fed
    adm.take(running=0, running_high=0)
    for step in range(7):
        for i in range(4):
            adm.submit((step, i))
        assert len(adm.take(running=0, running_high=0)[0]) == 4, "the last 4 finished, 4 more start"
        clock.advance(0.5)
    for i in range(40 - adm.queued()):
        adm.submit(("fill", i))
    with pytest.raises(QueueFull) as err:
        adm.submit("late")
    rate = adm.snapshot()["service_rate"]
    assert 6.0 < rate < 10.0, f"service rate should be about 8 req/s, measured {rate:.2f}"
    expected = -(-40 // rate)  # 40 ahead, rounded up
    assert err.value.retry_after_s == expected, f"Retry-After {err.value.retry_after_s}, expected {expected}"
    # with no engine running at all, the queue is gone (admitted or expired) by its latest deadline
    idle, clock2 = make(max_queue=2, high_queue_reserve=0, default_deadline_s=30)
    idle.submit("a"), clock2.advance(5), idle.submit("b")
    with pytest.raises(QueueFull) as err:
        idle.submit("c")
    assert err.value.retry_after_s == 30, f"bounded by the last deadline (30 s away), got {err.value.retry_after_s}"


def test_expired_tickets_come_back_once_and_are_never_admitted():
    adm, clock = make(max_batch=8, reserved_high=0)
    old = adm.submit("old", N, deadline_s=1.0)
    fresh = adm.submit("fresh", L, deadline_s=10.0)
    clock.advance(1.5)
    admitted, expired = adm.take(running=2, running_high=0)  # slots are free
    assert expired == [old], f"the ticket past its deadline expires, got {payloads(expired)}"
    assert admitted == [fresh], f"only the live ticket is admitted, got {payloads(admitted)}"
    assert adm.take(running=3, running_high=0) == ([], []), "an expired ticket is reported once"
    err = adm.deadline_error(old)
    assert isinstance(err, DeadlineExceeded) and "1.500 s" in str(err) and "1.000 s" in str(err), \
        f"the message says how long it waited and its deadline: {err}"
    assert adm.snapshot()["counters"]["expired"]["normal"] == 1, "expiry is counted"


def test_deadline_must_be_positive():
    adm, _ = make()
    for bad in (0, -1.0, float("inf"), "soon"):
        with pytest.raises(ValueError, match="deadline"):
            adm.submit("x", deadline_s=bad)


def test_idle_engine_starts_a_partial_batch_after_max_wait():
    adm, clock = make(max_batch=8, reserved_high=2, max_wait_ms=50.0)
    adm.submit("a"), adm.submit("b")
    assert adm.take(0, 0)[0] == [], "an idle engine holds a partial batch"
    clock.advance(0.049)
    assert adm.take(0, 0)[0] == [], "still held at 49 ms"
    clock.advance(0.001)
    assert payloads(adm.take(0, 0)[0]) == ["a", "b"], "the partial batch starts at 50 ms"


def test_idle_engine_starts_at_once_when_the_batch_is_full():
    adm, _ = make(max_batch=8, reserved_high=2, max_wait_ms=50.0)
    for i in range(5):
        adm.submit(i)
    assert adm.take(0, 0)[0] == [], "5 of the 6 non-HIGH slots: wait"
    adm.submit(5)
    assert len(adm.take(0, 0)[0]) == 6, "6 queued fill the non-HIGH slots: start without waiting"


def test_high_never_waits_for_a_batch():
    adm, _ = make(max_batch=8, max_wait_ms=50.0)
    adm.submit("n")
    adm.submit("h", H)
    assert payloads(adm.take(0, 0)[0]) == ["h", "n"], "a queued HIGH starts the batch at once"


def test_running_engine_takes_newcomers_at_the_next_step():
    adm, _ = make(max_batch=8, max_wait_ms=50.0)
    adm.submit("n")
    assert payloads(adm.take(running=1, running_high=0)[0]) == ["n"], "continuous batching: no wait"


def test_cancel_removes_only_queued_tickets():
    adm, _ = make(max_batch=8, reserved_high=0)
    a, b = adm.submit("a", H), adm.submit("b", H)
    assert adm.cancel(a) is True, "a queued ticket is cancelled"
    assert adm.cancel(a) is False, "a second cancel finds nothing"
    assert payloads(adm.take(0, 0)[0]) == ["b"], "the cancelled ticket is never admitted"
    assert adm.cancel(b) is False, "an admitted ticket is no longer queued"
    assert adm.snapshot()["counters"]["cancelled"]["high"] == 1, "cancels are counted"


def test_next_wakeup_says_when_take_can_act():
    adm, clock = make(max_batch=8, reserved_high=0, max_wait_ms=50.0)
    assert adm.next_wakeup(0) is None, "nothing queued: sleep until a submit"
    adm.submit("a")
    clock.advance(0.020)
    assert adm.next_wakeup(0) == pytest.approx(0.030), "an idle engine wakes when the oldest has waited 50 ms"
    assert adm.next_wakeup(running=3) == 0.0, "a running engine with free slots admits at once"
    assert adm.next_wakeup(running=8) == pytest.approx(60.0 - 0.020), "a full batch: wake for the first expiry"
    clock.advance(adm.next_wakeup(0))
    assert payloads(adm.take(0, 0)[0]) == ["a"], "take admits exactly when next_wakeup said"
    adm.submit("h", H)
    assert adm.next_wakeup(0) == 0.0, "HIGH is admissible at once"


def test_short_deadline_is_started_not_left_to_expire():
    adm, clock = make(max_batch=8, max_wait_ms=50.0)
    adm.submit("hurry", deadline_s=0.04)
    wake = adm.next_wakeup(0)
    assert wake == pytest.approx(0.02), f"held at most half its 40 ms deadline, next_wakeup was {wake}"
    clock.advance(wake)
    admitted, expired = adm.take(0, 0)
    assert payloads(admitted) == ["hurry"] and expired == [], "it starts before its deadline"


def test_adaptive_wait_shrinks_at_a_trickle():
    adm, clock = make(adaptive=True, max_batch=8, max_wait_ms=50.0)
    for i in range(10):  # one request every 2 s, each served alone
        adm.submit(i)
        admitted, _ = adm.take(0, 0)
        assert payloads(admitted) == [i], f"at 0.5 req/s a lone request starts at once, request {i} was held"
        clock.advance(2.0)
    assert adm.snapshot()["max_wait_ms"] == 0.0, "at 0.5 req/s no partner is expected within 50 ms"
    fixed, fixed_clock = make(adaptive=False, max_batch=8, max_wait_ms=50.0)
    fixed.submit("x")
    assert fixed.take(0, 0)[0] == [], "without adaptive the lone request waits the configured 50 ms"


def test_adaptive_wait_stays_near_max_at_a_high_rate():
    adm, clock = make(adaptive=True, max_queue=4096, high_queue_reserve=0, max_batch=64, reserved_high=0,
                      max_wait_ms=50.0)
    for i in range(3000):  # 1000 req/s for 3 s, drained by a busy engine
        adm.submit(i)
        adm.take(running=1, running_high=0)
        clock.advance(0.001)
    wait_ms = adm.snapshot()["max_wait_ms"]
    assert 48.0 < wait_ms <= 49.1, f"at 1000 req/s wait max_wait - 1/rate = about 49 ms, got {wait_ms:.2f}"
    adm.submit("lone")
    wake = adm.next_wakeup(0)
    assert wake == pytest.approx(wait_ms / 1000), f"next_wakeup {wake} follows the effective wait {wait_ms} ms"
    clock.advance(wake - 0.001)
    assert adm.take(0, 0)[0] == [], "held until the effective wait"
    clock.advance(0.001)
    assert payloads(adm.take(0, 0)[0]) == ["lone"], "started at the effective wait"


def simulate(adm, clock, step_s, steps=4000):
    """A fake engine: one request submitted per step (more than it can serve); requests decode 60 to 140
    steps (mean 100) of step_s(batch) seconds each. Returns the batch size of every step."""
    lengths = itertools.cycle([60, 140, 80, 120, 100])
    left, batches = [], []  # steps left per running sequence
    for i in range(steps):
        try:
            adm.submit(i)
        except QueueFull:
            pass
        admitted, _ = adm.take(running=len(left), running_high=0)
        left += [next(lengths) for _ in admitted]
        seconds = step_s(len(left))
        clock.advance(seconds)
        adm.observe_step(len(left), seconds, len(left))
        batches.append(len(left))
        left = [n - 1 for n in left if n > 1]
    return batches


def test_adaptive_batch_shrinks_when_steps_would_miss_deadlines():
    # step time 10 ms + 10 ms per sequence, 100 steps per request, 10.5 s deadline: a mean request decodes in
    # 10 s at batch 9 and 11 s at batch 10, so the cap should be 9
    adm, clock = make(adaptive=True, max_batch=16, reserved_high=0, default_deadline_s=10.5)
    batches = simulate(adm, clock, lambda b: 0.01 + 0.01 * b)
    cap, steady = adm.snapshot()["max_batch"], batches[-1000:]
    assert cap == 9, f"the largest batch at which a mean request meets its deadline is 9, cap is {cap}"
    assert max(batches) == 16, "before anything finished, the batch grew to the configured 16"
    assert set(steady) == {9}, f"under overload the engine runs full capped batches, got {sorted(set(steady))}"
    fixed, fixed_clock = make(adaptive=False, max_batch=16, reserved_high=0, default_deadline_s=10.5)
    batches = simulate(fixed, fixed_clock, lambda b: 0.01 + 0.01 * b)
    assert set(batches[-1000:]) == {16}, "without adaptive the configured max_batch is used"


@pytest.mark.parametrize("step_s,deadline_s,why", [
    (lambda b: 0.03 - 0.0001 * b, 10.0, "steps do not grow with the batch (memory-bound), a smaller one is no faster"),
    (lambda b: 0.02 + 0.001 * b, 1.0, "even one sequence misses a 1 s deadline (2 s a request), shrinking cannot save it"),
])
def test_adaptive_batch_stays_at_max_when_shrinking_cannot_help(step_s, deadline_s, why):
    adm, clock = make(adaptive=True, max_batch=16, reserved_high=0, default_deadline_s=deadline_s)
    batches = simulate(adm, clock, step_s)
    assert adm.snapshot()["max_batch"] == 16, f"the cap stays at 16: {why}"
    assert set(batches[-1000:]) == {16}, f"the engine keeps running full batches: {why}"


def test_counters_account_for_every_submit():
    adm, clock = make(max_queue=6, high_queue_reserve=2, max_batch=2, reserved_high=0)
    tickets = [adm.submit(i, deadline_s=1.0 + i) for i in range(4)]
    with pytest.raises(QueueFull):
        adm.submit("rejected")
    adm.cancel(tickets[3])
    clock.advance(1.5)
    admitted, expired = adm.take(0, 0)
    c = {k: v["normal"] for k, v in adm.snapshot()["counters"].items()}
    assert (len(admitted), len(expired)) == (2, 1), f"1 expired, 2 admitted, got {len(admitted)}, {len(expired)}"
    assert c == {"submitted": 5, "admitted": 2, "rejected": 1, "expired": 1, "cancelled": 1, "paused": 0}, \
        f"counters {c}"


# -- deadline admission: predictions from measured step times ---------------------------------------------
def measured(clock=None, step_s=lambda b: 0.02 + 0.01 * b, prefill_s=0.001, **overrides):
    """An Admission with deadline admission on, whose step model has seen decode steps at batch 1..16 of
    step_s(b) seconds and prefills costing prefill_s per prompt token."""
    adm, clock = make(clock, **{"deadline_admission": True, "deadline_margin": 0.0, "adaptive_margin": False,
                                **overrides})
    for b in range(1, 17):
        adm.observe_step(b, step_s(b), b)
        adm.observe_step(b, step_s(b) + 10 * prefill_s, b, prefill_tokens=10)
    for i in range(160):  # then decode-only steps, so prefills take no share of the recent steps
        adm.observe_step(1 + i % 16, step_s(1 + i % 16), 1 + i % 16)
    return adm, clock


def test_a_request_no_server_could_finish_in_time_is_refused_at_once_without_retry_after():
    adm, _ = measured()
    with pytest.raises(WouldMissDeadline) as err:  # 100 steps of at least 30 ms: 3 s, deadline 1 s
        adm.submit("long", deadline_s=1.0, steps=100)
    assert err.value.retry_after_s is None, "retrying cannot help: no Retry-After"
    assert "deadline" in str(err.value) and "idle" in str(err.value), str(err.value)
    assert adm.queued() == 0 and adm.snapshot()["counters"]["rejected"]["normal"] == 1
    assert adm.submit("short", deadline_s=1.0, steps=20).steps == 20, "20 steps (0.6 s alone) fits 1 s"


def test_a_request_behind_a_long_queue_is_refused_with_the_wait_as_retry_after():
    adm, clock = measured(max_batch=4, reserved_high=0)
    adm.take(4, 0, live=[(clock() + 100, 50)] * 4)  # four running sequences, 50 steps left each
    with pytest.raises(WouldMissDeadline) as err:  # waits 50 steps at batch 4 (3 s) first, then 10 more
        adm.submit("x", deadline_s=3.0, steps=10)
    assert err.value.retry_after_s in (3.0, 4.0), f"Retry-After is the predicted 3 s wait rounded up, got " \
        f"{err.value.retry_after_s}"
    assert adm.submit("y", deadline_s=4.0, steps=10), "3 s of waiting + 0.6 s of decoding fits 4 s"


def test_a_newcomer_does_not_join_when_it_would_make_a_running_sequence_late():
    adm, clock = measured(max_batch=16, reserved_high=0)
    # one running sequence with 100 steps left and 3.1 s to go: it affords 31 ms steps, i.e. batch 1 only
    adm.take(1, 0, live=[(clock() + 3.1, 100)])
    t = adm.submit("newcomer", deadline_s=60.0, steps=10)
    admitted, expired = adm.take(1, 0, live=[(clock() + 3.1, 100)])
    assert admitted == [] and expired == [], "joining would stretch every step to 40 ms and make it late"
    admitted, _ = adm.take(1, 0, live=[(clock() + 60, 5)])
    assert admitted == [t], "once the batch can afford it, the newcomer joins"


def test_a_high_request_that_needs_a_smaller_batch_holds_back_lower_priorities():
    adm, clock = measured(max_batch=16, reserved_high=0, max_wait_ms=0.0)
    live = [(clock() + 100, 10)] * 8  # eight running sequences, 10 steps left (1 s at batch 8)
    adm.take(8, 0, live=live)
    high = adm.submit("high", Priority.HIGH, deadline_s=4.0, steps=100)  # 3 s alone; 9 s at batch 9
    normal = adm.submit("normal", deadline_s=60.0, steps=10)
    admitted, expired = adm.take(8, 0, live=live)
    assert admitted == [] and expired == [], "the HIGH waits for the batch to drain, and so does NORMAL"
    clock.advance(1.0)
    admitted, _ = adm.take(0, 0, live=[])
    assert admitted[0] is high, "the drained engine starts the HIGH first"
    assert normal not in admitted, "NORMAL would slow the HIGH past its deadline: it does not join yet"


def test_a_queued_request_that_can_no_longer_finish_is_dropped_early():
    adm, clock = measured(max_batch=2, reserved_high=0)
    live = [(clock() + 100, 50)] * 2
    adm.take(2, 0, live=live)
    t = adm.submit("late", deadline_s=5.0, steps=10)  # waits 50 steps at batch 2 (2 s), then decodes 0.4 s
    clock.advance(3.5)  # the pair ran slower than predicted: 1.5 s left, 1.6 s of waiting still ahead
    live = [(clock() + 100, 40)] * 2
    admitted, expired = adm.take(2, 0, live=live)
    assert expired == [t] and t.hopeless, "dropped now, not when its deadline comes"
    err = adm.deadline_error(t)
    assert isinstance(err, DeadlineExceeded) and "no longer finish" in str(err), str(err)


def test_deadline_admission_stays_out_of_the_way_until_step_times_are_measured():
    adm, _ = make(deadline_admission=True)
    assert adm.submit("x", deadline_s=0.001, steps=10_000), "nothing measured: no prediction, no refusal"


def simulate_overload(seed: int = 7, requests: int = 1000, load: float = 2.0, margin: float = 0.1,
                      preempt: bool = True) -> dict:
    """A fake engine (step 30 ms + 6 ms per sequence, prefill 2 ms per prompt token, max batch 32) fed
    Poisson arrivals at `load` times its full-batch capacity with the serving trace's mix of priorities,
    deadlines and answer lengths; with `preempt` it pauses what `schedule()` says. Returns what happened
    to every request."""
    import random

    rng = random.Random(seed)
    step_s = lambda b: 0.03 + 0.006 * b  # noqa: E731  (INT8-like: 36 ms at 1, 126 ms at 16)
    adm, clock = measured(step_s=step_s, prefill_s=0.002, max_batch=32, reserved_high=4, max_wait_ms=50.0,
                          deadline_margin=margin)
    lengths = [8, 16, 24, 32, 48, 64, 80, 96]
    capacity = 32 / step_s(32) / (sum(lengths) / len(lengths))  # req/s at a full batch, prefill aside
    arrivals, t = [], clock()
    for _ in range(requests):
        t += rng.expovariate(load * capacity)
        pr = rng.choices([H, N, L], [0.15, 0.7, 0.15])[0]
        arrivals.append((t, pr, {H: 5.0, N: 20.0, L: 120.0}[pr], rng.choice(lengths), rng.randint(20, 80)))
    running: dict = {}  # ticket -> steps left
    paused: set = set()
    done, refused, dropped, i, pauses = [], [], [], 0, 0
    while i < len(arrivals) or running or adm.queued():
        while i < len(arrivals) and arrivals[i][0] <= clock():
            _, pr, deadline, steps, prompt = arrivals[i]
            i += 1
            try:
                adm.submit(None, pr, deadline_s=deadline, steps=steps, prompt_tokens=prompt)
            except WouldMissDeadline:
                refused.append(pr)
        high = sum(tk.priority == H for tk in running)
        if preempt:
            plan = adm.schedule(len(running), high, [(tk, left, tk in paused) for tk, left in running.items()])
            admitted, expired = plan.admitted, plan.expired
            paused = (paused - set(plan.resume)) | set(plan.pause)
            pauses += len(plan.pause)
        else:
            admitted, expired = adm.take(len(running), high, live=[(tk.deadline, n) for tk, n in running.items()])
        dropped += [(tk, clock() - tk.arrival) for tk in expired]
        if len(running) == len(paused) and not admitted:
            clock.t = max(clock.t + 0.001, arrivals[i][0] if i < len(arrivals) else clock.t)
            continue
        for tk in admitted:
            running[tk] = tk.steps
        stepping = [tk for tk in running if tk not in paused]
        prefill = sum(tk.prompt_tokens for tk in admitted)
        seconds = step_s(len(stepping)) + 0.002 * prefill
        clock.advance(seconds)
        adm.observe_step(len(stepping), seconds, len(stepping), prefill)
        for tk in stepping:
            running[tk] -= 1
            if running[tk] == 0:
                del running[tk]
                done.append((tk, clock()))
    return {"arrivals": arrivals, "done": done, "refused": refused, "dropped": dropped, "capacity": capacity,
            "span": done[-1][1] - arrivals[0][0], "pauses": pauses}


@pytest.mark.parametrize("preempt", [False, True])
def test_overload_simulation_admitted_requests_meet_their_deadlines(preempt):
    """At twice its capacity: every admitted request finishes by its deadline (the step model is exact
    here), the rest are refused at submit or dropped before compute, HIGH keeps being served, and
    goodput stays near capacity; pausing lower priorities serves more HIGH requests."""
    sim = simulate_overload(preempt=preempt)
    done, arrivals = sim["done"], sim["arrivals"]
    late = [(tk.priority.name, round(end - tk.deadline, 3)) for tk, end in done if end > tk.deadline + 1e-6]
    assert not late, f"admitted requests finished after their deadline: {late[:10]}"
    assert len(sim["refused"]) + len(sim["dropped"]) > 0.25 * len(arrivals), "at 2x a good share is refused"
    high_done = sum(tk.priority == H for tk, _ in done)
    assert high_done > 0.3 * sum(a[1] == H for a in arrivals), "HIGH keeps being served under overload"
    goodput = len(done) / sim["span"]
    assert goodput > 0.6 * sim["capacity"], f"goodput {goodput:.2f} req/s, capacity {sim['capacity']:.2f}"
    if preempt:
        without = simulate_overload(preempt=False)
        high_without = sum(tk.priority == H for tk, _ in without["done"])
        assert sim["pauses"] > 0 and high_done > 1.2 * high_without, \
            f"pausing served {high_done} HIGH requests against {high_without} without it ({sim['pauses']} pauses)"


def test_schedule_pauses_the_lower_priority_with_most_slack_so_a_high_request_fits():
    adm, clock = measured(max_batch=16, reserved_high=2, max_wait_ms=0.0)
    running = {adm.submit(f"n{i}", N, deadline_s=60.0, steps=20): 20 for i in range(3)}
    low = adm.submit("low", L, deadline_s=100.0, steps=20)
    tight = adm.submit("tight", N, deadline_s=1.5, steps=20)  # 20 steps: 1.2 s at batch 5 (the margin is 0)
    plan = adm.schedule(0, 0, [])
    assert len(plan.admitted) == 5 and plan.pause == [], "an idle engine starts all five"
    running.update({low: 20, tight: 20})
    live = [(t, 20, False) for t in running]
    # HIGH, 30 steps by 1.3 s: only at batch <= 2 (20 ms + 10 ms per sequence: 1.2 s), so four of the five
    # must pause; `tight` cannot afford to wait, so LOW and the three other NORMALs pause
    high = adm.submit("high", H, deadline_s=1.3, steps=30)
    plan = adm.schedule(5, 0, live)
    assert plan.admitted == [high], f"the HIGH joins at once, got {payloads(plan.admitted)}"
    assert low in plan.pause and tight not in plan.pause and len(plan.pause) == 4, \
        f"paused {payloads(plan.pause)}: LOW first, never the one that cannot wait"
    assert adm.snapshot()["counters"]["paused"] == {"high": 0, "normal": 3, "low": 1}
    paused = set(plan.pause)
    live = [(t, 19, t in paused) for t in running] + [(high, 30, False)]
    plan = adm.schedule(6, 1, live)
    assert plan.resume == [] and plan.pause == [], "nothing resumes while the HIGH needs the small batch"
    live = [(t, 19, t in paused) for t in running]  # the HIGH finished
    plan = adm.schedule(5, 0, live)
    assert set(plan.resume) == paused, f"all paused ones resume, got {payloads(plan.resume)}"


def test_a_high_request_is_refused_at_once_when_no_lower_priorities_can_wait_for_it():
    adm, clock = measured(max_batch=8, reserved_high=1)
    busy = [adm.submit(i, N, deadline_s=3.0, steps=40) for i in range(4)]  # 40 steps at 60 ms: 2.4 s of 3 s
    adm.schedule(0, 0, [])
    adm.schedule(4, 0, [(t, 40, False) for t in busy])
    with pytest.raises(WouldMissDeadline):  # 60 steps by 2 s: batch 1 only, and nobody can wait 1.8 s
        adm.submit("high", H, deadline_s=2.0, steps=60)
    plan = adm.schedule(4, 0, [(t, 39, False) for t in busy])
    assert plan.pause == [] and plan.admitted == [] and adm.queued() == 0


def test_calibrated_step_times_follow_the_live_load_at_every_batch_size():
    adm, _ = make(deadline_admission=True)
    for b, s in ((1, 0.04), (2, 0.04), (8, 0.07), (32, 0.2)):  # an idle engine before serving
        adm.observe_step(b, s, b, calibration=True)
    steps = adm._steps
    assert steps.decode(1) == pytest.approx(0.04) and steps.decode(5) == pytest.approx(0.055), \
        "linear between calibrated sizes"
    assert steps.decode(40) == pytest.approx(0.2 + 8 * 0.13 / 24), "extended by the last segment's slope"
    for _ in range(200):  # serving: steps at batch 8 run 1.5x slower than calibrated
        adm.observe_step(8, 0.105, 8)
    assert steps.decode(8) == pytest.approx(0.105, rel=0.01), "the live load factor follows measurements"
    assert steps.decode(1) == pytest.approx(0.06, rel=0.01), "and applies to sizes not run lately"


def test_contention_that_adds_a_fixed_cost_per_step_is_carried_to_small_batches():
    adm, _ = make(deadline_admission=True)
    for b, s in ((1, 0.04), (2, 0.04), (8, 0.07), (16, 0.12)):
        adm.observe_step(b, s, b, calibration=True)
    for i in range(400):  # serving at batch 8 and 16 only, each step 60 ms slower than calibrated
        b = (8, 16)[i % 2]
        adm.observe_step(b, adm._steps._shape(b) + 0.06, b)
    assert adm._steps.decode(2) == pytest.approx(0.10, rel=0.05), \
        "a fixed 60 ms per step is predicted at batch 2 too, not scaled by the ratio seen at big batches"


# -- the adaptive safety margin -----------------------------------------------------------------

def test_margin_follows_the_forecast_errors_it_observes():
    """Steps at batch 8 come in runs of 16 at 10 ms then 16 at 16 ms (contention that comes and goes):
    the step model follows with a lag, so a run of slow steps comes in 10-25% over its forecast, and the
    margin at batch 8 widens to cover that; steps at batch 1 are steady, so its margin stays at the
    configured one (the floor); with the adaptive margin off the configured one applies everywhere."""
    def feed(adm):
        for i in range(320):
            adm.observe_step(8, 0.010 if (i // 16) % 2 == 0 else 0.016, 8)
            adm.observe_step(1, 0.005, 1)

    adm, _ = make(deadline_admission=True, deadline_margin=0.05)
    assert adm._stretch(8) == pytest.approx(1.05), "before any step: the configured margin"
    feed(adm)
    margins = adm.snapshot()["deadline_margin"]
    assert 0.10 <= adm._stretch(8) - 1 <= 0.6, f"batch 8 margin widens to cover its slow runs: {margins}"
    assert adm._stretch(1) - 1 == pytest.approx(0.05), f"steady steps: the configured margin: {margins}"
    assert adm._stretch(2) - 1 == pytest.approx(0.05), "a band not seen borrows the nearest one seen"
    fixed, _ = make(deadline_admission=True, deadline_margin=0.05, adaptive_margin=False)
    feed(fixed)
    assert fixed._stretch(8) == fixed._stretch(1) == pytest.approx(1.05)
    wide, _ = make(deadline_admission=True, deadline_margin=0.8)
    feed(wide)
    assert wide._stretch(8) == pytest.approx(1.8), "the margin never falls below the configured one"


def test_a_larger_observed_error_refuses_what_a_fixed_margin_would_admit():
    """The same request and state: with errors of about 60% seen at its batch size the forecast is
    stretched by them and the request, which fits with a 5% margin, is refused."""
    def state(noisy: bool):
        adm, _ = make(deadline_admission=True, deadline_margin=0.05)
        for i in range(400):
            slow = noisy and (i // 16) % 2 == 1
            adm.observe_step(1, 0.020 if slow else 0.010, 1)
        return adm

    quiet, noisy = state(False), state(True)
    assert quiet.submit("a", deadline_s=1.2, steps=100), "100 steps of ~10-15 ms fit 1.2 s with a small margin"
    with pytest.raises(WouldMissDeadline):
        noisy.submit("a", deadline_s=1.2, steps=100)


def test_a_stall_during_a_hot_switch_widens_the_margin_at_most_to_its_cap():
    """Steps that waited for a variant loading beside them run 20x long: the margin widens, but to 50%
    at most, so queued requests with ample deadlines are not dropped as hopeless afterwards."""
    adm, _ = make(deadline_admission=True, deadline_margin=0.25)
    for i in range(300):
        adm.observe_step(4, 0.02 * (20 if 100 <= i < 140 else 1), 4)
    assert 1.25 <= adm._stretch(4) <= 1.5 + 1e-9, adm.snapshot()["deadline_margin"]


@pytest.mark.parametrize("field, value", [("margin_quantile", 0.3), ("margin_quantile", 1.0),
                                          ("adaptive_margin", "yes")])
def test_bad_margin_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdmissionConfig(**{field: value})
