"""The server protocol (server/protocol.py) under uvicorn's own machinery, over a recording
transport: what goes on the wire, in how many writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from tokyo_ia.server.protocol import BoundedHttpToolsProtocol

Message = dict[str, Any]


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.closed_by_server = False  # before the test's own connection_lost

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def reply_with(*messages: Message) -> Any:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        for message in messages:
            await send(message)

    return app


def start(status: int = 200, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def serve_one(
    app: Any, request: bytes, protocol_class: type[HttpToolsProtocol] = BoundedHttpToolsProtocol
) -> RecordingTransport:
    config = uvicorn.Config(app, http=protocol_class, access_log=False, server_header=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Tue, 24 Nov 2026 03:00:00 GMT")]  # uvicorn's, refreshed each second
    protocol = protocol_class(config=config, server_state=state, app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(20):  # let the request's task run to its end
        await asyncio.sleep(0)
    transport.closed_by_server = transport.closed
    protocol.connection_lost(None)
    return transport


GET = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"
JSON = (b"content-type", b"application/json")


async def test_a_sized_response_is_one_write_with_the_same_bytes_uvicorn_writes() -> None:
    app = reply_with(start(200, JSON, (b"Content-Length", b"2"), (b"x-a", b"1")), body(b"{}"))
    transport = await serve_one(app, GET)
    assert len(transport.writes) == 1
    head, _, payload = transport.writes[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert lines[1].startswith(b"date: ")  # uvicorn's default header, first
    assert lines[2:] == [b"content-type: application/json", b"content-length: 2", b"x-a: 1"]
    assert payload == b"{}"
    assert not transport.closed_by_server  # keep-alive


async def test_http_1_0_gets_connection_close_and_a_closed_socket() -> None:
    app = reply_with(start(200, (b"content-length", b"2")), body(b"ok"))
    transport = await serve_one(app, b"GET /x HTTP/1.0\r\n\r\n")
    assert len(transport.writes) == 1
    assert b"\r\nconnection: close\r\n\r\nok" in transport.writes[0]
    assert transport.closed


STREAM = (start(200, JSON), body(b'data: {"a":1}\n\n', True), body(b"data: [DONE]\n\n", True), body(b""))
SEQUENCES = {
    "sized": (start(200, JSON, (b"content-length", b"2")), body(b"{}")),
    "stream": STREAM,
    "stream-one-part": (start(200, JSON), body(b"all at once")),
    "stream-empty-first": (start(200, JSON), body(b"", True), body(b"x")),
    "sized-in-parts": (start(200, (b"content-length", b"4")), body(b"ab", True), body(b"cd")),
    "connection-header": (start(200, (b"content-length", b"2"), (b"connection", b"close")), body(b"ok")),
    "no-content": (start(204), body(b"")),
}


@pytest.mark.parametrize("name", SEQUENCES)
@pytest.mark.parametrize("request_line", [GET, b"GET /x HTTP/1.0\r\n\r\n"], ids=["1.1", "1.0"])
async def test_the_bytes_on_the_wire_are_uvicorns(name: str, request_line: bytes) -> None:
    """Whatever the path, the client receives exactly what uvicorn alone would send."""
    ours = await serve_one(reply_with(*SEQUENCES[name]), request_line)
    theirs = await serve_one(reply_with(*SEQUENCES[name]), request_line, HttpToolsProtocol)
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert ours.closed_by_server == theirs.closed_by_server


async def test_a_streams_head_goes_out_with_its_first_chunk() -> None:
    transport = await serve_one(reply_with(*STREAM), GET)
    first = transport.writes[0]
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(b'transfer-encoding: chunked\r\n\r\nf\r\ndata: {"a":1}\n\n\r\n')
    assert transport.writes[1:] == [b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize(
    ("messages", "request_line"),
    [
        (SEQUENCES["sized-in-parts"], GET),
        (SEQUENCES["connection-header"], GET),
    ],
    ids=["body-in-parts", "connection-header"],
)
async def test_everything_else_goes_through_uvicorn_unchanged(
    messages: tuple[Message, ...], request_line: bytes
) -> None:
    transport = await serve_one(reply_with(*messages), request_line)
    assert len(transport.writes) >= 2  # uvicorn's own path: head, then body part(s)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")


async def test_head_is_answered_by_uvicorn_without_a_body() -> None:
    app = reply_with(start(200, (b"content-length", b"2")), body(b""))
    transport = await serve_one(app, b"HEAD /x HTTP/1.1\r\nhost: t\r\n\r\n")
    assert b"".join(transport.writes).endswith(b"content-length: 2\r\n\r\n")


async def test_a_body_that_does_not_match_its_length_is_uvicorns_error_not_a_bad_frame() -> None:
    app = reply_with(start(200, (b"content-length", b"5")), body(b"toolongbody"))
    transport = await serve_one(app, GET)
    # uvicorn's path: head written, then its "longer than Content-Length" error closes the
    # connection; the client never gets a body that contradicts the header.
    assert b"toolongbody" not in b"".join(transport.writes)
    assert transport.closed


async def test_an_app_that_fails_after_start_gets_uvicorns_500() -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send(start(200, (b"content-length", b"2")))
        raise RuntimeError("boom")

    transport = await serve_one(app, GET)
    assert transport.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error\r\n")


async def test_bad_header_values_are_still_refused() -> None:
    app = reply_with(start(200, (b"content-length", b"2"), (b"x-bad", b"a\r\nb")), body(b"ok"))
    transport = await serve_one(app, GET)
    assert transport.writes == []  # uvicorn's check refuses it; the connection is closed
    assert transport.closed
