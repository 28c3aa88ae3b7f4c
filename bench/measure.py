"""What the harness measures and how: the request bodies, the plan of a run, and the
measurements themselves (latency at one connection, time to a stream's first event,
throughput at N connections), with the targets taking turns.

This machine is shared: its speed drifts by 10-40% within minutes. Measured one after the
other, a slow spell falls on whichever target is running and moves the gateway/baseline
ratio; so every measurement here gives its targets short turns, order reversed at every turn
(:func:`_turns`), and a spell reaches them all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from . import client, wrk
from .client import LoadResult, Probe, build_request, percentile

MODEL = "gpt-4o-mini"
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ],
    "max_tokens": 32,
    "temperature": 0,
}
# Paced (1 ms between chunks) so that the first event is measured, not the whole stream.
STREAM: dict[str, Any] = {**CHAT, "stream": True, "bench_chunk_interval_ms": 1}


@dataclass(frozen=True)
class Plan:
    quick: bool = False
    repeat: int = 3
    warmup_s: float = 2.0
    latency_s: float = 5.0
    streams: int = 300
    throughput_s: float = 10.0
    cache_s: float = 10.0
    rss_requests: int = 100_000
    connections: int = 64
    workers: int = 1
    scaling: bool = False
    generator: str = "wrk"
    pin: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        plan = cls()
        if args.quick:
            plan = replace(
                plan,
                quick=True,
                warmup_s=0.2,
                latency_s=0.5,
                streams=20,
                throughput_s=1.0,
                cache_s=1.0,
                rss_requests=1_000,
            )
        generator = args.generator
        if generator == "auto":
            generator = "wrk" if wrk.available() else "python"
        elif generator == "wrk" and not wrk.available():
            raise SystemExit("bench: wrk is not installed (apt-get install wrk), use --generator python")
        duration = args.duration
        return replace(
            plan,
            repeat=args.repeat,
            throughput_s=duration if duration is not None else plan.throughput_s,
            cache_s=duration if duration is not None else plan.cache_s,
            rss_requests=args.rss_requests if args.rss_requests is not None else plan.rss_requests,
            connections=args.connections,
            workers=args.workers,
            scaling=args.scaling,
            generator=generator,
            pin=not args.no_pin,
        )


@dataclass
class Target:
    name: str
    port: int
    headers: dict[str, str] = field(default_factory=dict)

    def raw(self, body: dict[str, Any]) -> bytes:
        return build_request("127.0.0.1", self.port, "/v1/chat/completions", orjson.dumps(body), self.headers)


class Measure:
    """The measurements of one run, on the targets a :class:`~bench.runner.Bench` started."""

    def __init__(self, plan: Plan, load_cpus: set[int] | None) -> None:
        self.plan = plan
        self.load_cpus = load_cpus

    def latency(self, targets: list[Target]) -> dict[str, tuple[dict[str, float], int]]:
        """p50/p99 (ms) of one request at a time on one keep-alive connection per target.

        The targets take turns in windows of :data:`WINDOW_S` (order alternating), so a noisy
        spell on this shared machine lands on all of them alike rather than on whichever
        target was being measured when it came.
        """
        raws = [target.raw(CHAT) for target in targets]
        times: list[list[float]] = [[] for _ in targets]
        sent = [0] * len(targets)
        with contextlib.ExitStack() as stack:
            probes = [stack.enter_context(Probe("127.0.0.1", t.port)) for t in targets]
            for turn, seconds, keep in _windows(self.plan.warmup_s / 2, self.plan.latency_s):
                for i in _turns(len(targets), turn):
                    deadline = time.perf_counter() + seconds
                    while time.perf_counter() < deadline:
                        status, seconds = probes[i].timed(raws[i])
                        check(targets[i], status, probes[i].reader.body())
                        sent[i] += 1
                        if keep:
                            times[i].append(seconds)
        return {
            t.name: ({"p50": percentile(ts, 50) * 1000, "p99": percentile(ts, 99) * 1000}, n)
            for t, ts, n in zip(targets, times, sent, strict=True)
        }

    def first_event(self, targets: list[Target]) -> dict[str, tuple[float, int]]:
        """p50 (ms) from sending a streaming request to its first SSE event, per target; the
        targets take turns in blocks of :data:`STREAM_BLOCK` streams (order alternating)."""
        raws = [target.raw(STREAM) for target in targets]
        times: list[list[float]] = [[] for _ in targets]
        total = self.plan.streams + 5
        with contextlib.ExitStack() as stack:
            probes = [stack.enter_context(Probe("127.0.0.1", t.port)) for t in targets]
            for block, start in enumerate(range(0, total, STREAM_BLOCK)):
                for i in _turns(len(targets), block):
                    for n in range(start, min(total, start + STREAM_BLOCK)):
                        status, seconds = probes[i].first_event(raws[i])
                        check(targets[i], status, probes[i].reader.body())
                        if n >= 5:
                            times[i].append(seconds)
        return {t.name: (percentile(ts, 50) * 1000, total) for t, ts in zip(targets, times, strict=True)}

    def drive(
        self, target: Target, body: dict[str, Any], seconds: float, requests: int | None = None
    ) -> LoadResult:
        plan = self.plan
        if plan.generator == "wrk" and requests is None:
            threads = 2 if self.load_cpus is None or len(self.load_cpus) > 1 else 1
            return wrk.load(
                f"http://127.0.0.1:{target.port}/v1/chat/completions",
                orjson.dumps(body),
                target.headers,
                connections=plan.connections,
                seconds=seconds,
                threads=min(threads, plan.connections),
            )
        return client.load(
            "127.0.0.1",
            target.port,
            target.raw(body),
            connections=plan.connections,
            seconds=seconds,
            requests=requests,
        )

    def throughput(self, target: Target, body: dict[str, Any] = CHAT) -> tuple[LoadResult, int]:
        return self.throughputs([target], body)[target.name]

    def throughputs(
        self, targets: list[Target], body: dict[str, Any] = CHAT
    ) -> dict[str, tuple[LoadResult, int]]:
        """Requests per second at N connections, per target: each warmed up, then the targets
        take turns in slices of about :data:`SLICE_S` (order alternating) until each had
        ``throughput_s``, so drift on this shared machine reaches every target alike."""
        warm = {t.name: self.drive(t, body, self.plan.warmup_s) for t in targets}
        slices = max(1, round(self.plan.throughput_s / SLICE_S))
        parts: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
        for turn in range(slices):
            for i in _turns(len(targets), turn):
                parts[targets[i].name].append(self.drive(targets[i], body, self.plan.throughput_s / slices))
        out: dict[str, tuple[LoadResult, int]] = {}
        for target in targets:
            result = _combined(parts[target.name])
            first = warm[target.name]
            bad = result.errors + first.errors
            if bad > 0.01 * (result.requests + first.requests):
                raise RuntimeError(f"{target.name}: {bad} of {result.requests} requests failed under load")
            out[target.name] = (result, first.requests + result.requests)
        return out

    def top_up(self, target: Target, sent: int, until: int, rate: float) -> int:
        """Send requests at N connections until ``until`` were sent in total; the new total."""
        while sent < until:
            remaining = until - sent
            if self.plan.generator == "wrk":  # wrk runs for whole seconds: aim a little short
                result = self.drive(target, CHAT, min(30.0, max(1.0, 0.9 * remaining / max(rate, 100.0))))
                rate = result.requests / result.seconds if result.seconds > 0 else rate
            else:
                result = self.drive(target, CHAT, 3600.0, requests=remaining)
            sent += result.requests
        return sent


SLICE_S = 2.0
"""Throughput: each target's turn lasts about this long (wrk measures whole seconds)."""
WINDOW_S = 0.5
"""Latency: each target's turn at one connection lasts this long."""
STREAM_BLOCK = 25
"""Time to first event: each target's turn is this many streams."""


def _windows(warmup_s: float, measure_s: float) -> Iterator[tuple[int, float, bool]]:
    """Turns of at most WINDOW_S: (turn, seconds, kept), the warm-up ones first (not kept)."""
    turn = 0
    for total, keep in ((warmup_s, False), (measure_s, True)):
        count = max(1, round(total / WINDOW_S))
        for _ in range(count):
            yield turn, total / count, keep
            turn += 1


def _turns(count: int, turn: int) -> list[int]:
    """The order the targets go in on this turn: forwards, then backwards, and so on."""
    order = list(range(count))
    return order if turn % 2 == 0 else order[::-1]


def _combined(parts: list[LoadResult]) -> LoadResult:
    """Slices of one target's load as one result (latency percentiles: the slices' medians)."""
    return LoadResult(
        requests=sum(p.requests for p in parts),
        errors=sum(p.errors for p in parts),
        seconds=sum(p.seconds for p in parts),
        p50_s=statistics.median(p.p50_s for p in parts),
        p99_s=statistics.median(p.p99_s for p in parts),
    )


def check(target: Target, status: int, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"{target.name} answered {status}: {body[:300]!r}")
