"""Deployment health: passive statistics from live traffic, active checks, and their report.

- :class:`HealthStats` (passive, per deployment, per process): success ratio, request count,
  latency percentiles and the last error over a rolling window, in bounded memory — a fixed
  number of time slices, each a sparse log-scale histogram (bins 5 % apart, so a percentile is
  within ±2.5 % of the truth whatever the traffic).
- :class:`HealthMonitor`: the one object the pipeline reports outcomes to. It feeds both the
  passive stats and the circuit breakers, and renders ``GET /admin/health``.
- :class:`ActiveHealthChecker`: every ``interval_s`` (± jitter, so replicas do not probe in
  step) it calls each provider's ``check()``, which spends no tokens. A failed check opens
  that provider's circuits (or keeps them open); a passed check lets half-open trials through
  at once. With Redis (:class:`RedisProbeLease`) one replica probes per interval (``SET NX PX``
  lease) and publishes the result; the others only read it.

Providers whose ``check()`` has nothing to check (stage ``"skipped"``) never touch a breaker:
their circuits follow live traffic alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

from .breaker import JSON, Breakers, Clock, deployment_failed, failure_kind

if TYPE_CHECKING:  # runtime imports would cycle through config.py, which may import this module
    from redis.asyncio import Redis

    from ..providers.base import Provider
    from ..routing.catalog import Deployment

log = logging.getLogger("tokyo_ia.health")

_GROWTH = 1.05
_LOG_GROWTH = math.log(_GROWTH)
_MIN_LATENCY_S = 1e-6  # bin 0 holds everything up to 1 µs


class HealthSettings(BaseModel):
    """Passive window and active checks (config section ``resilience.health``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(300.0, gt=0, description="rolling window of the passive statistics")
    buckets: int = Field(30, ge=1, le=600)
    active: bool = Field(True, description="probe providers with check() in the background")
    interval_s: float = Field(30.0, gt=0)
    jitter: float = Field(0.1, ge=0, lt=1, description="fraction of interval_s added or removed")
    timeout_s: float = Field(10.0, gt=0, description="a check taking longer than this failed")


def wall_iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bin(latency_s: float) -> int:
    if latency_s <= _MIN_LATENCY_S:
        return 0
    return 1 + int(math.log(latency_s / _MIN_LATENCY_S) / _LOG_GROWTH)


def _bin_value(index: int) -> float:
    """The geometric middle of a bin, in seconds."""
    if index == 0:
        return _MIN_LATENCY_S
    return float(_MIN_LATENCY_S * _GROWTH ** (index - 0.5))


class _Slice:
    __slots__ = ("failed", "hist", "index", "ok")

    def __init__(self, index: int) -> None:
        self.index = index
        self.ok = 0
        self.failed = 0
        self.hist: dict[int, int] = {}


class HealthStats:
    """Live-traffic statistics of one deployment over the last ``window_s``.

    Latency is recorded for successes only: a timeout says "down", not "slow", and would
    otherwise pin p99 at the timeout value.
    """

    def __init__(
        self,
        window_s: float = 300.0,
        buckets: int = 30,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self._width = window_s / buckets
        self._n = buckets
        self._clock = clock
        self._wall = wall
        self._slices: deque[_Slice] = deque()
        self.last_error: JSON | None = None

    def record_success(self, latency_s: float) -> None:
        current = self._current()
        current.ok += 1
        b = _bin(latency_s)
        current.hist[b] = current.hist.get(b, 0) + 1

    def record_failure(self, kind: str, message: str = "") -> None:
        self._current().failed += 1
        self.last_error = {"kind": kind, "message": message[:500], "at": wall_iso(self._wall())}

    def record(self, error: BaseException | None, latency_s: float) -> None:
        """Count an outcome. Every failure of the deployment counts (:func:`deployment_failed`),
        also those the breakers leave alone; the request itself being refused, and cancelled
        calls, are not counted at all."""
        if error is None:
            self.record_success(latency_s)
        elif deployment_failed(error):
            self.record_failure(failure_kind(error), str(error))

    def counts(self) -> tuple[int, int]:
        """(successes, failures) within the window."""
        self._expire()
        return sum(s.ok for s in self._slices), sum(s.failed for s in self._slices)

    def percentiles(self, quantiles: Iterable[float] = (0.5, 0.95, 0.99)) -> dict[float, float | None]:
        """Latency (seconds) at each quantile, nearest rank; None when nothing was recorded."""
        self._expire()
        merged: dict[int, int] = {}
        for s in self._slices:
            for b, n in s.hist.items():
                merged[b] = merged.get(b, 0) + n
        total = sum(merged.values())
        out: dict[float, float | None] = {}
        ordered = sorted(merged.items())
        for q in quantiles:
            if total == 0:
                out[q] = None
                continue
            rank, seen = max(1, math.ceil(q * total)), 0
            for b, n in ordered:
                seen += n
                if seen >= rank:
                    out[q] = _bin_value(b)
                    break
        return out

    def snapshot(self) -> JSON:
        ok, failed = self.counts()
        total = ok + failed
        p = self.percentiles((0.5, 0.95, 0.99))
        return {
            "requests": total,
            "success_ratio": None if total == 0 else round(ok / total, 4),
            "latency_ms": {
                name: None if v is None else round(v * 1000, 3)
                for name, v in (("p50", p[0.5]), ("p95", p[0.95]), ("p99", p[0.99]))
            },
            "last_error": self.last_error,
        }

    def _current(self) -> _Slice:
        index = int(self._clock() // self._width)
        if not self._slices or self._slices[-1].index != index:
            self._slices.append(_Slice(index))
            self._expire(index)
        return self._slices[-1]

    def _expire(self, index: int | None = None) -> None:
        if index is None:
            index = int(self._clock() // self._width)
        while self._slices and self._slices[0].index <= index - self._n:
            self._slices.popleft()


@dataclass(frozen=True, slots=True)
class CheckRecord:
    """The outcome of one active check, as shared between replicas and shown by the API."""

    ok: bool
    stage: str
    detail: str
    latency_s: float
    at: float  # wall clock, seconds since the epoch
    by: str  # the replica that probed

    def to_json(self) -> JSON:
        return {**asdict(self), "latency_s": round(self.latency_s, 4), "at": wall_iso(self.at)}


class HealthMonitor:
    """Passive stats and breakers of every deployment, plus the latest active check per provider.

    The pipeline calls :meth:`allow` before trying a deployment and :meth:`record` with every
    outcome of an allowed attempt (the error, or None on success), nothing else.
    """

    def __init__(
        self,
        deployments: Iterable[Deployment],
        breakers: Breakers,
        settings: HealthSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.settings = settings or HealthSettings()
        self.breakers = breakers
        self.deployments: dict[str, Deployment] = {}
        self._public: dict[str, set[str]] = {}
        for d in deployments:
            self.deployments.setdefault(d.label, d)
            self._public.setdefault(d.label, set()).add(d.public)
        self.stats = {
            label: HealthStats(self.settings.window_s, self.settings.buckets, clock=clock, wall=wall)
            for label in self.deployments
        }
        self.checks: dict[str, CheckRecord] = {}

    def providers(self) -> dict[str, Provider]:
        return {d.provider.name: d.provider for d in self.deployments.values()}

    def labels_of(self, provider: str) -> list[str]:
        return [label for label, d in self.deployments.items() if d.provider.name == provider]

    async def allow(self, label: str) -> bool:
        return await self.breakers.allow(label)

    async def record(self, label: str, error: BaseException | None, latency_s: float) -> None:
        stats = self.stats.get(label)
        if stats is not None:
            stats.record(error, latency_s)
        await self.breakers.record(label, error, latency_s)

    async def snapshot(self) -> JSON:
        """The body of ``GET /admin/health``: JSON-ready, one entry per deployment label."""
        circuits = await self.breakers.snapshot(self.deployments)
        out: dict[str, JSON] = {}
        for label, d in self.deployments.items():
            breaker = dict(circuits.get(label, {}))
            check = self.checks.get(d.provider.name)
            out[label] = {
                "provider": d.provider.name,
                "model": d.model,
                "public": sorted(self._public[label]),
                "circuit": breaker.pop("state", "closed"),
                "time_in_state_s": breaker.pop("time_in_state_s", {}),
                "breaker": breaker,
                **self.stats[label].snapshot(),
                "last_check": None if check is None else check.to_json(),
            }
        return {"deployments": out, "shared_circuits": self.breakers.shared}


class ProbeLease(Protocol):
    """Who probes a provider this interval, and where the result goes for the others."""

    async def acquire(self, provider: str, ttl_s: float) -> bool: ...

    async def publish(self, provider: str, record: CheckRecord, ttl_s: float) -> None: ...

    async def latest(self, provider: str) -> CheckRecord | None: ...


class RedisProbeLease:
    """``SET NX PX`` leases and published results in Redis.

    On a Redis error a replica probes for itself (:meth:`acquire` says yes): without the lease
    every replica probing is the only safe default, and it is what a gateway without Redis does.
    """

    def __init__(
        self, client: Redis, *, key_prefix: str = "tokyo-ia:probe:", replica: str | None = None
    ) -> None:
        from redis.exceptions import RedisError  # lazy: only replicas with Redis build a lease

        self.client = client
        self.key_prefix = key_prefix
        self.replica = replica or uuid.uuid4().hex[:12]
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)

    def _key(self, provider: str, what: str) -> str:
        return f"{self.key_prefix}{{{provider}}}:{what}"

    async def acquire(self, provider: str, ttl_s: float) -> bool:
        try:
            got = await self.client.set(
                self._key(provider, "lease"), self.replica, nx=True, px=max(1, int(ttl_s * 1000))
            )
        except self._errors as exc:
            log.warning("health: Redis unavailable, probing %s from this replica: %s", provider, exc)
            return True
        return bool(got)

    async def publish(self, provider: str, record: CheckRecord, ttl_s: float) -> None:
        try:
            await self.client.set(
                self._key(provider, "result"), orjson.dumps(asdict(record)), px=max(1, int(ttl_s * 1000))
            )
        except self._errors as exc:
            log.warning("health: could not share the check of %s: %s", provider, exc)

    async def latest(self, provider: str) -> CheckRecord | None:
        try:
            raw = await self.client.get(self._key(provider, "result"))
        except self._errors as exc:
            log.warning("health: could not read the shared check of %s: %s", provider, exc)
            return None
        return None if raw is None else CheckRecord(**orjson.loads(raw))


class ActiveHealthChecker:
    """Probes every provider of a :class:`HealthMonitor` in the background.

    :meth:`run_once` is one round (tests call it directly); :meth:`start` / :meth:`stop` run
    rounds forever inside the gateway's event loop.
    """

    def __init__(
        self,
        monitor: HealthMonitor,
        *,
        lease: ProbeLease | None = None,
        replica: str | None = None,
        rng: random.Random | None = None,
        wall: Clock = time.time,
    ) -> None:
        self.monitor = monitor
        self.settings = monitor.settings
        self.lease = lease
        self.replica = replica or getattr(lease, "replica", None) or "local"
        self._rng = rng or random.Random()
        self._wall = wall
        self._task: asyncio.Task[None] | None = None

    def next_delay(self) -> float:
        """Seconds until the next round: ``interval_s`` ± ``jitter`` × ``interval_s``."""
        spread = self.settings.jitter * self.settings.interval_s
        return self.settings.interval_s + self._rng.uniform(-spread, spread)

    async def run_once(self) -> dict[str, CheckRecord | None]:
        """Check (or read the shared check of) every provider concurrently; apply the results."""
        providers = self.monitor.providers()
        results = await asyncio.gather(*(self._one(p) for p in providers.values()))
        return dict(zip(providers, results, strict=True))

    async def _one(self, provider: Provider) -> CheckRecord | None:
        s = self.settings
        probed = self.lease is None or await self.lease.acquire(provider.name, s.interval_s * (1 - s.jitter))
        if probed:
            record = await self._probe(provider)
            if self.lease is not None:
                await self.lease.publish(provider.name, record, 3 * s.interval_s)
        else:
            assert self.lease is not None
            found = await self.lease.latest(provider.name)
            if found is None:
                return None
            record = found
        await self._apply(provider.name, record, probed)
        return record

    async def _probe(self, provider: Provider) -> CheckRecord:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                result = await provider.check()
        except TimeoutError:
            ok, stage, detail = False, "timeout", f"no answer within {self.settings.timeout_s:g}s"
        except Exception as exc:  # noqa: BLE001 - a probe that raises is a failed check, not a crash
            ok, stage, detail = False, "error", f"{type(exc).__name__}: {exc}"
        else:
            ok, stage, detail = result.ok, result.stage, result.detail
        latency = time.perf_counter() - started
        return CheckRecord(ok, stage, detail, latency, self._wall(), self.replica)

    async def _apply(self, provider: str, record: CheckRecord, probed: bool) -> None:
        """Remember the check; turn it into breaker changes unless another replica already did."""
        self.monitor.checks[provider] = record
        if record.stage == "skipped" or (self.monitor.breakers.shared and not probed):
            return
        for label in self.monitor.labels_of(provider):
            if record.ok:
                await self.monitor.breakers.probe_ok(label)
            else:
                await self.monitor.breakers.trip(
                    label, f"active check failed at {record.stage}: {record.detail}"
                )

    def start(self) -> None:
        """Start the background loop (idempotent); the first round comes after a random delay."""
        if self._task is None and self.settings.active:
            self._task = asyncio.create_task(self._loop(), name="tokyo-ia-health-checker")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        await asyncio.sleep(self._rng.uniform(0, self.settings.jitter * self.settings.interval_s))
        while True:
            try:
                await self.run_once()
            except Exception:  # the loop must outlive any one bad round
                log.exception("health: active check round failed")
            await asyncio.sleep(self.next_delay())
