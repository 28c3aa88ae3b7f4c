"""uvicorn's httptools protocol, with a bound on the size of request headers.

httptools buffers a request's headers without any limit (measured: 200 MB of headers were
accepted, and held in memory, before the app saw the request). This subclass counts the bytes
that arrive while a request's headers are incomplete and, past ``server.max_header_bytes``,
answers 431 with the gateway's JSON error body and closes the connection, so a client can make
a worker hold at most the limit plus one socket read. The exact limit on complete headers is
checked again in the app (``headers.py``).

The limit travels in ``$TOKYO_IA_MAX_HEADER_BYTES`` (set by ``tokyo-ia serve``), because uvicorn
creates this class in each worker process from its import path.
"""

from __future__ import annotations

import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
