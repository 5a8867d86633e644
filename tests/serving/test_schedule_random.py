"""Admission's schedule() driven through long random runs: arrivals, cancels, early finishes (EOS), pauses
and resumes, forecast errors, on a fake clock. After every plan the invariants the engine relies on hold:
a sequence is in exactly one of queued / running / paused / done, a plan never resumes what is not
paused nor pauses what is not running, never pauses and resumes one sequence at once, never admits
what is not queued, and nothing submitted is lost. (The engine raises on a resume of a running
sequence, and the driver then fails the whole batch: `serving.driver`.)"""
import random

import pytest

from serving.admission import Priority, WouldMissDeadline, QueueFull
from test_admission import measured

H, N, L = Priority.HIGH, Priority.NORMAL, Priority.LOW


def plan_and_apply(adm, seed: int, queued: set, running: dict, paused: set, done: dict) -> set:
    """One schedule() call on the simulated engine: check the plan's invariants, apply its expiries and
    admissions to `queued` / `running` / `done`, and return the paused set it leaves."""
    high = sum(t.priority == H for t in running)
    plan = adm.schedule(len(running), high, [(t, left, t in paused) for t, left in running.items()])
    pause, resume = set(plan.pause), set(plan.resume)
    assert not pause & resume, f"seed {seed}: paused and resumed at once: {[t.payload for t in pause & resume]}"
    assert resume <= paused, f"seed {seed}: resumes a sequence that is not paused"
    assert pause <= set(running) - paused, f"seed {seed}: pauses a sequence that is not running"
    assert set(plan.admitted) <= queued and set(plan.expired) <= queued, f"seed {seed}: not from the queue"
    assert not set(plan.admitted) & set(plan.expired), f"seed {seed}: admitted and expired at once"
    assert len(plan.pause) == len(pause) and len(plan.resume) == len(resume), f"seed {seed}: listed twice"
    for t in plan.expired:
        queued.discard(t)
        done[t.payload] = "expired"
    for t in plan.admitted:
        queued.discard(t)
        running[t] = t.steps
    assert len(running) <= adm.cfg.max_batch, f"seed {seed}: more sequences than slots"
    return (paused - resume) | pause


def run_random(seed: int, steps: int = 400, preempt: bool = True) -> dict:
    rng = random.Random(seed)
    step_s = lambda b: 0.03 + 0.006 * b  # noqa: E731  (the model the admission has measured)
    adm, clock = measured(step_s=step_s, prefill_s=0.002, max_batch=rng.choice([4, 8, 16]),
                          reserved_high=1, max_wait_ms=rng.choice([0.0, 50.0]), max_queue=24,
                          high_queue_reserve=4, deadline_margin=rng.choice([0.0, 0.25]), preempt=preempt)
    queued, running, paused, done = set(), {}, set(), {}  # running: ticket -> steps left (paused included)
    submitted = 0
    for _ in range(steps):
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4])):  # arrivals, bursty
            pr = rng.choices([H, N, L], [0.2, 0.6, 0.2])[0]
            submitted += 1
            try:
                t = adm.submit(submitted, pr, deadline_s=rng.choice([0.5, 2.0, 5.0, 20.0]) * (1 + (pr == L)),
                               steps=rng.choice([1, 4, 16, 48, 96]), prompt_tokens=rng.randint(0, 120))
                queued.add(t)
            except (WouldMissDeadline, QueueFull):
                done[submitted] = "refused"
        if queued and rng.random() < 0.05:  # a client goes away while queued
            t = rng.choice(sorted(queued, key=lambda x: x.id))
            assert adm.cancel(t), "a queued ticket can be cancelled"
            queued.discard(t)
            done[t.payload] = "cancelled"
        if running and rng.random() < 0.05:  # ... or while running (the engine frees its slot)
            t = rng.choice(sorted(running, key=lambda x: x.id))
            del running[t]
            paused.discard(t)
            done[t.payload] = "cancelled"
        paused = plan_and_apply(adm, seed, queued, running, paused, done)

        active = [t for t in running if t not in paused]
        if active:  # one engine step, slower or faster than the model says
            seconds = step_s(len(active)) * rng.choice([0.7, 1.0, 1.0, 1.3, 2.0])
            clock.advance(seconds)
            adm.observe_step(len(active), seconds, len(active))
            for t in active:
                running[t] -= 1
                if running[t] == 0 or rng.random() < 0.03:  # max_tokens, or EOS early
                    del running[t]
                    done[t.payload] = "finished"
        else:
            clock.advance(rng.choice([0.001, 0.05, 0.3]))
        states = [set(t.payload for t in queued), set(t.payload for t in running), set(done)]
        assert sum(len(s) for s in states) == len(set().union(*states)), f"seed {seed}: a request in two states"
    # drain: no arrivals, everything ends
    for _ in range(20_000):
        if not (queued or running):
            break
        paused = plan_and_apply(adm, seed, queued, running, paused, done)
        active = [t for t in running if t not in paused]
        clock.advance(step_s(max(1, len(active))))
        for t in active:
            running[t] -= 1
            if running[t] == 0:
                del running[t]
                done[t.payload] = "finished"
    assert not queued and not running, f"seed {seed}: requests left behind after the drain"
    assert set(done) == set(range(1, submitted + 1)), f"seed {seed}: lost requests"
    return {"submitted": submitted, "outcomes": list(done.values()), "pauses": adm.counters["paused"]}


@pytest.mark.parametrize("preempt", [True, False])
def test_random_runs_keep_the_engines_invariants(preempt):
    outcomes, pauses = [], 0
    for seed in range(40):
        res = run_random(seed, preempt=preempt)
        outcomes += res["outcomes"]
        pauses += sum(res["pauses"].values())
    for what in ("finished", "refused", "expired", "cancelled"):
        assert what in outcomes, f"the random runs never produced a {what!r} request: they test too little"
    assert (pauses > 0) == preempt, "pausing happens exactly when preemption is on"
