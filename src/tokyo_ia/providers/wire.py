"""The upstream HTTP/1.1 client: keep-alive connection pools on asyncio, parsed by httptools.

Every model call crosses this code twice (request out, answer back), so it is built for the
one shape of traffic a gateway has: a few origins, long-lived keep-alive connections, small
JSON requests, JSON or SSE answers. Measured against aiohttp (the previous transport) on one
core, 64 concurrent requests to a local upstream: ~14 µs of CPU per request here, ~130 µs
there. What it does:

- HTTP/1.1 with keep-alive (a pool per origin, most recently used connection first, idle
  connections closed after ``keepalive_s``), ``content-length`` and chunked bodies, and bodies
  delimited by the end of the connection; ``gzip``/``deflate`` answers are decoded (none are
  asked for: requests say ``accept-encoding: identity``).
- TLS with the system's trust store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` point it elsewhere).
- Limits: at most ``max_connections`` connections per origin (callers wait for a free one
  within their deadline), a connect timeout, a total timeout per exchange (capped by the
  request's deadline) and an optional read timeout (the longest silence between two reads).
- Back-pressure for streams: reading from the socket pauses while a consumer is more than
  :data:`_HIGH_WATER` bytes behind.
- A connection is only reused after a complete exchange that both sides agreed to keep
  alive; an exchange abandoned half-way (client gone, timeout, error) closes its connection.

Errors (the transport turns them into the gateway's own, :mod:`~tokyo_ia.providers.http`)::

    WireError                   the exchange failed; nothing more to read
    ├── ConnectError            no connection (refused, DNS, TLS handshake); ``os_error``
    └── WireTimeout             connect, total or read timeout (also a TimeoutError)

Requests are not retried here: whether and where to try again is the pipeline's decision.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

from .base import PoolStats

_HIGH_WATER = 256 * 1024
"""Bytes a stream's consumer may fall behind before reading from the socket pauses."""
_FORBIDDEN = frozenset("\r\n\x00")


class WireError(Exception):
    """The exchange with the upstream failed."""


class ConnectError(WireError):
    """No connection could be made (refused, unresolvable, TLS handshake failed)."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


class WireTimeout(WireError, TimeoutError):
    """A connect, total or read timeout expired."""


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """``name: value`` lines, ready to put in a request head.

    Encode fixed headers once (at start-up) and per-call ones per call. A CR, LF or NUL in a
    name or value would let it smuggle another header or request: refused with ValueError.
    """
    lines = []
    for name, value in headers.items():
        if _FORBIDDEN.intersection(name) or _FORBIDDEN.intersection(value) or ":" in name:
            raise ValueError(f"header {name!r} has a character not allowed in HTTP headers")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class Response:
    """An upstream answer whose head has arrived; the body is read with :meth:`read` or
    :meth:`iter_chunks` / :meth:`iter_lines`. Finish with :meth:`release` (the connection goes
    back to the pool if the exchange completed) or :meth:`close` (it is closed)."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers: Mapping[str, str] = headers
        """Names in lower case; a repeated header's values joined with ``, ``."""

    async def read(self) -> bytes:
        """The whole body."""
        return await self._conn.read_all()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded, in pieces of any size)."""
        conn = self._conn
        while True:
            piece = await conn.next_piece()
            if piece is None:
                return
            yield piece

    async def iter_lines(self) -> AsyncIterator[bytes]:
        """The body split after each ``\\n`` (kept); a last line without one comes last."""
        rest = b""
        async for piece in self.iter_chunks():
            if rest:
                piece = rest + piece
            start = 0
            end = piece.find(b"\n")
            while end >= 0:
                yield piece[start : end + 1]
                start = end + 1
                end = piece.find(b"\n", start)
            rest = piece[start:]
        if rest:
            yield rest

    def release(self) -> None:
        """Done with the answer: reuse the connection if the exchange is complete, else close it."""
        self._conn.finish()

    def close(self) -> None:
        """Done with the answer, whatever is left of it: the connection is closed."""
        self._conn.finish(force_close=True)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the state of the exchange on it (one at a time)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.busy = False
        # The exchange in progress.
        self._status = 0
        self._headers: dict[str, str] = {}
        self._head: asyncio.Future[Response] | None = None
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: WireError | None = None
        self._keep_alive = False
        self._framed = True
        self._paused = False
        self._streaming = False
        self._extra = False
        self._decoder: zlib._Decompress | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expires = 0.0
        self._read_timeout: float | None = None
        self._last_io = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an idle connection has nothing to say: a stray byte ends it
            self._abort()
            return
        if self._complete:  # bytes after a complete answer: never part of it, never reused
            self._keep_alive = False
            return
        self._last_io = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WireError(f"the upstream broke the HTTP protocol: {exc}"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        # Also after the peer's EOF: asyncio's default eof_received closes the transport.
        self.closed = True
        self.pool.forget(self)
        if not self.busy or self._complete:
            return
        if exc is None and self._head is None and not self._framed:
            self.on_message_complete()  # a body delimited by the end of the connection
            return
        reason = f": {exc}" if exc is not None else ""
        where = "before its answer" if self._head is not None else "in the middle of its answer"
        self._fail(WireError(f"the upstream closed the connection {where}{reason}"))

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request: never part of the first, never reused
            self._keep_alive = False
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra:
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        known = self._headers.get(key)
        self._headers[key] = text if known is None else f"{known}, {text}"

    def on_headers_complete(self) -> None:
        if self._extra:
            return
        status = self.parser.get_status_code()
        if status < 200:  # 1xx informational: the real answer follows
            self._headers = {}
            return
        self._status = status
        headers = self._headers
        self._framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        elif encoding != "identity":
            self._fail(WireError(f"the upstream answered with content-encoding {encoding!r}"))
            self._abort()
            return
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Response(self, status, headers))

    def on_body(self, body: bytes) -> None:
        if self._extra:
            return
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(WireError(f"the upstream's compressed body is corrupt: {exc}"))
                self._abort()
                return
            if not body:
                return
        self._pieces.append(body)
        self._buffered += len(body)
        if (
            self._streaming
            and self._buffered > _HIGH_WATER
            and not self._paused
            and self.transport is not None
        ):
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._status == 0 or self._extra:  # the end of a 1xx, or of an answer nobody asked for
            return
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._pieces.append(tail)
        self._keep_alive = not self.closed and self.parser.should_keep_alive()
        self._complete = True
        self._stop_timer()
        self._wake()

    # -- the exchange -----------------------------------------------------------------------

    def send(
        self, data: bytes | list[bytes], timeout: float, read_timeout: float | None
    ) -> asyncio.Future[Response]:
        """Write a request; the future resolves with the answer's head."""
        assert self.transport is not None
        self.busy = True
        self._status = 0
        self._headers = {}
        self._pieces = []
        self._buffered = 0
        self._complete = False
        self._error = None
        self._framed = True
        self._streaming = False
        self._extra = False
        self._decoder = None
        self._head = self.loop.create_future()
        now = self._last_io = self.loop.time()
        self._expires = now + timeout
        self._read_timeout = read_timeout
        self._timer = self.loop.call_at(self._next_check(now), self._on_timer)
        if isinstance(data, list):
            self.transport.writelines(data)
        else:
            self.transport.write(data)
        return self._head

    async def read_all(self) -> bytes:
        while not self._complete and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        pieces, self._pieces = self._pieces, []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def next_piece(self) -> bytes | None:
        self._streaming = True
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            await self._wait()
        pieces, self._pieces = self._pieces, []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_io = self.loop.time()  # the silence while paused was ours, not the upstream's
            self.transport.resume_reading()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def finish(self, force_close: bool = False) -> None:
        """The caller is done with this exchange: back to the pool or closed (once: a second
        call, e.g. ``release`` then ``close``, changes nothing)."""
        if not self.busy:
            return
        self._stop_timer()
        reusable = not force_close and self._complete and self._keep_alive and self._error is None
        self.busy = False
        self._pieces = []
        if not reusable:
            self._abort()
        self.pool.give_back(self, reusable)

    async def _wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WireError) -> None:
        if self._error is not None or self._complete:
            return
        self._error = error
        self._stop_timer()
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()

    def usable(self, now: float, keepalive_s: float) -> bool:
        """Open, not closing, and idle for less than ``keepalive_s``."""
        transport = self.transport
        return (
            not self.closed
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < keepalive_s
        )

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- timeouts: one timer per exchange, re-armed only when it fires ------------------------

    def _next_check(self, now: float) -> float:
        if self._read_timeout is None:
            return self._expires
        return min(self._expires, self._last_io + self._read_timeout)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        if now >= self._expires:
            self._fail(WireTimeout("the upstream did not answer within the time allowed"))
        elif (
            self._read_timeout is not None and not self._paused and now - self._last_io >= self._read_timeout
        ):
            self._fail(WireTimeout(f"the upstream sent nothing for {self._read_timeout:g} s"))
        else:
            self._timer = self.loop.call_at(self._next_check(now), self._on_timer)
            return
        self._abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Pool:
    """Keep-alive connections to one origin (``scheme://host:port``), at most ``limit`` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int = 100,
        keepalive_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http:// or https:// URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_line = f"host: {host if default_port else f'{host}:{self.port}'}\r\n".encode("latin-1")
        self.prefix = parts.path.rstrip("/")
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._active = 0  # connections handed out (each holds one of ``limit`` slots)
        self._waiters: deque[asyncio.Future[None]] = deque()  # callers waiting for a slot
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def stats(self) -> PoolStats:
        return PoolStats(self._active, len(self._idle), self.limit)

    async def request(
        self,
        method: str,
        path: str,
        headers: bytes,
        body: bytes | None = None,
        *,
        within_s: float,
    ) -> Response:
        """Send ``method path`` and wait for the answer's head, all within ``within_s`` seconds
        (which also bounds reading the body).

        ``headers``: :func:`encode_headers` lines (``host`` and ``content-length`` are added).
        The returned :class:`Response` must be released or closed.
        """
        expires = time.monotonic() + within_s
        line = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode() + self._host_line + headers
        data: bytes | list[bytes]
        if body is None:
            data = line + b"\r\n"
        else:
            head = line + b"content-length: %d\r\n\r\n" % len(body)
            data = head + body if len(body) < 65536 else [head, body]
        conn = await self._acquire(within_s)
        remaining = max(0.001, expires - time.monotonic())
        try:
            return await conn.send(data, remaining, self.read_timeout_s)
        except BaseException:
            conn.finish(force_close=True)
            raise

    async def _acquire(self, within_s: float) -> _Connection:
        # A plain counter, not an asyncio.Semaphore: taking a free slot costs no await, and
        # Semaphore.locked() scans its waiters on every call (Python 3.11).
        if self._active < self.limit and not self._waiters:
            self._active += 1
        else:
            await self._wait_for_slot(within_s)
        now = self.loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable(now, self.keepalive_s):
                return conn
            conn._abort()
        try:
            return await self._connect(min(within_s, self.connect_timeout_s))
        except BaseException:
            self._release_slot()
            raise

    async def _wait_for_slot(self, within_s: float) -> None:
        """Wait, first come first served, until a released slot is handed to this caller."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as the wait ended: pass it on
            else:
                waiter.cancel()  # skipped by _release_slot
            if isinstance(exc, TimeoutError):
                raise WireTimeout(
                    f"all {self.limit} connections to {self.host}:{self.port} stayed busy"
                ) from None
            raise

    def _release_slot(self) -> None:
        """A slot is free: hand it to the longest waiting caller, else count it free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: _active stays as it is
                return
        self._active -= 1

    async def _connect(self, within_s: float) -> _Connection:
        try:
            async with asyncio.timeout(within_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            raise WireTimeout(
                f"connecting to {self.host}:{self.port} took longer than {within_s:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS (ssl.SSLError)
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}", exc) from exc
        self._all.add(conn)
        return conn

    def give_back(self, conn: _Connection, reusable: bool) -> None:
        """A connection's exchange is over (called once per :meth:`request` that returned)."""
        if reusable and not conn.closed:
            now = self.loop.time()
            conn.idle_since = now
            idle = self._idle
            idle.append(conn)
            # The oldest idle connections are at the bottom: close those kept too long.
            while idle and now - idle[0].idle_since >= self.keepalive_s:
                idle.pop(0)._abort()
        self._release_slot()

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if not conn.busy and conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every connection (shutdown); in-flight exchanges fail."""
        for conn in list(self._all):
            conn._abort()
        self._idle.clear()
