"""uvicorn's httptools protocol, with a bound on the size of request headers and one write per
response head and first body part.

httptools buffers a request's headers without any limit (measured: 200 MB of headers were
accepted, and held in memory, before the app saw the request). This subclass counts the bytes
that arrive while a request's headers are incomplete and, past ``server.max_header_bytes``,
answers 431 with the gateway's JSON error body and closes the connection, so a client can make
a worker hold at most the limit plus one socket read. The exact limit on complete headers is
checked again in the app (``headers.py``).

uvicorn writes a response's head and its body with two ``transport.write`` calls, so every JSON
answer costs two ``send`` system calls (each one, on loopback, also delivers the segment to the
reader) and checks each header against two regular expressions. :class:`OneWriteCycle` holds
a response's head until its first body message and writes both at once: a sized answer whole,
a stream's head with its first chunk (chunk-encoded as uvicorn does; the rest of the stream goes
through uvicorn), checking the header names and values in one pass each. Anything else (HEAD,
1xx/204/304, a ``connection`` or ``transfer-encoding`` header, uvicorn's access log) goes
through uvicorn's own code unchanged. Measured on the gateway's cache-hit path: ~1 in 8 of the
CPU per request was ``send``.

The limit travels in ``$TOKYO_IA_MAX_HEADER_BYTES`` (set by ``tokyo-ia serve``), because uvicorn
creates this class in each worker process from its import path.
"""

from __future__ import annotations

import os
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from ..config import DEFAULT_MAX_HEADER_BYTES
from .errors import render_error
from .headers import too_large

LIMIT_ENV = "TOKYO_IA_MAX_HEADER_BYTES"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = int(os.environ.get(LIMIT_ENV) or DEFAULT_MAX_HEADER_BYTES)
        self._header_bytes: int | None = None  # counting while a request's headers are incomplete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._header_bytes = None
        super().on_headers_complete()
        cycle = self.cycle
        # The cycle's task has been created but has not run yet: it will call our send.
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = OneWriteCycle
            cast(OneWriteCycle, cycle).held = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_bytes is None or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            self._header_bytes = None
            status, _, body = render_error(too_large(self.max_header_bytes), "-")
            self.transport.write(
                b"HTTP/1.1 %d Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            self.transport.close()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing a sized response's head and body together."""

    held: tuple[Any, bytes, int | None] | None
    """The start message, its head (without the final CRLF) and its content-length (None:
    chunked)."""

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            self.held = None  # a second start (uvicorn's 500 after a failure) replaces the first
            simple = self._head(message)
            if simple is None:
                await super().send(message)
            else:
                self.held = (message, *simple)
            return
        held = self.held
        if held is None:
            await super().send(message)
            return
        self.held = None
        start, head, length = held
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if (
            message["type"] != "http.response.body"
            or (length is not None and (more or len(body) != length))
            or self.disconnected
            or self.flow.write_paused
        ):
            await super().send(start)  # uvicorn's own path, with its checks and errors
            await super().send(message)
            return
        # What uvicorn's send does for the start and this first body message, in one write.
        self.response_started = True
        self.waiting_for_100_continue = False
        self.expected_content_length = 0
        close = b"" if self.keep_alive else b"connection: close\r\n"
        if length is not None:
            self.chunked_encoding = False
            self.transport.write(head + close + b"\r\n" + body)
        else:  # a stream: its head and first chunk together, the rest through uvicorn
            self.chunked_encoding = True
            chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            tail = b"" if more else b"0\r\n\r\n"
            self.transport.write(head + close + b"transfer-encoding: chunked\r\n\r\n" + chunk + tail)
            if more:
                return
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def _head(self, message: Any) -> tuple[bytes, int | None] | None:
        """Status line and headers, and the ``content-length`` (None: the body will be chunked),
        of a response with nothing that changes how uvicorn frames it; None sends it through
        uvicorn's code instead."""
        status = message["status"]
        if self.access_log or self.scope["method"] == "HEAD" or status < 200 or status in (204, 304):
            return None
        headers = [*self.default_headers, *message.get("headers", ())]
        names = [name.lower() for name, _ in headers]
        if b"connection" in names or b"transfer-encoding" in names:
            return None
        if HEADER_RE.search(b"".join(names)) or HEADER_VALUE_RE.search(b"".join(v for _, v in headers)):
            return None  # uvicorn raises the error
        length: int | None = None
        if b"content-length" in names:
            declared = headers[names.index(b"content-length")][1]
            if not declared.isdigit():
                return None
            length = int(declared)
        lines = [STATUS_LINE[status]]
        for name, (_, value) in zip(names, headers, strict=True):
            lines += (name, b": ", value, b"\r\n")
        return b"".join(lines), length
