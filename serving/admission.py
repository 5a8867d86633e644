"""Admission control for continuous batching: which queued requests join the running batch, and when.

The KServe handler calls `submit()` for each request (a full queue raises `QueueFull`, sent as HTTP 429
with `Retry-After`), then wakes the engine loop. Between decode steps the loop calls
`take(running, running_high)`: it starts the `admitted` tickets and fails the `expired` ones with
`deadline_error(ticket)` before they use any compute; it reports each step with `observe_step()`; when
the engine is idle it sleeps `next_wakeup(0)` seconds unless a submit wakes it. Time comes from an
injected clock, so everything here is synchronous and testable without HTTP or a model; it is not
thread-safe (call it from the event loop's thread).

Rules. Queue: at most `max_queue` requests wait; the last `high_queue_reserve` places are HIGH's alone.
Order: HIGH, NORMAL, LOW, first come first served within a priority. Batch: never more than
`max_batch - running` join; `reserved_high` slots are kept for HIGH (non-HIGH use at most
`max_batch - reserved_high - running_non_high`). Deadlines: a ticket whose deadline has come is expired,
never admitted, even when slots are free. Partial batch: a running engine takes newcomers at the next
step (continuous batching); an idle one starts when HIGH is queued, when the queue can fill the slots
non-HIGH may use, or when a request has been held for the effective max wait (never more than half its
deadline). With `adaptive`, the max wait and max batch follow measured traffic (see `Admission`).
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

RATE_WINDOW_S = 2.0  # arrival and service rates average over about the last 2 s
_MIN_WINDOW_S = 1.0  # a rate over less than 1 s of history is noise: count it as 1 s
_STEP_ALPHA = 0.05  # step-time fit weight per step: about the last 20 steps
_STEPS_DECAY = 0.9995  # steps-per-request counts forget over about 2000 steps
_EPS = 1e-9  # s; a wake-up computed by next_wakeup() must land on its own side of the comparison


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str | int | None) -> Priority:
        """None -> NORMAL; "high"/"normal"/"low" in any case, or 0/1/2."""
        if value is None:
            return cls.NORMAL
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2:
            return cls(value)
        raise ValueError(f"priority: expected one of 'high', 'normal', 'low' (or 0, 1, 2), got {value!r}")


def _check(name: str, value: Any, lo: float, hi: float, integer: bool = False, lo_open: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    in_range = ok_type and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo) and value <= hi
    if not in_range:
        bracket = "(" if lo_open else "["
        raise ValueError(f"AdmissionConfig.{name}: expected {kind} in {bracket}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class AdmissionConfig:
    max_queue: int = 256  # requests waiting, all priorities together
    high_queue_reserve: int = 32  # queue places only HIGH may take, so HIGH still gets in under load
    max_batch: int = 16  # sequences decoding together (engine slots)
    reserved_high: int = 2  # batch slots only HIGH may use
    max_wait_ms: float = 50.0  # ms an idle engine may hold requests to fill a batch (the seed paper's 50 ms)
    default_deadline_s: float = 60.0  # s, per-request deadline when the client sets none
    adaptive: bool = True  # follow the live arrival rate and step times (see Admission)

    def __post_init__(self) -> None:
        _check("max_queue", self.max_queue, 1, 1_000_000, integer=True)
        _check("high_queue_reserve", self.high_queue_reserve, 0, self.max_queue - 1, integer=True)
        _check("max_batch", self.max_batch, 1, 4096, integer=True)
        _check("reserved_high", self.reserved_high, 0, self.max_batch - 1, integer=True)
        _check("max_wait_ms", self.max_wait_ms, 0, 10_000)
        _check("default_deadline_s", self.default_deadline_s, 0, 86_400, lo_open=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"AdmissionConfig.adaptive: expected true or false, got {self.adaptive!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdmissionConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"AdmissionConfig: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"AdmissionConfig: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class QueueFull(Exception):
    """The queue has no place for this priority: HTTP 429 with `Retry-After: retry_after_s`."""

    def __init__(self, priority: Priority, queued: int, limit: int, retry_after_s: float):
        self.priority, self.queued, self.limit, self.retry_after_s = priority, queued, limit, retry_after_s
        super().__init__(f"queue full for {priority.name} requests: {queued} waiting, limit {limit} for this "
                         f"priority; retry after {retry_after_s:.0f} s")


class DeadlineExceeded(Exception):
    """A request's deadline came while it was queued; it never reached the model."""

    def __init__(self, waited_s: float, deadline_s: float):
        self.waited_s, self.deadline_s = waited_s, deadline_s
        super().__init__(f"request waited {waited_s:.3f} s in the queue and its deadline is {deadline_s:.3f} s; "
                         f"the server is overloaded: retry later or set a longer `deadline`")


@dataclass(eq=False)  # identity equality: tickets are handles, safe as dict keys and in sets
class Ticket:
    id: int
    priority: Priority
    arrival: float  # clock time of submit(), s
    deadline: float  # clock time the request expires if still queued, s
    payload: Any


class _Rate:
    """Events per second over about the last `window_s`: an exponentially decaying count divided by the
    (decay-weighted) span of history it covers, so the first seconds are not underestimated."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s, self.count, self.first, self.last = window_s, 0.0, None, None

    def add(self, now: float, n: float = 1.0) -> None:
        if self.first is None:
            self.first = self.last = now
        self.count = self.count * math.exp(-(now - self.last) / self.window_s) + n
        self.last = now

    def rate(self, now: float) -> float:
        if self.first is None:
            return 0.0
        count = self.count * math.exp(-(now - self.last) / self.window_s)
        span = max(now - self.first, _MIN_WINDOW_S)
        return count / (self.window_s * (1.0 - math.exp(-span / self.window_s)))


class _StepModel:
    """Step time as `a + u * batch` (s), an exponentially weighted least-squares line over recent steps.
    The last line fitted while batch sizes varied is kept while they hold steady (a line needs spread)."""

    def __init__(self) -> None:
        self.moments: list[float] | None = None  # E[b], E[s], E[b^2], E[b*s]
        self.line: tuple[float, float] | None = None  # (a s, u s per sequence)

    def add(self, batch: int, seconds: float) -> None:
        sample = [batch, seconds, batch * batch, batch * seconds]
        if self.moments is None:
            self.moments = sample
        else:
            self.moments = [m + _STEP_ALPHA * (x - m) for m, x in zip(self.moments, sample)]
        b, s, bb, bs = self.moments
        if bb - b * b >= 0.25:  # batch sizes spread by about one sequence or more
            u = (bs - b * s) / (bb - b * b)
            self.line = (s - u * b, u)


class Admission:
    """Queues requests by priority and hands them to the engine loop between decode steps.

    Adaptive max wait: arrivals are taken as Poisson at the measured rate `lam` (req/s over the last ~2 s,
    as of the latest submit). Poisson arrivals are memoryless, so a request held `age` seconds of a
    `max_wait` budget expects `lam * (max_wait - age)` partners before the budget runs out; once that is
    below 1, holding it longer only adds latency. So the effective wait is `max(0, max_wait - 1/lam)`:
    at a trickle (1/lam >= max_wait) an idle engine starts at once, at high rates it approaches
    max_wait (and the batch fills long before). (Capping the wait at the expected time to fill the free
    slots would do the opposite: hold the full max_wait at a trickle, when no partner comes.)

    Adaptive max batch: a request decodes for `L` steps (measured: sequence-steps run per finished
    request, finishes inferred from `running` across take() calls) of `a + u * batch` seconds each
    (fitted from observe_step()). The cap is the largest batch at which a mean request decodes within
    `default_deadline_s`, never below `reserved_high + 1`. It stays at `max_batch` when step time does not
    grow with the batch (`u <= 0`: a smaller batch would only cost throughput), when even one sequence
    would miss (shrinking cannot save the deadline), or before anything has been measured.
    """

    def __init__(self, cfg: AdmissionConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = cfg, clock
        self._queues: dict[Priority, dict[int, Ticket]] = {p: {} for p in Priority}  # FIFO: dicts keep order
        self._ids = itertools.count(1)
        self._arrivals, self._service = _Rate(), _Rate()  # req/s submitted; req/s finishing decode
        self._wait_rate = 0.0  # arrival rate at the latest submit, req/s: what the max wait follows
        self._steps = _StepModel()
        self._seq_steps = self._finished = 0.0  # decayed counts: sequence-steps run, requests finished
        self._last_running: int | None = None
        self._last_admitted = 0
        self._step_s = self._tokens_per_s = 0.0
        self.counters = {c: {p.name.lower(): 0 for p in Priority}
                         for c in ("submitted", "admitted", "rejected", "expired", "cancelled")}

    # -- effective parameters -------------------------------------------------------------------
    def max_wait_s(self) -> float:
        """The max wait in force now, s."""
        max_wait = self.cfg.max_wait_ms / 1000.0
        if not self.cfg.adaptive:
            return max_wait
        return max(0.0, max_wait - 1.0 / self._wait_rate) if self._wait_rate > 0 else 0.0

    def max_batch(self) -> int:
        """The batch cap in force now, sequences."""
        cfg = self.cfg
        line = self._steps.line
        if not cfg.adaptive or line is None or self._finished < 1.0:
            return cfg.max_batch
        a, u = line
        step_budget = cfg.default_deadline_s / (self._seq_steps / self._finished)  # s per step, mean request
        if u <= 0 or a + u >= step_budget:
            return cfg.max_batch
        return max(cfg.reserved_high + 1, min(cfg.max_batch, int((step_budget - a) / u)))

    # -- the handler's side ---------------------------------------------------------------------
    def submit(self, payload: Any, priority: Priority | str | int | None = Priority.NORMAL,
               deadline_s: float | None = None) -> Ticket:
        priority = Priority.parse(priority)
        if deadline_s is None:
            deadline_s = self.cfg.default_deadline_s
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or \
                not math.isfinite(deadline_s) or deadline_s <= 0:
            raise ValueError(f"deadline: expected a number of seconds > 0, got {deadline_s!r}")
        now, key = self.clock(), priority.name.lower()
        self.counters["submitted"][key] += 1
        queued = self.queued()
        limit = self.cfg.max_queue - (0 if priority == Priority.HIGH else self.cfg.high_queue_reserve)
        if queued >= limit:
            self.counters["rejected"][key] += 1
            raise QueueFull(priority, queued, limit, self._retry_after(priority, now))
        ticket = Ticket(next(self._ids), priority, now, now + deadline_s, payload)
        self._queues[priority][ticket.id] = ticket
        self._arrivals.add(now)
        self._wait_rate = self._arrivals.rate(now)
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """The client went away: drop its ticket if still queued (True), else False."""
        if self._queues[ticket.priority].pop(ticket.id, None) is None:
            return False
        self.counters["cancelled"][ticket.priority.name.lower()] += 1
        return True

    def deadline_error(self, ticket: Ticket) -> DeadlineExceeded:
        """The error to fail an expired ticket with."""
        return DeadlineExceeded(self.clock() - ticket.arrival, ticket.deadline - ticket.arrival)

    def _retry_after(self, priority: Priority, now: float) -> float:
        """Seconds for the queue ahead (priority <= this one; at least one place) to drain at the measured
        service rate, bounded by the latest deadline among them (they are gone by then), >= 1, whole s."""
        ahead = [t for p in Priority if p <= priority for t in self._queues[p].values()]
        everyone = [t for q in self._queues.values() for t in q.values()]
        gone_by = max(t.deadline for t in ahead) if ahead else min(t.deadline for t in everyone)
        rate = self._service.rate(now)
        drain = max(1, len(ahead)) / rate if rate > 0 else math.inf
        return float(max(1, math.ceil(min(drain, gone_by - now))))

    # -- the engine loop's side -----------------------------------------------------------------
    def take(self, running: int, running_high: int) -> tuple[list[Ticket], list[Ticket]]:
        """(admitted, expired) for the next step. `running` counts the sequences in the batch now, those
        admitted by the previous take() included (finishes are inferred from it); `running_high` of them are HIGH."""
        if isinstance(running, bool) or not isinstance(running, int) or running < 0 or \
                not isinstance(running_high, int) or not 0 <= running_high <= running:
            raise ValueError(f"take: expected 0 <= running_high <= running, got running={running!r}, "
                             f"running_high={running_high!r}")
        now = self.clock()
        self._note_finished(running, now)
        expired = [t for q in self._queues.values() for t in q.values() if now >= t.deadline - _EPS]
        for t in expired:
            del self._queues[t.priority][t.id]
            self.counters["expired"][t.priority.name.lower()] += 1
        admitted = self._pick(running, running_high) if self._ready(running, now) else []
        self._last_running, self._last_admitted = running, len(admitted)
        return admitted, expired

    def _note_finished(self, running: int, now: float) -> None:
        """Sequences that left the batch since the last take(): they were running or admitted, and are not now."""
        if self._last_running is None:
            self._service.add(now, 0.0)  # the service rate's history starts with the engine loop
            return
        finished = max(0, self._last_running + self._last_admitted - running)
        if finished:
            self._service.add(now, finished)
            self._finished += finished

    def _hold_until(self) -> float:
        """Clock time an idle engine stops waiting for partners: the earliest any queued request has been
        held the max wait, or half its deadline if that is shorter (it must keep time to decode)."""
        wait = self.max_wait_s()
        return min(t.arrival + min(wait, (t.deadline - t.arrival) / 2)
                   for q in self._queues.values() for t in q.values())

    def _ready(self, running: int, now: float) -> bool:
        if running > 0 or self._queues[Priority.HIGH]:
            return self.queued() > 0
        if self.queued() == 0:
            return False
        if self.queued() >= self.max_batch() - self.cfg.reserved_high:  # enough to fill non-HIGH slots
            return True
        return now >= self._hold_until() - _EPS

    def _pick(self, running: int, running_high: int) -> list[Ticket]:
        cap = self.max_batch()
        free = max(0, cap - running)
        free_non_high = max(0, cap - self.cfg.reserved_high - (running - running_high))
        admitted: list[Ticket] = []
        for p in Priority:  # HIGH first; FIFO within a priority (dicts keep insertion order)
            queue = self._queues[p]
            room = free if p == Priority.HIGH else min(free, free_non_high)
            took = [queue.pop(i) for i in list(itertools.islice(queue, room))]
            free -= len(took)
            free_non_high -= 0 if p == Priority.HIGH else len(took)
            self.counters["admitted"][p.name.lower()] += len(took)
            admitted += took
        return admitted

    def next_wakeup(self, running: int) -> float | None:
        """Seconds until take() could admit or expire something with no new arrivals; None if nothing is queued."""
        if self.queued() == 0:
            return None
        now = self.clock()
        first_expiry = min(t.deadline for q in self._queues.values() for t in q.values()) - now
        if running > 0:
            return 0.0 if running < self.max_batch() else max(0.0, first_expiry)
        if self._ready(0, now):
            return 0.0
        return max(0.0, min(self._hold_until() - now, first_expiry))

    def observe_step(self, batch: int, seconds: float, tokens: int) -> None:
        """One decode step ran `batch` sequences in `seconds` and produced `tokens` tokens."""
        if batch <= 0 or seconds <= 0:
            return  # an empty or unmeasured step says nothing about step time
        self._steps.add(batch, seconds)
        self._seq_steps = self._seq_steps * _STEPS_DECAY + batch
        self._finished *= _STEPS_DECAY
        self._step_s += _STEP_ALPHA * (seconds - self._step_s) if self._step_s else seconds
        tok_s = tokens / seconds
        self._tokens_per_s += _STEP_ALPHA * (tok_s - self._tokens_per_s) if self._tokens_per_s else tok_s

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def snapshot(self) -> dict[str, Any]:
        """Small JSON-able state for /metrics and logs."""
        now = self.clock()
        return {
            "queued": {p.name.lower(): len(self._queues[p]) for p in Priority},
            "arrival_rate": self._arrivals.rate(now),  # req/s, last ~2 s
            "service_rate": self._service.rate(now),  # req/s finishing decode, last ~2 s
            "step_seconds": self._step_s,  # s per decode step, EWMA
            "tokens_per_s": self._tokens_per_s,  # EWMA over steps
            "max_wait_ms": self.max_wait_s() * 1000.0,
            "max_batch": self.max_batch(),
            "counters": {c: dict(v) for c, v in self.counters.items()},
        }
