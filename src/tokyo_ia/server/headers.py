"""Request header checks that run before any handler: total size, and the values we read.

What reaches the app was measured with raw sockets against uvicorn + httptools (the server
``tokyo-ia serve`` runs): CR, LF, NUL, every other control character except TAB, DEL and
obsolete line folding are refused by the HTTP parser itself (a plain-text 400 that never
reaches the app); TAB and bytes ≥ 0x80 do reach it. The parser sets **no limit** on header
size (hundreds of megabytes were accepted), so two layers bound it:

- :class:`~tokyo_ia.server.protocol.HttpProtocol` answers 431 and closes the
  connection as soon as more than ``server.max_header_bytes`` arrived without the headers
  ending, so memory stays bounded whatever a client sends;
- :func:`check_headers` enforces the exact limit on what the app received (and covers any other
  ASGI server), then refuses control characters in every header the gateway reads, so no such
  value reaches a log line, an upstream request or a response header.
"""

from __future__ import annotations

import re

from ..errors import HeadersTooLargeError, InvalidRequestError

#: Every request header the gateway itself interprets (auth, tracing, caching, client address).
READ_HEADERS = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"cache-control",
        b"x-tokyo-ia-cache-ttl",
        b"x-forwarded-for",
        b"origin",
    }
)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: ": " and CRLF around each header line, as counted on the wire.
_LINE_OVERHEAD = 4


def too_large(limit: int) -> HeadersTooLargeError:
    return HeadersTooLargeError(
        f"the request headers are larger than {limit} bytes; send fewer or shorter headers "
        "(or raise server.max_header_bytes)",
        param="headers",
    )


def check_headers(headers: list[tuple[bytes, bytes]], max_bytes: int) -> None:
    """Raise 431 for headers over ``max_bytes``, 400 naming a read header with control characters."""
    size = 0
    bad: bytes | None = None
    for name, value in headers:
        size += len(name) + len(value) + _LINE_OVERHEAD
        if bad is None and name in READ_HEADERS and _CONTROL.search(value):
            bad = name
    if size > max_bytes:
        raise too_large(max_bytes)
    if bad is not None:
        header = bad.decode("latin-1")
        raise InvalidRequestError(
            f"the {header} header contains control characters (tab, CR, LF, NUL...); send it without them",
            param=header,
            code="invalid_header",
        )
