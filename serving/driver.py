"""The engine loop: admission control and the continuous-batching engine, driven from asyncio.

One `EngineLoop` per served variant. Request handlers call `submit()` (a full queue raises
`QueueFull`, sent as HTTP 429) and read the returned `Generation`'s tokens as they come. The loop task
alternates two things: between steps it asks the `Admission` controller (`schedule`) which queued
requests join the batch (expired ones fail with `DeadlineExceeded` before they use compute), which
running ones pause to make room for an urgent HIGH request and which resume, and applies
cancellations; then it runs one `Engine.step()` on the process's compute thread, so the event loop
keeps serving HTTP while the model computes, and hands each new token to its request.

`retire()` is the hot-switch half of this module: the loop stops taking requests, lets every queued
and running one finish on its own weights, then ends. Handlers that race with a retire get
`Retired` from `submit()` and resubmit to the variant's replacement.

    loop = EngineLoop(engine, Admission(AdmissionConfig()), name="int8")
    gen = loop.submit(prompt_ids, SamplingParams(max_new_tokens=32), priority="high", deadline_s=5)
    async for token_id in gen: ...

One compute thread per process (`compute_executor`). Every engine step of every loop, and the
calibration steps of a variant being loaded, run on that one thread. Both runtimes compute through
OpenMP (llama.cpp's ggml and torch, built against libgomp), and libgomp keeps a team of worker threads
for each thread that opens a parallel region; once the process holds more OpenMP threads than cores,
every barrier sleeps on a futex instead of spinning, and a step has hundreds of barriers. Measured
(BENCHMARKS.md, section 6): the same llama.cpp engine replaying the serving trace ran at 190-207 tok/s
from one thread and at 158 tok/s once a single step had run on a second thread (decode at batch 16:
43-45 against 55-58 ms a step), which is what the server did when it calibrated on the loading thread
and served on its own engine thread. Steps of two served variants take turns on the thread; on this
CPU, running them side by side would only split the same cores.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from serving.admission import Admission, Priority, Ticket
from costopt.runtimes.engine import Engine, SamplingParams, StepEvent
from costopt.runtimes.slots import TokenLogprobs


_log = logging.getLogger(__name__)


class Retired(RuntimeError):
    """The loop is draining for a hot switch; resubmit to the variant's new loop."""


class EngineFault(RuntimeError):
    """An engine step failed: every request of its batch ends with this. The server log holds the traceback
    under `incident`; clients see the id only, never the internals (HTTP 500)."""

    def __init__(self, incident: str) -> None:
        self.incident = incident
        super().__init__(f"internal error in the model engine; the server log holds the details under "
                         f"incident {incident}")


@dataclass(eq=False)
class Generation:
    """One request's progress: token ids arrive on `queue`; the last item is its finish reason or an error.
    `tokens` (and `logprobs`, for a request that asked) hold every token delivered so far."""

    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority
    submitted: float  # time.monotonic() s
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ticket: Ticket | None = None
    started: float | None = None  # monotonic s when it joined the batch
    first_token: float | None = None  # monotonic s of its first token
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # tokens[i]'s, when params.logprobs >= 0
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    paused: bool = False  # in the engine but not stepped: a scheduler made room for a HIGH request

    async def __aiter__(self) -> AsyncIterator[int]:
        while True:
            item = await self.queue.get()
            if isinstance(item, int):
                yield item
            elif isinstance(item, BaseException):
                raise item
            else:
                return


CALIBRATION_PROMPT_TOKENS = 8
_COMPUTE_PREFIX = "costopt-compute"
_compute: concurrent.futures.ThreadPoolExecutor | None = None
_compute_lock = threading.Lock()


def compute_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one thread for model compute (the module docstring says why), made on first use."""
    global _compute
    with _compute_lock:
        if _compute is None:
            _compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=_COMPUTE_PREFIX)
        return _compute


def on_compute(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on the compute thread, waiting for it (called on that thread, it just runs)."""
    if threading.current_thread().name.startswith(_COMPUTE_PREFIX):
        return fn(*args)
    return compute_executor().submit(fn, *args).result()


def calibrate(engine: Engine, admission: Admission, sizes: Sequence[int] | None = None, steps: int = 2,
              call: Callable[..., Any] = on_compute) -> None:
    """Time a few steps at several batch sizes on a dummy prompt and feed them to `admission`, so deadline
    predictions hold from the first request (live steps refine them). Call before the loop starts; about
    `steps + 1` steps per size (a few seconds for the built-in model at batch 32 on CPU). Each step runs
    through `call` (default: on the compute thread, one at a time, so a variant loading during a hot switch
    takes turns with the one serving instead of blocking it); the step's time is measured there."""
    if engine.has_work():
        raise RuntimeError("calibrate: the engine is running sequences; calibrate before serving")
    top = min(engine.max_batch, 64)
    sizes = sorted({b for b in (sizes or (1, 2, 4, 8, 16, 32, top)) if 1 <= b <= top})
    prompt = [1 + i % (engine.vocab_size - 1) for i in range(CALIBRATION_PROMPT_TOKENS)]
    params = SamplingParams(max_new_tokens=steps + 1)

    def timed_step() -> tuple[float, int]:
        t0 = time.perf_counter()
        events = engine.step()
        return time.perf_counter() - t0, len(events)

    engine.add("warm-up", prompt, SamplingParams(max_new_tokens=2))  # first calls pay one-off setup costs
    while engine.has_work():
        call(timed_step)
    timed: list[tuple[int, float, int, int]] = []  # (batch, seconds, tokens, prefill tokens)
    for size in sizes:
        for i in range(size):
            engine.add(("calibrate", i), prompt, params)
        prefill = size * len(prompt)
        while engine.has_work():
            seconds, n_events = call(timed_step)
            timed.append((size, seconds, n_events, prefill))
            prefill = 0
    for step in sorted(timed, key=lambda x: x[3] > 0):  # decode steps first: a prefill's cost is its excess
        admission.observe_step(*step, calibration=True)


class EngineLoop:
    """Runs one engine: admission between steps, steps on the compute thread, tokens to their requests."""

    def __init__(self, engine: Engine, admission: Admission, name: str,
                 on_step: Callable[[int, float, int, int, int], None] | None = None) -> None:
        self.engine, self.admission, self.name = engine, admission, name
        self._on_step = on_step  # (batch, seconds, tokens, prompt tokens computed, reused) -> metrics
        self._pool = compute_executor()  # shared by every loop of the process (the module docstring)
        self._ids = itertools.count()
        self._live: dict[int, Generation] = {}  # seq_id -> generation, for those in the engine
        self._to_cancel: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._retiring = False
        self.done = asyncio.Event()  # set when a retired loop has finished its last request

    # -- handlers' side -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, priority: Any = None,
               deadline_s: float | None = None) -> Generation:
        """Queue a request; raises QueueFull or WouldMissDeadline (-> 429), Retired (resubmit elsewhere) or
        ValueError."""
        if self._retiring:
            raise Retired(self.name)
        gen = Generation(list(prompt_ids), params, Priority.parse(priority), time.monotonic())
        gen.ticket = self.admission.submit(gen, gen.priority, deadline_s, steps=params.max_new_tokens,
                                           prompt_tokens=len(gen.prompt_ids))
        self._ensure_task()
        self._wake.set()
        return gen

    def cancel(self, gen: Generation) -> None:
        """The client went away: drop it from the queue, or free its engine slot before the next step."""
        if gen.finish_reason is not None or gen.error is not None or gen.cancelled:
            return
        gen.cancelled = True
        if gen.ticket is not None and self.admission.cancel(gen.ticket):
            return
        for seq_id, live in self._live.items():
            if live is gen:
                self._to_cancel.append(seq_id)
                self._wake.set()
                return

    @property
    def in_flight(self) -> int:
        return self.admission.queued() + len(self._live)

    def running_by_priority(self) -> tuple[int, int]:
        return len(self._live), sum(g.priority == Priority.HIGH for g in self._live.values())

    async def retire(self) -> None:
        """Take no new requests; return once every queued and running one has finished."""
        self._retiring = True
        self._wake.set()
        if self.in_flight == 0:
            await self._stop()
        else:
            await self.done.wait()

    # -- the loop -----------------------------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{self.name}")

    async def _stop(self) -> None:
        self.done.set()

    async def _run(self) -> None:
        while not self.done.is_set():
            running, running_high = self.running_by_priority()
            live = [(g.ticket, g.params.max_new_tokens - len(g.tokens), g.paused) for g in self._live.values()]
            plan = self.admission.schedule(running, running_high, live)
            for t in plan.expired:
                self._finish(t.payload, error=self.admission.deadline_error(t))
            adds = [(next(self._ids), t.payload) for t in plan.admitted if not t.payload.cancelled]
            cancels, self._to_cancel = self._to_cancel, []
            pauses, resumes = self._seq_ids(plan.pause, paused=True), self._seq_ids(plan.resume, paused=False)
            if adds or cancels or resumes or self.engine.has_work():
                await self._step(adds, cancels, pauses, resumes)
                continue
            if self._retiring and self.in_flight == 0:
                await self._stop()
                return
            self._wake.clear()
            wait = self.admission.next_wakeup(0)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def _seq_ids(self, tickets: Sequence[Ticket], paused: bool) -> list[int]:
        """The engine ids of the running sequences behind `tickets`, marked paused or not."""
        if not tickets:
            return []
        wanted = {id(t.payload) for t in tickets}
        ids = [seq_id for seq_id, g in self._live.items() if id(g) in wanted]
        for seq_id in ids:
            self._live[seq_id].paused = paused
        return ids

    async def _step(self, adds: list[tuple[int, Generation]], cancels: list[int], pauses: Sequence[int] = (),
                    resumes: Sequence[int] = ()) -> None:
        now = time.monotonic()
        for seq_id, gen in adds:
            gen.started = now
            self._live[seq_id] = gen
        t0, reused = time.perf_counter(), self.engine.reused_tokens
        try:
            events = await asyncio.get_running_loop().run_in_executor(self._pool, self._work, adds, cancels,
                                                                      pauses, resumes)
        except Exception as exc:  # a failed step fails every request in the batch, never the server
            fault = EngineFault(uuid.uuid4().hex[:12])
            _log.error("engine %s: a step failed (incident %s); its %d requests fail", self.name, fault.incident,
                       len(self._live), exc_info=exc)
            for seq_id in list(self._live):
                self._finish(self._live.pop(seq_id), error=fault)
            self.engine.clear()  # the worker is idle now; a row left behind would fail every later step
            return
        seconds = time.perf_counter() - t0
        batch = sum(not g.paused for g in self._live.values())  # the sequences this step ran
        self._deliver(events)
        tokens = sum(e.token_id is not None for e in events)
        # the prompt tokens the step computed: a prefix-cache hit copies the rest (costopt.runtimes.slots)
        self.admission.observe_step(batch, seconds, tokens, self.engine.last_prefill_tokens)
        if self._on_step is not None:
            self._on_step(batch, seconds, tokens, self.engine.last_prefill_tokens,
                          self.engine.reused_tokens - reused)

    def _work(self, adds: list[tuple[int, Generation]], cancels: list[int], pauses: Sequence[int] = (),
              resumes: Sequence[int] = ()) -> list[StepEvent]:
        """On the compute thread: the only place that touches the engine while the loop runs."""
        for seq_id in cancels:
            self.engine.cancel(seq_id)
        for seq_id in resumes:
            if seq_id not in cancels:
                self.engine.resume(seq_id)
        for seq_id in pauses:
            if seq_id not in cancels:
                self.engine.pause(seq_id)
        failed = []
        for seq_id, gen in adds:
            try:
                self.engine.add(seq_id, gen.prompt_ids, gen.params)
            except (ValueError, RuntimeError) as exc:  # checked by the handler first; never fatal here
                failed.append(StepEvent(seq_id, None, "error:" + str(exc)))
        return failed + self.engine.step()

    def _deliver(self, events: list[StepEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            gen = self._live.get(ev.seq_id)
            if gen is None:
                continue
            if ev.token_id is not None:
                gen.first_token = gen.first_token or now
                gen.tokens.append(ev.token_id)
                if ev.logprobs is not None:  # before the id is queued: a reader of tokens[i] finds logprobs[i]
                    gen.logprobs.append(ev.logprobs)
                gen.queue.put_nowait(ev.token_id)
            if ev.finish_reason is not None:
                del self._live[ev.seq_id]
                if ev.finish_reason.startswith("error:"):
                    self._finish(gen, error=ValueError(ev.finish_reason[len("error:"):]))
                else:
                    self._finish(gen, reason=ev.finish_reason)

    def _finish(self, gen: Generation, reason: str | None = None, error: BaseException | None = None) -> None:
        gen.finish_reason, gen.error = reason, error
        gen.queue.put_nowait(error if error is not None else reason)
