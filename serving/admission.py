"""Admission control for continuous batching: which queued requests join the running batch, and when.

The KServe handler calls `submit()` for each request (a full queue raises `QueueFull`, sent as HTTP 429
with `Retry-After`), then wakes the engine loop. Between decode steps the loop calls
`take(running, running_high, live)`: it starts the `admitted` tickets and fails the `expired` ones with
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

Deadline admission (`deadline_admission`, on by default). A deadline is the time by which the request's
last token is due. From measured step times (decode step time per batch size, prefill cost per prompt
token; `serving.driver.calibrate` measures them at load) and each request's `steps` (its max_tokens):
- submit() forecasts when the request would finish: it takes the first free slot of its priority's share
  of the batch after everything queued ahead, waiting slower by the share of steps spent on prefills and
  of capacity taken by higher priorities arriving (their measured work rate). A forecast past the
  deadline is refused at once (`WouldMissDeadline`, HTTP 429) with the forecast wait as Retry-After, or
  none when even an idle server could not make it.
- take() re-forecasts the queue each step and drops (`hopeless`) who can no longer make it, before it
  uses compute; and a newcomer joins only if, at the batch size it makes and with the prefill stall it
  adds, it and every running sequence still finish by their deadlines. A HIGH that needs a smaller batch
  holds back lower priorities until the batch has drained enough.
Predictions are stretched by a safety margin that follows the forecast errors observed (`_Margins`: per
batch-size band, a high quantile of measured / predicted step time averaged over runs of consecutive
steps, as long as a request decodes; `deadline_margin` until enough steps are seen, or always with
`adaptive_margin` off). A request that finishes early (EOS) only frees its slot
sooner: forecasts assume max_tokens, so they err on the side of refusing.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

RATE_WINDOW_S = 2.0  # arrival and service rates average over about the last 2 s
WORK_WINDOW_S = 10.0  # the work each priority brings (decode steps per s) averages over about 10 s
_MARGIN_KEEP, _MARGIN_RUN, _MARGIN_SEEN = 256, 16, 32  # steps kept per band, run length until known, steps before use
_MARGIN_MAX = 0.5  # the margin widens up to +50%: larger errors are a change of regime the step model follows
_MARGIN_RATIO_MAX = 2.0  # one step counts as at most 2x its forecast (a hot switch's load can stall a step 20x)
_BIAS_ALPHA = 0.1  # weight of one request's measured / forecast wait in the wait bias
_MAX_BIAS = 10.0
_MAX_SHARE = 0.9  # predictions count at most 90% of capacity as taken by prefills or higher priorities
_MIN_WINDOW_S = 1.0  # a rate over less than 1 s of history is noise: count it as 1 s
_STEP_ALPHA = 0.05  # step-time fit weight per step: about the last 20 steps
_TABLE_ALPHA = 0.2  # weight of a new step in the per-batch-size step time and the prefill cost
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
    max_batch: int = 32  # sequences decoding together (engine slots)
    reserved_high: int = 4  # batch slots only HIGH may use
    max_wait_ms: float = 50.0  # ms an idle engine may hold requests to fill a batch (the seed paper's 50 ms)
    default_deadline_s: float = 60.0  # s, per-request deadline when the client sets none
    adaptive: bool = True  # follow the live arrival rate and step times (see Admission)
    deadline_admission: bool = True  # refuse at once, or drop early, what measured step times say will be late
    preempt: bool = True  # pause lower priorities so an urgent HIGH runs at a smaller, faster batch (schedule())
    deadline_margin: float = 0.25  # predicted times are stretched by this share (the prior of the adaptive margin)
    adaptive_margin: bool = True  # the margin follows the forecast errors observed (see _Margins)
    margin_quantile: float = 0.95  # which quantile of the observed error ratios the margin covers

    def __post_init__(self) -> None:
        _check("max_queue", self.max_queue, 1, 1_000_000, integer=True)
        _check("high_queue_reserve", self.high_queue_reserve, 0, self.max_queue - 1, integer=True)
        _check("max_batch", self.max_batch, 1, 4096, integer=True)
        _check("reserved_high", self.reserved_high, 0, self.max_batch - 1, integer=True)
        _check("max_wait_ms", self.max_wait_ms, 0, 10_000)
        _check("default_deadline_s", self.default_deadline_s, 0, 86_400, lo_open=True)
        for name in ("adaptive", "deadline_admission", "preempt", "adaptive_margin"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AdmissionConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        _check("deadline_margin", self.deadline_margin, 0, 10)
        _check("margin_quantile", self.margin_quantile, 0.5, 0.999)

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
    """A queued request was dropped before it reached the model: its deadline came, or (`hopeless`) the
    measured step times said it could no longer finish before it."""

    def __init__(self, waited_s: float, deadline_s: float, hopeless: bool = False):
        self.waited_s, self.deadline_s, self.hopeless = waited_s, deadline_s, hopeless
        what = "could no longer finish before its deadline" if hopeless else "reached its deadline"
        super().__init__(f"request waited {waited_s:.3f} s in the queue and {what} of {deadline_s:.3f} s; "
                         f"the server is overloaded: retry later or set a longer `deadline`")


class WouldMissDeadline(Exception):
    """Refused at submit: at the measured step times the request would finish after its deadline (HTTP 429).
    `retry_after_s` is None when even an idle server could not make it (retrying cannot help)."""

    def __init__(self, predicted_s: float, deadline_s: float, steps: int, step_s: float, ahead: int,
                 running: int, retry_after_s: float | None):
        self.predicted_s, self.deadline_s, self.retry_after_s = predicted_s, deadline_s, retry_after_s
        where = (f"{running} running and {ahead} queued ahead" if retry_after_s is not None
                 else "even on an idle server")
        advice = (f"retry after {retry_after_s:.0f} s, set a longer deadline or ask for fewer max_tokens"
                  if retry_after_s is not None else "set a longer deadline or ask for fewer max_tokens")
        super().__init__(f"deadline: {deadline_s:.3f} s cannot be met: {steps} tokens at about "
                         f"{step_s * 1000:.0f} ms per step would finish in about {predicted_s:.1f} s "
                         f"({where}); {advice}")


@dataclass(eq=False)  # identity equality: tickets are handles, safe as dict keys and in sets
class Ticket:
    id: int
    priority: Priority
    arrival: float  # clock time of submit(), s
    deadline: float  # clock time by which its last token is due (it expires if still queued then), s
    payload: Any
    steps: int = 1  # tokens it may generate (max_new_tokens): engine steps it needs at most
    prompt_tokens: int = 0  # tokens its prefill processes
    hopeless: bool = False  # set when take() drops it early because it could no longer finish in time
    forecast_wait: float = 0.0  # s in the queue that submit() forecast for it


@dataclass(eq=False)
class _Live:
    """A sequence in the engine, as the scheduler sees it."""
    deadline: float
    left: int  # steps it may still run
    priority: Priority = Priority.NORMAL
    paused: bool = False
    ticket: Ticket | None = None  # None: not pausable (live given as bare (deadline, steps left) pairs)


@dataclass
class Schedule:
    """What the engine loop does before its next step."""
    admitted: list[Ticket]  # start these (prefilled in the next step)
    expired: list[Ticket]  # fail these with deadline_error(): they never reach the model
    pause: list[Ticket]  # stop stepping these running sequences for now (they keep their slot and cache)
    resume: list[Ticket]  # step these paused sequences again


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
    """Decode step time per batch size, and the prefill cost per prompt token.

    With a calibration (`calibrate`, run by the engine loop at load on an idle engine): the calibrated
    shape (piecewise linear between the measured batch sizes) times a live load factor, the EWMA of
    measured / calibrated over recent decode steps. The factor carries what serving adds (the event loop,
    the client, other processes) to every batch size, including sizes not run lately. Two checks keep it
    from underestimating: a line fitted to live against calibrated step times (a fixed cost per step
    weighs most on small batches), and the live EWMA at the batch size itself; the largest of the three
    is used. Without one: the
    EWMA step time measured at each batch size, else `a + u * batch` from an exponentially weighted
    least-squares line over recent decode steps (the last line fitted while sizes varied is kept).
    Predictions never fall as the batch grows."""

    def __init__(self) -> None:
        self.moments: list[float] | None = None  # E[b], E[s], E[b^2], E[b*s]
        self.line: tuple[float, float] | None = None  # (a s, u s per sequence)
        self.by_batch: dict[int, float] = {}  # batch size -> EWMA decode step time, s
        self.base: dict[int, float] = {}  # batch size -> fastest calibrated decode step, s
        self._envelope: dict[int, float] = {}  # batch size -> max calibrated shape up to it (cache; base is fixed)
        self.load = 1.0  # live decode step time / calibrated shape, EWMA
        self.shape_moments: list[float] | None = None  # E[x], E[y], E[xx], E[xy]: x calibrated, y live step time
        self.prefill_s: float | None = None  # s per prompt token on top of the step's decode time, EWMA

    def calibrate(self, batch: int, seconds: float) -> None:
        self.base[batch] = min(seconds, self.base.get(batch, math.inf))
        self._envelope.clear()

    def add(self, batch: int, seconds: float, prefill_tokens: int = 0) -> None:
        if prefill_tokens > 0:  # a step that also prefilled prompts: what it cost over a decode step
            base = self.decode(batch)
            if base is not None:
                per = max(0.0, seconds - base) / prefill_tokens
                self.prefill_s = per if self.prefill_s is None else self.prefill_s + _TABLE_ALPHA * (per - self.prefill_s)
            return
        if self.base:
            x = self._shape(batch)
            self.load += _STEP_ALPHA * (seconds / x - self.load)
            sample = [x, seconds, x * x, x * seconds]
            self.shape_moments = sample if self.shape_moments is None else \
                [m + _STEP_ALPHA * (v - m) for m, v in zip(self.shape_moments, sample)]
        old = self.by_batch.get(batch)
        self.by_batch[batch] = seconds if old is None else old + _TABLE_ALPHA * (seconds - old)
        sample = [batch, seconds, batch * batch, batch * seconds]
        if self.moments is None:
            self.moments = sample
        else:
            self.moments = [m + _STEP_ALPHA * (x - m) for m, x in zip(self.moments, sample)]
        b, s, bb, bs = self.moments
        if bb - b * b >= 0.25:  # batch sizes spread by about one sequence or more
            u = (bs - b * s) / (bb - b * b)
            self.line = (s - u * b, u)

    def _shape(self, batch: int) -> float:
        """Calibrated step time at `batch`: linear between measured sizes, flat below the smallest, and
        extended by the last segment's slope (never negative) above the largest."""
        sizes = sorted(self.base)
        lo = max([b for b in sizes if b <= batch], default=sizes[0])
        hi = min([b for b in sizes if b >= batch], default=sizes[-1])
        if lo == hi:
            if batch <= sizes[-1] or len(sizes) == 1:
                return self.base[lo]
            b0, b1 = sizes[-2], sizes[-1]
            slope = max(0.0, (self.base[b1] - self.base[b0]) / (b1 - b0))
            return self.base[b1] + slope * (batch - b1)
        return self.base[lo] + (self.base[hi] - self.base[lo]) * (batch - lo) / (hi - lo)

    def decode(self, batch: int) -> float | None:
        """Predicted decode step time at `batch` sequences, s (see the class); None before any measurement."""
        if self.base:
            x = self._envelope.get(batch)
            if x is None:  # forecasts ask for the same few sizes many times a step: compute each once
                x = self._envelope[batch] = max(self._shape(b) for b in range(1, max(1, batch) + 1))
            return max(x * self.load, self._affine(x), self.by_batch.get(batch, 0.0))
        if not self.by_batch:
            return None
        if batch in self.by_batch:
            value = self.by_batch[batch]
        elif self.line is not None:
            value = self.line[0] + self.line[1] * batch
        else:  # one batch size seen: the nearest measurement
            value = self.by_batch[min(self.by_batch, key=lambda b: abs(b - batch))]
        return max([value] + [s for b, s in self.by_batch.items() if b < batch])

    def _affine(self, x: float) -> float:
        """`alpha * x + beta` fitted to live step times against the calibrated ones over recent decode steps:
        contention that adds a fixed cost per step (waiting for a core at each parallel region) weighs most
        on small batches, which a plain ratio would underestimate. 0 until the sizes run have spread."""
        if self.shape_moments is None:
            return 0.0
        mx, my, mxx, mxy = self.shape_moments
        var = mxx - mx * mx
        if var <= (0.1 * mx) ** 2:  # calibrated times of the recent sizes spread by under ~10%
            return 0.0
        alpha = max(0.0, (mxy - mx * my) / var)
        return alpha * x + my - alpha * mx

    def prefill(self, tokens: int) -> float:
        return (self.prefill_s or 0.0) * tokens


class _Margins:
    """The forecast's safety margin, learned from its own errors. Each decode step the model predicted
    (before learning from it) is compared with its measured time; the ratios are kept per batch-size band
    (1, 2, 3-4, 5-8, ...), the last `_MARGIN_KEEP` of each. A deadline is met or missed over a whole
    request, not one step, so the ratios are averaged over runs of as many consecutive steps as a request
    decodes on average (measured: sequence-steps per finished request; `_MARGIN_RUN` until known, within
    [8, 128]) and the margin is the `quantile` of those run means, less one, but never below the
    configured margin (the prior) nor above _MARGIN_MAX: it only widens when the errors call for it.
    (Letting it fall below the prior was measured and not kept: BENCHMARKS section 9.) A step counts as
    at most `_MARGIN_RATIO_MAX` times its forecast: a step that waited for a variant loading beside it
    (hot switch) runs 10-20x long, and unclipped such steps kept the margin at its cap for hundreds of
    steps after the load was done, so queued requests were dropped as hopeless (a hot-switch test saw it). A band with fewer than `_MARGIN_SEEN` steps borrows the nearest
    band that has them, else the configured prior."""

    def __init__(self, prior: float, quantile: float) -> None:
        self.prior, self.quantile = prior, quantile
        self._ratios: dict[int, collections.deque] = {}
        self._seen: collections.Counter = collections.Counter()
        self._cached: dict[int, float] = {}

    @staticmethod
    def band(batch: int) -> int:
        return max(1, batch - 1).bit_length() if batch > 1 else 0

    def observe(self, batch: int, predicted: float, measured: float, run: int = 0) -> None:
        if predicted <= 0 or measured <= 0:
            return
        run = min(128, max(8, run or _MARGIN_RUN))
        b = self.band(batch)
        ratios = self._ratios.setdefault(b, collections.deque(maxlen=_MARGIN_KEEP))
        ratios.append(min(_MARGIN_RATIO_MAX, measured / predicted))
        self._seen[b] += 1
        if self._seen[b] >= _MARGIN_SEEN and self._seen[b] % 8 == 0:  # refreshed every 8 steps of the band
            values = np.fromiter(ratios, float)
            runs = np.convolve(values, np.ones(run) / run, mode="valid") if len(values) >= run else [values.mean()]
            self._cached[b] = float(np.clip(np.quantile(runs, self.quantile) - 1.0, self.prior,
                                              max(self.prior, _MARGIN_MAX)))

    def margin(self, batch: int) -> float:
        if not self._cached:
            return self.prior
        b = self.band(batch)
        return self._cached[b] if b in self._cached else self._cached[min(self._cached, key=lambda k: abs(k - b))]

    def snapshot(self) -> dict[str, float]:
        return {f"<={1 << b}": round(m, 3) for b, m in sorted(self._cached.items())}


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
        self._margins = _Margins(cfg.deadline_margin, cfg.margin_quantile)
        self._seq_steps = self._finished = 0.0  # decayed counts: sequence-steps run, requests finished
        self._last_running: int | None = None
        self._last_admitted = 0
        self._live: list[_Live] = []  # the sequences in the engine, as of the last take() or schedule()
        self._preempts = False  # the engine loop calls schedule(): it can pause sequences
        self._wait_bias = {p: 1.0 for p in Priority}  # measured / forecast queue wait, EWMA, in [1, _MAX_BIAS]
        self._work_in = {p: _Rate(WORK_WINDOW_S) for p in Priority}  # decode steps accepted per s, by priority
        self._prefill_share = 0.0  # share of step time spent prefilling newcomers, EWMA over steps
        self._step_s = self._tokens_per_s = 0.0
        self.counters = {c: {p.name.lower(): 0 for p in Priority}
                         for c in ("submitted", "admitted", "rejected", "expired", "cancelled", "paused")}

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
               deadline_s: float | None = None, steps: int = 1, prompt_tokens: int = 0) -> Ticket:
        """Queue a request that may generate `steps` tokens after prefilling `prompt_tokens`. Raises
        QueueFull, or WouldMissDeadline when the measured step times say it cannot finish in time."""
        priority = Priority.parse(priority)
        if deadline_s is None:
            deadline_s = self.cfg.default_deadline_s
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or \
                not math.isfinite(deadline_s) or deadline_s <= 0:
            raise ValueError(f"deadline: expected a number of seconds > 0, got {deadline_s!r}")
        for name, value, lo in (("steps", steps, 1), ("prompt_tokens", prompt_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        now, key = self.clock(), priority.name.lower()
        self.counters["submitted"][key] += 1
        queued = self.queued()
        limit = self.cfg.max_queue - (0 if priority == Priority.HIGH else self.cfg.high_queue_reserve)
        if queued >= limit:
            self.counters["rejected"][key] += 1
            raise QueueFull(priority, queued, limit, self._retry_after(priority, now))
        ticket = Ticket(next(self._ids), priority, now, now + deadline_s, payload, steps, prompt_tokens)
        refusal = self._refusal(ticket, now)
        if refusal is not None:
            self.counters["rejected"][key] += 1
            raise refusal
        self._queues[priority][ticket.id] = ticket
        self._work_in[priority].add(now, steps)
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
        return DeadlineExceeded(self.clock() - ticket.arrival, ticket.deadline - ticket.arrival, ticket.hopeless)

    # -- deadline predictions (cfg.deadline_admission) ------------------------------------------
    def _predicting(self) -> bool:
        return self.cfg.deadline_admission and self._steps.decode(1) is not None

    def _stretch(self, batch: int) -> float:
        """1 + the safety margin for forecasts at `batch` sequences (module docstring, `_Margins`)."""
        return 1.0 + (self._margins.margin(batch) if self.cfg.adaptive_margin else self.cfg.deadline_margin)

    def _run_s(self, t: Ticket, batch: int) -> float:
        """Predicted seconds from `t` joining a batch of `batch` sequences to its last token, margin included:
        its prefill plus `t.steps` steps (the first token comes out of the prefill step)."""
        return (self._steps.prefill(t.prompt_tokens) + t.steps * self._steps.decode(batch)) * self._stretch(batch)

    def _drain_s(self) -> list[float]:
        """drain[k - 1]: seconds until the running batch has at most k - 1 sequences if nothing joins, for
        batch sizes k = 1 .. min(running + 1, max batch) (steps at today's batch size, margin included)."""
        left = sorted(x.left for x in self._live)
        n, step = len(left), self._steps.decode(max(1, len(left)))
        stretch = self._stretch(max(1, n))
        return [0.0 if n <= k - 1 else left[n - k] * step * stretch
                for k in range(1, min(n + 1, self.max_batch()) + 1)]

    def _soonest_finish(self, t: Ticket, now: float, drain: list[float]) -> float:
        """Earliest predicted finish of `t` (clock time) if it joined as soon as the running batch drained to
        a size at which it finishes soonest; a lower bound when others keep joining."""
        return now + min(d + self._run_s(t, k) for k, d in enumerate(drain, start=1))

    def _forecast(self, priority: Priority, now: float, extra: Ticket | None = None
                  ) -> Iterator[tuple[Ticket, float, float, float, int]]:
        """(ticket, predicted finish, predicted wait s, step s, queued ahead) for each ticket of `priority`, in
        queue order, then `extra` as if queued last. Each takes the first free slot of its priority's share of
        the batch (HIGH: all of it) after everything queued ahead of it. While it waits, the prefills of
        those ahead stall every step, and higher priorities arriving meanwhile go first: its share of the
        engine is what they leave (their measured work rate). HIGH joins as soon as the batch lets it (lower
        priorities wait for it), so the first HIGH may also take the drain path."""
        cap = self.max_batch()
        slots = cap if priority == Priority.HIGH else max(1, cap - self.cfg.reserved_high)
        left = sorted(x.left for x in self._live)
        free_at = left[-slots:] if len(left) >= slots else left + [0] * (slots - len(left))  # steps
        heapq.heapify(free_at)
        ahead = 0
        prefills = 0.0
        for p in Priority:
            if p < priority:
                for q in self._queues[p].values():
                    heapq.heappush(free_at, heapq.heappop(free_at) + q.steps)
                    prefills += self._steps.prefill(q.prompt_tokens)
                    ahead += 1
        capacity = cap / self._steps.decode(cap)  # sequence-steps per s at a full batch
        higher = sum(self._work_in[p].rate(now) for p in Priority if p < priority) / capacity
        stall = 1.0 / (1.0 - min(self._prefill_share, _MAX_SHARE))
        slowdown = stall / (1.0 - min(higher, _MAX_SHARE))
        own = list(self._queues[priority].values()) + ([extra] if extra is not None else [])
        active = sum(not x.paused for x in self._live)
        # a request submitted mid-step joins after the step in progress (take() runs between steps)
        in_progress = self._steps.decode(active) * stall if active else 0.0
        for t in own:
            batch = min(cap, len(left) + ahead + 1)
            step, stretch = self._steps.decode(batch), self._stretch(batch)
            wait = (free_at[0] * step * slowdown + prefills) * stretch * self._wait_bias[priority]
            if t is extra:
                wait += in_progress * stretch
            finish = now + wait + self._run_s(t, batch) * stall
            if priority == Priority.HIGH and ahead == 0:
                finish = min(finish, self._soonest_finish(t, now, self._drain_s()))
                if self._preempts:  # or at once, pausing lower priorities that can wait for it
                    active = [x for x in self._live if not x.paused]
                    victims = self._victims(t, now, self._protected(now, active), len(active),
                                            self._steps.prefill(t.prompt_tokens))
                    if victims is not None:
                        finish = min(finish, now + self._run_s(t, len(active) - len(victims) + 1))
            yield t, finish, wait, step, ahead
            heapq.heappush(free_at, heapq.heappop(free_at) + t.steps)
            prefills += self._steps.prefill(t.prompt_tokens)
            ahead += 1

    def _refusal(self, t: Ticket, now: float) -> WouldMissDeadline | None:
        """Why `t` must be refused at submit (its forecast finish is past its deadline), or None."""
        if not self._predicting():
            return None
        *_, (_, finish, wait, step, ahead) = self._forecast(t.priority, now, extra=t)
        t.forecast_wait = wait
        if finish <= t.deadline:
            return None
        retry = None if now + self._run_s(t, 1) > t.deadline else float(max(1, math.ceil(wait)))
        return WouldMissDeadline(finish - now, t.deadline - now, t.steps, step, ahead, len(self._live), retry)

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
    def take(self, running: int, running_high: int,
             live: Sequence[tuple[float, int]] | None = None) -> tuple[list[Ticket], list[Ticket]]:
        """(admitted, expired) for the next step. `running` counts the sequences in the batch now, those
        admitted by the previous take() included (finishes are inferred from it); `running_high` of them are
        HIGH. `live` gives (deadline, steps left) per running sequence: with it, a newcomer joins only if it and
        every running sequence still finish in time at the larger batch, and a queued request that no
        longer can is dropped at once (`hopeless`) rather than at its deadline. Never pauses anything
        (see `schedule`)."""
        pairs = None if live is None else [_Live(float(d), int(r)) for d, r in live]
        sched = self._schedule(running, running_high, pairs, preempt=False)
        return sched.admitted, sched.expired

    def schedule(self, running: int, running_high: int, live: Sequence[tuple[Ticket, int, bool]]) -> Schedule:
        """`take` for an engine that can pause sequences: `live` gives (ticket, steps left, paused) per
        sequence in the engine (`running` of them, paused ones included). A HIGH newcomer that needs a smaller
        batch than the running one, to finish by its deadline, may pause lower-priority sequences that can
        afford to wait for it (LOW first, most slack first); paused sequences resume, ahead of the queue of
        their priority, as soon as the batch can take them back on time (or at once when nothing else runs)."""
        seqs = [_Live(t.deadline, int(left), t.priority, bool(paused), t) for t, left, paused in live]
        self._preempts = self.cfg.preempt
        return self._schedule(running, running_high, seqs, preempt=self.cfg.preempt)

    def _schedule(self, running: int, running_high: int, live: list[_Live] | None, preempt: bool) -> Schedule:
        if isinstance(running, bool) or not isinstance(running, int) or running < 0 or \
                not isinstance(running_high, int) or not 0 <= running_high <= running:
            raise ValueError(f"take: expected 0 <= running_high <= running, got running={running!r}, "
                             f"running_high={running_high!r}")
        now = self.clock()
        self._note_finished(running, now)
        self._live = live if live is not None else []
        expired = [t for q in self._queues.values() for t in q.values() if now >= t.deadline - _EPS]
        if self._predicting() and live is not None:
            for p in Priority:  # the forecast changed (arrivals, slower steps): drop who can no longer make it
                for t, finish, *_ in self._forecast(p, now):
                    if now < t.deadline - _EPS and finish > t.deadline:
                        t.hopeless = True
                        expired.append(t)
        for t in expired:
            del self._queues[t.priority][t.id]
            self.counters["expired"][t.priority.name.lower()] += 1
            self._learn_wait(t, now, dropped=True)
        plan = self._predicting() and live is not None
        sched = Schedule([], expired, [], [])
        if self._ready(running, now) or any(x.paused for x in self._live):
            self._pick(running, running_high, now if plan else None, preempt, sched)
        self._last_running, self._last_admitted = running, len(sched.admitted)
        return sched

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

    def _pick(self, running: int, running_high: int, now: float | None, preempt: bool, sched: Schedule) -> None:
        """Who joins, resumes or pauses: HIGH first, FIFO within a priority (paused ones ahead of the queue),
        within the free and non-HIGH slots. With `now` (deadline planning), a ticket joins only if the batch
        it makes lets it and every sequence in it finish in time; a HIGH that does not fit may pause
        lower-priority sequences (`preempt`), else it holds back the lower priorities until the batch drains."""
        cap = self.max_batch()
        free = max(0, cap - running)
        free_non_high = max(0, cap - self.cfg.reserved_high - (running - running_high))
        active = [x for x in self._live if not x.paused]
        batch = len(active) if self._live else running  # sequences the next step runs
        # running sequences whose deadline is protected, and the newcomers
        members = self._protected(now, active) if now is not None else []
        stall = 0.0  # s the newcomers' prefills add to this step, so to every member's finish

        def on_time(group: list[_Live], size: int, extra_s: float) -> bool:
            step, stretch = self._steps.decode(size), self._stretch(size)
            return all((x.left * step + extra_s) * stretch <= x.deadline - now for x in group)

        for p in Priority:
            held = False
            for x in [x for x in self._live if x.paused and x.priority == p]:
                if now is None or batch == 0 or on_time(members, batch + 1, stall):
                    if x.ticket in sched.pause:  # paused for a HIGH earlier in this pass, yet the batch fits it
                        sched.pause.remove(x.ticket)  # (the victims are a greedy prefix): it never stops
                        self.counters["paused"][x.priority.name.lower()] -= 1
                    else:
                        sched.resume.append(x.ticket)
                    x.paused = False
                    batch += 1
                    if now is not None and on_time([x], batch, stall):  # protected, not pausable again now
                        members.append(_Live(x.deadline, x.left, x.priority))
                else:
                    held = True  # nor may later ones of this priority jump ahead of it
            queue = self._queues[p]
            room = free if p == Priority.HIGH else min(free, free_non_high)
            for t in list(queue.values()):
                if room <= 0 or (held and p != Priority.HIGH):
                    break
                if now is not None:
                    with_t = stall + self._steps.prefill(t.prompt_tokens)
                    newcomer = _Live(t.deadline, t.steps, p)
                    if not on_time(members + [newcomer], batch + 1, with_t):
                        victims = self._victims(t, now, members, batch, with_t) \
                            if preempt and p == Priority.HIGH else None
                        if victims is None:
                            held = held or p == Priority.HIGH
                            continue
                        for v in victims:
                            members.remove(v)
                            v.paused = True
                            sched.pause.append(v.ticket)
                            self.counters["paused"][v.priority.name.lower()] += 1
                        batch -= len(victims)
                    members.append(newcomer)
                    stall = with_t
                del queue[t.id]
                self._learn_wait(t, self.clock(), dropped=False)
                sched.admitted.append(t)
                batch += 1
                room -= 1
                free -= 1
                free_non_high -= 0 if p == Priority.HIGH else 1
                self.counters["admitted"][p.name.lower()] += 1
            if held:
                break  # let the batch drain until the waiting HIGH (or paused sequence) fits

    def _learn_wait(self, t: Ticket, now: float, dropped: bool) -> None:
        """Compare the wait submit() forecast for `t` with the wait it had, so later forecasts of its priority
        correct a systematic error (the forecast cannot see the higher-priority requests still to come, or
        the pauses they cause). A dropped request waited at least that long: counted only when it says the
        forecast was too short."""
        if not self._predicting():
            return
        ratio = min(_MAX_BIAS, (now - t.arrival) / max(t.forecast_wait, 0.1))
        if dropped and ratio <= 1.0:
            return
        bias = self._wait_bias[t.priority]
        self._wait_bias[t.priority] = min(_MAX_BIAS, max(1.0, bias + _BIAS_ALPHA * (ratio - bias)))

    def _protected(self, now: float, active: list[_Live]) -> list[_Live]:
        """The stepping sequences that can still make their deadline at some batch size: newcomers must not
        make them (later) late. One that could not make it even alone is not protected by holding others
        back."""
        step_one = self._steps.decode(1)
        return [x for x in active if x.deadline - now >= x.left * step_one * self._stretch(1)]

    def _victims(self, t: Ticket, now: float, members: list[_Live], batch: int, stall: float) -> list[_Live] | None:
        """Running lower-priority sequences to pause so that HIGH `t` fits, LOW first and most slack first,
        each able to wait for `t` to finish (at today's batch size: an upper bound) and still make its
        deadline; None if no such set makes `t` fit."""
        stretch = self._stretch(max(1, batch))
        step_now = self._steps.decode(max(1, batch))
        wait = (t.steps * self._steps.decode(batch + 1) + stall) * self._stretch(batch + 1)  # paused until t is done
        pool = sorted((x for x in members if x.ticket is not None and x.priority != Priority.HIGH
                       and now + wait + x.left * step_now * stretch <= x.deadline),
                      key=lambda x: (-x.priority, -(x.deadline - now - x.left * step_now * stretch)))
        newcomer = _Live(t.deadline, t.steps, t.priority)
        for n in range(1, len(pool) + 1):
            victims, size = pool[:n], batch - n + 1
            step = self._steps.decode(size)
            kept = [x for x in members if not any(x is v for v in victims)] + [newcomer]
            if all((x.left * step + stall) * self._stretch(size) <= x.deadline - now for x in kept):
                return victims
        return None

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

    def observe_step(self, batch: int, seconds: float, tokens: int, prefill_tokens: int = 0,
                     calibration: bool = False) -> None:
        """One step ran `batch` sequences in `seconds` and produced `tokens` tokens, prefilling `prefill_tokens`
        prompt tokens of newcomers on the way. `calibration`: a decode step timed on an otherwise idle engine
        before serving (`serving.driver.calibrate`): it gives the shape of step time over batch sizes."""
        if batch <= 0 or seconds <= 0:
            return  # an empty or unmeasured step says nothing about step time
        if calibration and not prefill_tokens:
            self._steps.calibrate(batch, seconds)
            return
        predicted = self._steps.decode(batch)
        if predicted is not None and not calibration:  # how wrong the forecast was, before it learns
            steps = round(self._seq_steps / self._finished) if self._finished >= 1.0 else 0  # a mean request's
            self._margins.observe(batch, predicted + self._steps.prefill(prefill_tokens), seconds, steps)
        self._steps.add(batch, seconds, prefill_tokens)
        share = min(1.0, self._steps.prefill(prefill_tokens) / seconds) if prefill_tokens else 0.0
        self._prefill_share += _STEP_ALPHA * (share - self._prefill_share)
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
            "step_load_factor": round(self._steps.load, 3),  # live / calibrated decode step time
            "wait_bias": {p.name.lower(): round(self._wait_bias[p], 3) for p in Priority},
            "deadline_margin": self._margins.snapshot() if self.cfg.adaptive_margin else self.cfg.deadline_margin,
            "counters": {c: dict(v) for c, v in self.counters.items()},
        }
