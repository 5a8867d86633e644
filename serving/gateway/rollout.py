"""The gateway's rollout: which variant serves a deployment, and the canary that may replace it.

Clients call a stable deployment name (`--deployment`, e.g. the model's name) instead of a variant.
The gateway resolves it to the **current** variant; while a canary runs, `share` of those requests go
to the **candidate** instead (the predictor serves both; the deploy phase loads the candidate first).
The verdict is `costopt.online.canary.CanaryJudge`'s: every gate on an always-valid confidence sequence,
KL and top-1 from shadow judgements on a sample of the canary's answers (`POST /v2/compare` on the
predictor, the current variant teacher-forced on the canary's tokens), errors and the p95 latency from
the canary's own requests. Promotion makes the candidate current; a rollback sends the share back.

No client request fails because of a canary: a canary request the predictor refuses or fails (5xx,
404 after an unload, unreachable) is counted against the canary and answered by the current variant
instead, before any byte reaches the client; a 429 (load shed, as the current would shed it) is
answered by the current variant without counting against the canary. A streamed canary answer that breaks off after
its first bytes cannot be retried and is counted as an error (the client sees the break, as it would
from the current variant). Latency is compared on non-streamed requests the predictor answered (a
cache hit's few ms would say nothing about a variant).

The state (current variant, canary, the last verdicts with their evidence) lives in one JSON file
(`--rollout_state`, default `WORKSPACE/.costopt/rollout.json`), written atomically on every change, so
a restarted gateway serves what it served before; a canary in progress when the gateway stopped is
rolled back at start (its evidence was in memory). Admin routes (the admin key only):

| route | what |
|---|---|
| `GET /v2/rollout` | the deployment, current variant, canary with its live evidence, the last verdicts |
| `POST /v2/rollout` `{"current": V}` | serve V now (the first deploy, or an operator's override) |
| `POST /v2/rollout/canary` `{"candidate": V, ...canary settings}` | start a canary (409 while one runs) |
| `DELETE /v2/rollout/canary` | stop the canary now: a rollback |
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Gauge

from costopt.online.canary import CanaryConfig, CanaryConfigError, CanaryJudge, Verdict
from costopt.storage.layout import read_json, write_json
from serving.api import _json, error_response
from serving.protocol import ApiError

_log = logging.getLogger("costopt.gateway.rollout")

STATE_VERSION = 1
HISTORY_KEEP = 20  # verdicts kept in the state file
MAX_JUDGING = 2  # shadow judgements in flight at most; a sample beyond it is skipped (counted)
CHECK_EVERY_S = 2.0  # the time-based verdicts (idle, duration) are checked this often

ROLLOUT_REQUESTS = Counter("costopt_gateway_rollout_requests_total",
                           "deployment requests by the role of the variant that took them and the outcome",
                           ["role", "outcome"])
CANARY_VERDICTS = Counter("costopt_gateway_canary_verdicts_total", "canary verdicts", ["verdict"])
CANARY_ACTIVE = Gauge("costopt_gateway_canary_active", "1 while a canary takes a share of the deployment's traffic")
SHADOW_JUDGEMENTS = Counter("costopt_gateway_shadow_judgements_total", "shadow judgements of canary answers",
                            ["outcome"])


class Canary:
    def __init__(self, candidate: str, config: CanaryConfig, started_s: float, started_wall: float) -> None:
        self.candidate, self.config = candidate, config
        self.judge = CanaryJudge(config, started_s)
        self.started_wall = started_wall
        self.judging = 0  # shadow judgements in flight


class Rollout:
    """The deployment's state and the canary's bookkeeping; the HTTP handlers are `RolloutRoutes`."""

    def __init__(self, deployment: str, state_path: Path, initial_current: str | None, client: httpx.AsyncClient,
                 admin_key: str, clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self.deployment, self.state_path = deployment, Path(state_path)
        self.client, self.admin_key, self.clock = client, admin_key, clock
        self.rng = random.Random(seed)
        self.history: list[dict[str, Any]] = []
        self.current = initial_current
        self.canary: Canary | None = None
        self._checker: asyncio.Task | None = None
        self._load()

    # -- state ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.state_path.is_file():
            self._save()
            return
        try:
            state = read_json(self.state_path)
            if state.get("version") != STATE_VERSION or state.get("deployment") != self.deployment:
                raise ValueError(f"version {state.get('version')!r} / deployment {state.get('deployment')!r}")
        except (OSError, ValueError, AttributeError) as exc:
            # never lose what served: keep the unreadable file aside, start from the flags
            aside = self.state_path.with_suffix(f".unreadable-{int(time.time())}.json")
            self.state_path.replace(aside)
            _log.warning("rollout state %s unreadable (%s); kept as %s, starting from --current", self.state_path,
                         exc, aside)
            self._save()
            return
        self.current = state.get("current") or self.current
        self.history = list(state.get("history") or [])[-HISTORY_KEEP:]
        if state.get("canary"):
            c = state["canary"]
            self._record({"candidate": c.get("candidate"), "current": self.current, "verdict": "rollback",
                          "reason": "the gateway restarted during the canary (its evidence was in memory)",
                          "started_unix": c.get("started_unix"), "ended_unix": time.time(), "evidence": None})
            self._save()

    def _save(self) -> None:
        canary = None if self.canary is None else {
            "candidate": self.canary.candidate, "config": self.canary.config.to_dict(),
            "started_unix": self.canary.started_wall}
        write_json(self.state_path, {"version": STATE_VERSION, "deployment": self.deployment, "current": self.current,
                                     "canary": canary, "history": self.history[-HISTORY_KEEP:]})

    def _record(self, entry: dict[str, Any]) -> None:
        self.history = (self.history + [entry])[-HISTORY_KEEP:]

    def status(self) -> dict[str, Any]:
        canary = None
        if self.canary is not None:
            c = self.canary
            verdict = c.judge.decide(self.clock())
            canary = {"candidate": c.candidate, "config": c.config.to_dict(), "started_unix": c.started_wall,
                      "state": verdict.state, "evidence": verdict.evidence}
        return {"deployment": self.deployment, "current": self.current, "canary": canary, "history": self.history}

    # -- serving ---------------------------------------------------------------------------------------
    def pick(self) -> tuple[str, bool]:
        """(variant, is the canary) for one request to the deployment."""
        if self.current is None:
            raise ApiError(503, f"model: deployment {self.deployment!r} has no variant yet (deploy one: "
                                f"POST /v2/rollout)", type_="server_error")
        if self.canary is not None and self.rng.random() < self.canary.config.share:
            return self.canary.candidate, True
        return self.current, False

    def current_answered(self, variant: str, latency_ms: float) -> None:
        """A non-streamed request of the deployment the current variant answered from the predictor."""
        ROLLOUT_REQUESTS.labels("current", "ok").inc()
        if self.canary is not None and variant == self.current:
            self.canary.judge.current_request(latency_ms)

    def canary_answered(self, candidate: str, ok: bool, latency_ms: float | None) -> None:
        """One canary request: served (ok), or failed and answered by the current variant instead."""
        ROLLOUT_REQUESTS.labels("canary", "ok" if ok else "failed").inc()
        c = self.canary
        if c is None or c.candidate != candidate:  # the canary ended while this request ran
            return
        c.judge.canary_request(ok, latency_ms, self.clock())  # a stream's latency is None: errors only
        self.check()

    def wants_judgement(self, candidate: str) -> bool:
        c = self.canary
        if c is None or c.candidate != candidate or self.rng.random() >= c.config.shadow_sample:
            return False
        if c.judging >= MAX_JUDGING:
            SHADOW_JUDGEMENTS.labels("skipped_busy").inc()
            return False
        return True

    async def judge(self, candidate: str, body: dict, chat: bool, answer: str) -> None:
        """Ask the predictor for the shadow judgement of one canary answer; feed it to the judge."""
        c = self.canary
        if c is None or c.candidate != candidate or not answer:
            return
        current = self.current
        payload: dict[str, Any] = {"reference": current, "candidate": candidate, "answer": answer}
        payload.update({"messages": body.get("messages")} if chat else {"prompt": body.get("prompt")})
        c.judging += 1
        try:
            r = await self.client.post("/v2/compare", json=payload,
                                       headers={"Authorization": f"Bearer {self.admin_key}"})
            result = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            result = None
            _log.warning("shadow judgement failed: %s", exc)
        finally:
            c.judging -= 1
        if self.canary is not c or self.current != current:
            return  # the canary ended meanwhile
        if result is None:
            SHADOW_JUDGEMENTS.labels("failed").inc()
            c.judge.judge_failure()
        else:
            SHADOW_JUDGEMENTS.labels("ok").inc()
            c.judge.judgement(float(result["kl_mean"]), float(result["top1"]))
        self.check()

    # -- verdicts ---------------------------------------------------------------------------------------
    def check(self) -> Verdict | None:
        c = self.canary
        if c is None:
            return None
        verdict = c.judge.decide(self.clock())
        if verdict.state != "running":
            self._end(verdict)
        return verdict

    def _end(self, verdict: Verdict) -> None:
        c = self.canary
        assert c is not None
        before = self.current
        if verdict.state == "promote":
            self.current = c.candidate
        self.canary = None
        CANARY_ACTIVE.set(0)
        CANARY_VERDICTS.labels(verdict.state).inc()
        self._record({"candidate": c.candidate, "current": before, "verdict": verdict.state, "reason": verdict.reason,
                      "started_unix": c.started_wall, "ended_unix": time.time(), "evidence": verdict.evidence})
        self._save()
        _log.warning("canary %s -> %s: %s (%s)", before, c.candidate, verdict.state, verdict.reason)

    def start(self, candidate: str, config: CanaryConfig) -> None:
        if self.canary is not None:
            raise ApiError(409, f"candidate: a canary of {self.canary.candidate!r} is running; stop it first "
                                f"(DELETE /v2/rollout/canary)", param="candidate", type_="conflict")
        if self.current is None:
            raise ApiError(409, "candidate: the deployment has no current variant to compare with; set one first "
                                "(POST /v2/rollout)", param="candidate", type_="conflict")
        if candidate == self.current:
            raise ApiError(400, f"candidate: {candidate!r} is already the current variant", param="candidate")
        self.canary = Canary(candidate, config, self.clock(), time.time())
        CANARY_ACTIVE.set(1)
        self._save()
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(self._check_periodically())

    def stop(self, reason: str) -> Verdict:
        if self.canary is None:
            raise ApiError(404, "canary: none is running", type_="not_found")
        verdict = Verdict("rollback", reason, self.canary.judge.evidence())
        self._end(verdict)
        return verdict

    def set_current(self, variant: str) -> None:
        if self.canary is not None:
            raise ApiError(409, f"current: a canary of {self.canary.candidate!r} is running; stop it first",
                           param="current", type_="conflict")
        before, self.current = self.current, variant
        self._record({"candidate": variant, "current": before, "verdict": "set", "reason": "set by the admin",
                      "started_unix": time.time(), "ended_unix": time.time(), "evidence": None})
        self._save()

    async def _check_periodically(self) -> None:
        while self.canary is not None:
            await asyncio.sleep(CHECK_EVERY_S)
            self.check()


class RolloutRoutes:
    """The admin routes over one `Rollout` (the tenant guard keeps them admin-only)."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout

    async def _served(self, name: str, field: str) -> None:
        try:
            r = await self.rollout.client.get("/openai/v1/models",
                                              headers={"Authorization": f"Bearer {self.rollout.admin_key}"})
            served = [m["id"] for m in r.json().get("data", [])] if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            served = None
        if served is None:
            raise ApiError(502, f"{field}: the predictor did not list its variants", type_="server_error")
        if name not in served:
            raise ApiError(404, f"{field}: {name!r} is not served by the predictor (load it first: POST "
                                f"/v2/repository/models/{name}/load there); served: {', '.join(served) or 'none'}",
                           param=field, type_="model_not_found")

    async def get(self) -> Response:
        return JSONResponse(self.rollout.status())

    async def set_current(self, request: Request) -> Response:
        try:
            body = await _json(request)
            variant = body.get("current") if isinstance(body, dict) else None
            if not isinstance(variant, str) or not variant:
                raise ApiError(400, "current: expected the name of a variant the predictor serves", param="current")
            await self._served(variant, "current")
            self.rollout.set_current(variant)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse(self.rollout.status())

    async def start(self, request: Request) -> Response:
        try:
            body = await _json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "body: expected a JSON object", param="body")
            candidate = body.pop("candidate", None)
            if not isinstance(candidate, str) or not candidate:
                raise ApiError(400, "candidate: expected the name of a variant the predictor serves", param="candidate")
            try:
                config = CanaryConfig.from_dict(body)
            except (CanaryConfigError, TypeError) as exc:
                raise ApiError(400, str(exc), param="canary") from None
            await self._served(candidate, "candidate")
            self.rollout.start(candidate, config)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse(self.rollout.status())

    async def stop(self) -> Response:
        try:
            verdict = self.rollout.stop("stopped by the admin (DELETE /v2/rollout/canary)")
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"verdict": verdict.state, "reason": verdict.reason, **self.rollout.status()})
