"""Pure-Python HTTP/1.1 clients: a one-connection latency probe and a closed-loop load generator.

Both write prebuilt request bytes on keep-alive connections and frame responses themselves
(Content-Length or chunked), so the client's own cost per request is a few microseconds and the
same for every target: differences between targets are the targets'.

- :class:`Probe` (blocking socket) times each request, or the first SSE event of a stream;
- :func:`load` drives N connections with uvloop for a duration or a request count. It is
  the fallback when ``wrk`` is not installed, and slower than wrk: at 64 connections it
  tops out around 10-15k req/s on one core, several times what a Python gateway serves.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from dataclasses import dataclass
from typing import cast


def build_request(
    host: str, port: int, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class ResponseReader:
    """Incremental framing of one HTTP/1.1 response (Content-Length or chunked)."""

    __slots__ = ("body_start", "buf", "chunked", "head", "length", "pos", "status")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.reset()

    def reset(self) -> None:
        self.buf.clear()
        self.status = 0
        self.head = b""
        self.body_start = -1
        self.length: int | None = None
        self.chunked = False
        self.pos = 0

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the response is complete."""
        self.buf += data
        if self.body_start < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head = head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.body_start = self.pos = end + 4
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.length = int(head[i + 17 : j if j >= 0 else len(head)])
            else:
                self.chunked = b"transfer-encoding: chunked" in head
        if self.length is not None:
            return len(self.buf) - self.body_start >= self.length
        if not self.chunked:
            return self.status in (204, 304)
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", self.pos)
            if eol < 0:
                return False
            size = int(bytes(buf[self.pos : eol]).split(b";", 1)[0], 16)
            end = eol + 2 + size + 2
            if len(buf) < end:
                return False
            self.pos = end
            if size == 0:
                return True

    def header(self, name: bytes) -> bytes | None:
        i = self.head.find(b"\r\n" + name.lower() + b":")
        if i < 0:
            return None
        j = self.head.find(b"\r\n", i + 2)
        return self.head[i + len(name) + 3 : j if j >= 0 else len(self.head)].strip()

    def body(self) -> bytes:
        return bytes(self.buf[self.body_start :])


class Probe:
    """One keep-alive connection, one request at a time (the latency measurement)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = ResponseReader()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, raw: bytes) -> ResponseReader:
        """Send one request and read its whole response."""
        reader = self.reader
        reader.reset()
        self.sock.sendall(raw)
        while True:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed the connection")
            if reader.feed(data):
                return reader

    def timed(self, raw: bytes) -> tuple[int, float]:
        """(status, seconds) of one request."""
        started = time.perf_counter()
        reader = self.send(raw)
        return reader.status, time.perf_counter() - started

    def first_event(self, raw: bytes) -> tuple[int, float]:
        """(status, seconds until the first SSE ``data:`` bytes); the stream is read to its end."""
        reader = self.reader
        reader.reset()
        started = time.perf_counter()
        first: float | None = None
        self.sock.sendall(raw)
        while True:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed the connection")
            done = reader.feed(data)
            if first is None and b"data:" in reader.buf:
                first = time.perf_counter() - started
            if done:
                return reader.status, first if first is not None else time.perf_counter() - started


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_s: float
    p99_s: float

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class _Shared:
    __slots__ = ("deadline", "errors", "latencies", "remaining")

    def __init__(self, deadline: float, remaining: int | None) -> None:
        self.deadline = deadline
        self.remaining = remaining
        self.errors = 0
        self.latencies: list[float] = []


class _LoadConnection(asyncio.Protocol):
    def __init__(self, raw: bytes, shared: _Shared, finished: asyncio.Future[None]) -> None:
        self.raw = raw
        self.shared = shared
        self.finished = finished
        self.reader = ResponseReader()
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._next()

    def _next(self) -> None:
        shared = self.shared
        now = time.perf_counter()
        if now >= shared.deadline or shared.remaining == 0:
            self._finish()
            return
        if shared.remaining is not None:
            shared.remaining -= 1
        self.reader.reset()
        self.sent = now
        assert self.transport is not None
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        if self.reader.feed(data):
            shared = self.shared
            shared.latencies.append(time.perf_counter() - self.sent)
            if not 200 <= self.reader.status < 300:
                shared.errors += 1
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.shared.errors += 1
            self.finished.set_result(None)

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def _load(
    host: str, port: int, raw: bytes, connections: int, seconds: float, requests: int | None
) -> LoadResult:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    shared = _Shared(started + seconds, requests)
    futures: list[asyncio.Future[None]] = []
    for _ in range(connections):
        finished: asyncio.Future[None] = loop.create_future()
        futures.append(finished)
        await loop.create_connection(functools.partial(_LoadConnection, raw, shared, finished), host, port)
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    lat = shared.latencies
    return LoadResult(len(lat), shared.errors, elapsed, percentile(lat, 50), percentile(lat, 99))


def load(
    host: str,
    port: int,
    raw: bytes,
    *,
    connections: int,
    seconds: float,
    requests: int | None = None,
) -> LoadResult:
    """Closed loop: each connection sends its next request when the previous answer is in.

    Stops after ``seconds`` or once ``requests`` were sent in total, whichever comes first.
    """
    import uvloop

    return uvloop.run(_load(host, port, raw, connections, seconds, requests))
