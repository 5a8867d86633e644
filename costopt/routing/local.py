"""The router's tiers as in-process engines: `generate` for `costopt.routing.router.route` without HTTP.

The route phase (`tasks.route`) judges the router on held-out prompts by running the real router over
real engines (each tier's continuous-batching engine from the runtime registry), many requests at once:
every request is an asyncio task whose `generate` adds a sequence to its tier's engine and awaits its
tokens; one pump steps every engine with work and hands each event to its sequence. An escalation
closes the generator, which cancels the sequence in its engine. Engines are not thread-safe, and
nothing here uses threads: all of it runs on one event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from costopt.routing.router import Finish, Token


class LocalTiers:
    """`engines`: tier name -> an engine with the interface of `costopt.runtimes.slots.SlotEngine`."""

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines
        self._queues: dict[tuple[str, int], asyncio.Queue] = {}
        self._ids = itertools.count()
        self.steps = {name: 0 for name in engines}  # engine steps per tier
        self.tokens = {name: 0 for name in engines}  # tokens generated per tier, dropped ones included

    async def generate(self, tier: str, ids: list[int], max_new: int) -> AsyncIterator[Token | Finish]:
        from costopt.runtimes.slots import SamplingParams

        seq = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[(tier, seq)] = queue
        engine = self.engines[tier]
        engine.add(seq, list(ids), SamplingParams(max_new_tokens=max_new, logprobs=0))
        done = False
        try:
            while True:
                ev = await queue.get()
                if ev.token_id is not None and ev.finish_reason != "stop":
                    yield Token(ev.token_id, math.exp(ev.logprobs.logprob), ev.logprobs.entropy)
                if ev.finish_reason is not None:
                    done = True
                    yield Finish(ev.finish_reason)
                    return
        finally:
            self._queues.pop((tier, seq), None)
            if not done:
                engine.cancel(seq)  # escalated (or abandoned): its slot is free at the next step

    async def pump(self, stop: asyncio.Event) -> None:
        """Step every engine that has work until `stop` is set; each event goes to its sequence's queue."""
        while not stop.is_set():
            busy = False
            for name, engine in self.engines.items():
                if not engine.has_work():
                    continue
                busy = True
                self.steps[name] += 1
                for ev in engine.step():
                    if ev.token_id is not None:
                        self.tokens[name] += 1
                    q = self._queues.get((name, ev.seq_id))
                    if q is not None:
                        q.put_nowait(ev)
                await asyncio.sleep(0)  # let the requests take their tokens (and escalate) between steps
            if not busy:
                await asyncio.sleep(0.001)


async def pumped(tiers: LocalTiers, jobs: Sequence[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    """Every job's result, `concurrency` at once, while the pump steps the engines."""
    stop = asyncio.Event()
    pump = asyncio.create_task(tiers.pump(stop))
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    try:
        return await asyncio.gather(*(one(j) for j in jobs))
    finally:
        stop.set()
        await pump


async def route_all(config: Any, prompts: Sequence[Sequence[int]], max_tokens: int, tiers: LocalTiers,
                    concurrency: int = 16, progress: Any = None) -> list[Any]:
    """The router's result for every prompt, `concurrency` requests at once over the local engines."""
    from costopt.routing.router import route

    async def one(ids: Sequence[int]) -> Any:
        result = await route(config, list(ids), max_tokens, tiers.generate)
        if progress is not None:
            progress.update(1)
        return result

    return await pumped(tiers, [lambda ids=p: one(ids) for p in prompts], concurrency)
