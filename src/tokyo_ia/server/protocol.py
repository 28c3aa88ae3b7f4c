"""HTTP/1.1 for the gateway's ASGI app: a lean protocol that uvicorn's server runs.

uvicorn keeps what a server process does (sockets, TLS, workers, lifespan, signals, graceful
shutdown, the ``date`` header refreshed each second); this module is the per-connection part,
written for the gateway's traffic: JSON requests that arrive whole in one read, answered with
one ``transport.write`` (head and body together; a stream's head with its first chunk).
Measured against uvicorn's own httptools protocol serving the same app, it does per request
only what a request needs: no event object and no timer per request (the keep-alive timeout
is one timer per connection that re-arms itself), a request body handed over without waiting
when it is already here, response headers checked with one pattern search for all names and
one for all values.

What it guarantees, as uvicorn does: keep-alive (a connection idle for ``timeout_keep_alive``
seconds, 5 by default, is closed; unlike uvicorn, also one that never sent a request),
pipelined requests answered in order (reading pauses while one waits), HTTP/1.0 and ``connection: close`` close after the answer,
``Expect: 100-continue`` answered when the app first reads the body, HEAD answered without a
body, 204/304 without framing, a body held to the ``content-length`` the app declared (a
mismatch closes the connection rather than send a frame that contradicts its header), an app
that fails before its answer gets a 500 and after it a closed connection, reading paused
while 64 KiB of unread body is waiting and writing waits while the socket's buffer is full,
an app waiting on ``receive()`` after the body is told ``http.disconnect`` when the client
goes away (how a stream learns to stop).

And one thing uvicorn does not: a bound on the size of request headers. httptools buffers
headers without limit (measured: 200 MB accepted and held before the app saw the request).
The bytes that arrive while a request's headers are incomplete are counted; past
``server.max_header_bytes`` the answer is 431 with the gateway's JSON error and the
connection closes, so a client can make a worker hold at most the limit plus one socket read.
The exact limit on complete headers is checked again in the app (``headers.py``). The limit
travels in ``$TOKYO_IA_MAX_HEADER_BYTES`` (set by ``tokyo-ia serve``), because uvicorn creates
this class in each worker process from its configuration.

Not supported (the gateway has no use for them): WebSocket upgrades (an upgrade request is
answered as plain HTTP, then the connection closes), uvicorn's access log (the gateway writes
its own), ``--limit-concurrency``.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import urllib.parse
from collections import deque
from typing import Any, cast

import httptools
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from ..config import DEFAULT_MAX_HEADER_BYTES
from ..errors import InvalidRequestError
from .errors import render_error
from .headers import too_large

LIMIT_ENV = "TOKYO_IA_MAX_HEADER_BYTES"
HIGH_WATER = 65_536
"""Unread request body, in bytes, above which reading from the client pauses."""

log = logging.getLogger("tokyo_ia.server")

_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"  # RFC 9110 token, lower-case
_CONTROL = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])  # every control character but TAB
_FIELD = b": ".join
_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
_DISCONNECT = {"type": "http.disconnect"}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def status_line(status: int) -> bytes:
    line = _STATUS.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


def _error_response(exc: Exception) -> bytes:
    """A gateway JSON error, whole, closing the connection (no request id: there is no request)."""
    status, _, body = render_error(exc, "-")
    return b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status_line(status),
        len(body),
        body,
    )


class HttpProtocol(asyncio.Protocol):
    """One client connection. Created by uvicorn's server with its config and shared state."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop: asyncio.AbstractEventLoop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.root_path: str = config.root_path
        self.app_state = app_state
        self.keep_alive_s: float = config.timeout_keep_alive
        self.max_header_bytes = int(os.environ.get(LIMIT_ENV) or DEFAULT_MAX_HEADER_BYTES)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.active: Exchange | None = None  # the exchange the app is serving
        self.waiting: deque[Exchange] = deque()  # pipelined requests, parsed, not started
        self.reading = True
        self.write_paused = False
        self.drains: list[asyncio.Future[None]] = []
        self.idle_since: float | None = None  # when it went idle (opened, or an answer ended), no data since
        self.idle_timer: asyncio.TimerHandle | None = None
        self.defaults: tuple[object, bytes] = (None, b"")  # server_state.default_headers, rendered
        # Per request, while it is parsed:
        self.parsing: Exchange | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes: int | None = None  # counted while a request's headers are incomplete
        self.begun = 0  # requests begun on this connection
        self.expect_continue = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server_state.connections.add(self)
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, same API
        self.server = get_local_addr(self.transport)  # type: ignore[assignment]
        self.client = get_remote_addr(self.transport)
        self.scheme = "https" if is_ssl(self.transport) else "http"
        self._idle()  # a connection that never sends a request is closed like an idle one

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.waiting.clear()
        for exchange in (self.active, self.parsing):
            if exchange is not None and not exchange.complete:
                exchange.disconnected = True
                exchange.wake()
        self.resume_writing()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        begun = self.begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade_refused()
            return
        except httptools.HttpParserError as exc:
            self._bad_request(exc)
            return
        # Headers still incomplete: count this read, unless their request began inside it (a
        # pipelined one after a body, say), where how much of it is theirs is not known: at
        # most one read goes uncounted.
        if self.header_bytes is not None and self.begun == begun and not self.transport.is_closing():
            self.header_bytes += len(data)
            if self.header_bytes > self.max_header_bytes:
                self.header_bytes = None
                self._refuse(too_large(self.max_header_bytes))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drains, self.drains = self.drains, []
        for waiter in drains:
            if not waiter.done():
                waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.expect_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.header_bytes = None
        parser = self.parser
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        version = parser.get_http_version()
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
        }
        if self.app_state:
            scope["state"] = self.app_state.copy()
        exchange = Exchange(self, scope, version != "1.0" and parser.should_keep_alive())
        exchange.expect_continue = self.expect_continue
        self.parsing = exchange
        if self.active is None:
            self._start(exchange)
        else:  # pipelined: answered after the one in progress
            self.waiting.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.complete:
            return  # answered already, without reading this
        exchange.parts.append(body)
        exchange.buffered += len(body)
        exchange.news = True
        if exchange.buffered > HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is not None and not exchange.complete:
            exchange.body_ended()

    # -- flow -------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.waiting:
            self.reading = True
            self.transport.resume_reading()

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self.drains.append(waiter)
        await waiter

    def default_headers(self) -> bytes:
        """uvicorn's default headers (``date``, refreshed each second), rendered once per list."""
        current = self.server_state.default_headers
        if self.defaults[0] is not current:
            self.defaults = (current, b"".join(b"%s: %s\r\n" % pair for pair in current))
        return self.defaults[1]

    def _start(self, exchange: Exchange) -> None:
        self.active = exchange
        task = self.loop.create_task(exchange.run())
        tasks = self.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def answered(self, exchange: Exchange) -> None:
        """An exchange's last byte is written: start the next pipelined one, or wait idle."""
        self.server_state.total_requests += 1
        if self.active is exchange:
            self.active = None
        if self.transport.is_closing():
            return
        if not exchange.keep_alive or exchange.more_body:  # more_body: answered before it was read
            self.transport.close()
            return
        if self.waiting:
            self._start(self.waiting.popleft())
            self.resume_reading()
            return
        self.resume_reading()
        self._idle()

    def _idle(self) -> None:
        self.idle_since = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(self.keep_alive_s, self._idle_check)

    def _idle_check(self) -> None:
        """One timer per connection: close it after ``timeout_keep_alive`` idle seconds, else
        re-arm for the rest of that time (or, while a request is in flight, until it ends)."""
        self.idle_timer = None
        if self.idle_since is None or self.transport.is_closing():
            return
        left = self.idle_since + self.keep_alive_s - self.loop.time()
        if left <= 0:
            self.transport.close()
        else:
            self.idle_timer = self.loop.call_later(left, self._idle_check)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close an idle connection, end a busy one after its answer."""
        if self.active is None:
            self.transport.close()
        else:
            self.active.keep_alive = False
            for exchange in self.waiting:
                exchange.keep_alive = False

    # -- refusals ---------------------------------------------------------------------------

    def _refuse(self, exc: Exception) -> None:
        """Answer a request that never reaches the app, and close. While the app is answering
        another request on this connection, a second answer cannot be sent: just close."""
        if self.active is None:
            self.transport.write(_error_response(exc))
        self.transport.close()

    def _bad_request(self, exc: Exception) -> None:
        log.warning("invalid HTTP request from %s: %s", self.client, exc)
        self._refuse(
            InvalidRequestError(
                f"the request is not valid HTTP/1.1 ({exc}); check what your client sends",
                code="invalid_http",
            ),
        )

    def _upgrade_refused(self) -> None:
        """An ``Upgrade`` request (WebSocket): answered as plain HTTP, then the connection closes
        (what follows the headers belongs to the other protocol and is not parsed)."""
        for exchange in (self.parsing, *self.waiting):
            if exchange is not None:
                exchange.keep_alive = False
        exchange = self.parsing
        if exchange is not None and exchange.more_body:
            exchange.body_ended()


class Exchange:
    """One request and its answer: the ASGI ``receive`` and ``send`` of the app's call."""

    __slots__ = (
        "bodiless",
        "buffered",
        "chunked",
        "complete",
        "disconnected",
        "expect_continue",
        "head",
        "keep_alive",
        "left",
        "more_body",
        "news",
        "parts",
        "protocol",
        "scope",
        "started",
        "waiter",
    )

    def __init__(self, protocol: HttpProtocol, scope: dict[str, Any], keep_alive: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = False
        self.parts: list[bytes] = []  # body received, not yet handed to the app
        self.buffered = 0
        self.more_body = True
        self.news = False  # body or its end arrived since the app last read
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.started = False  # the app sent its start message
        self.head: bytes | None = None  # status line and headers, until written with the first body
        self.chunked = False
        self.bodiless = False  # HEAD, 1xx, 204, 304: whatever body the app sends stays here
        self.left = 0  # content-length bytes still to send (sized answers)
        self.complete = False  # the last byte is written

    def body_ended(self) -> None:
        """The request's body is all here: the app's next read says so."""
        self.more_body = False
        self.news = True
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def run(self) -> None:
        protocol = self.protocol
        try:
            await protocol.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            if not self.complete:
                self._fail(None)
            raise
        except Exception as exc:  # noqa: BLE001 - the app's own errors are answered by the app
            if not self.complete:
                self._fail(exc)
        else:
            if not self.complete and not self.disconnected:
                self._fail(RuntimeError("the ASGI application returned without completing its response"))

    def _fail(self, exc: Exception | None) -> None:
        """A 500 if nothing of the answer is on the wire yet (logged); otherwise cut the connection."""
        transport = self.protocol.transport
        if exc is not None and not transport.is_closing() and (self.head is not None or not self.started):
            transport.write(_error_response(exc))
        elif exc is not None:
            log.error("the response failed after its first byte: %s", exc, exc_info=exc)
        self.complete = True
        self.keep_alive = False
        transport.close()
        self.protocol.answered(self)

    # -- ASGI -------------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        protocol = self.protocol
        if self.expect_continue:
            self.expect_continue = False
            if not protocol.transport.is_closing():
                protocol.transport.write(_CONTINUE)
        while not (self.news or self.disconnected or self.complete):
            protocol.resume_reading()
            self.waiter = protocol.loop.create_future()
            await self.waiter
        if self.disconnected or self.complete:
            return _DISCONNECT
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.parts = []
        self.buffered = 0
        self.news = False
        if not protocol.reading:
            protocol.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        protocol = self.protocol
        if protocol.write_paused and not self.disconnected:
            await protocol.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            self.head = self._head(message["status"], message.get("headers", ()))
            self.started = True
            return
        if self.complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r} after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected ASGI message 'http.response.body', got {kind!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.bodiless:
            out = b""
        elif self.chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                out += _LAST_CHUNK
        else:
            self.left -= len(body)
            if self.left < 0 or (not more and self.left):
                raise RuntimeError("the response body does not match its content-length")
            out = body
        head = self.head
        if head is not None:
            self.head = None
            out = head + out
        if out:
            protocol.transport.write(out)
        if not more:
            self.complete = True
            self.wake()
            protocol.answered(self)

    def _head(self, status: int, headers: Any) -> bytes:
        """The status line and headers; sets how the body is framed.

        Checked in C-speed passes over the whole set rather than header by header: every name
        lower-case token characters (``_TOKEN``), no control character in any value except TAB
        (``_CONTROL``: the only CR and LF left in the block are the line ends put there).
        """
        fields = dict(headers)
        if b"" in fields:
            raise RuntimeError("empty HTTP header name in the response")
        if b"".join(fields).translate(None, _TOKEN):
            headers = [(name.lower(), value) for name, value in headers]  # or not a token: below
            fields = dict(headers)
            if b"".join(fields).translate(None, _TOKEN):
                raise RuntimeError("invalid HTTP header name in the response")
        block = b"\r\n".join(map(_FIELD, headers))
        if len(block) - len(block.translate(None, _CONTROL)) != 2 * max(len(headers) - 1, 0):
            raise RuntimeError("invalid HTTP header value in the response")
        framed = False
        length = fields.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise RuntimeError(f"invalid content-length {length!r} in the response")
            self.left = int(length)
            framed = True
        encoding = fields.get(b"transfer-encoding")
        if encoding is not None:
            self.chunked = framed = encoding.lower() == b"chunked"
        connection = fields.get(b"connection")
        closes = connection is not None and b"close" in [t.strip() for t in connection.lower().split(b",")]
        if closes:
            self.keep_alive = False
        extra = b"" if closes or self.keep_alive else b"connection: close\r\n"
        if status < 200 or status in (204, 304) or self.scope["method"] == "HEAD":
            self.bodiless = True
        elif not framed:
            self.chunked = True
            extra += b"transfer-encoding: chunked\r\n"
        if block:
            block += b"\r\n"
        return b"".join((status_line(status), self.protocol.default_headers(), block, extra, b"\r\n"))
