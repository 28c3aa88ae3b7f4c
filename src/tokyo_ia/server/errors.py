"""Exceptions → HTTP error responses, in exactly one place."""

from __future__ import annotations

import logging

import orjson

from ..errors import GatewayError

log = logging.getLogger("tokyo_ia.server")

Headers = list[tuple[bytes, bytes]]


def render_error(exc: BaseException, request_id: str) -> tuple[int, Headers, bytes]:
    """Status, extra headers and body for any exception that escaped a handler."""
    if isinstance(exc, GatewayError):
        headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
        return exc.status, headers, orjson.dumps(exc.to_body())
    log.exception("unexpected error in request %s", request_id, exc_info=exc)
    body = {
        "error": {
            "message": f"internal error in the gateway (request id {request_id}); "
            "retry, and report the request id to the operator if it persists",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return 500, [], orjson.dumps(body)


def stream_error_event(exc: BaseException, request_id: str) -> bytes:
    """An SSE event that ends a stream that failed after its first byte."""
    _, _, body = render_error(exc, request_id)
    return b"data: " + body + b"\n\n"
