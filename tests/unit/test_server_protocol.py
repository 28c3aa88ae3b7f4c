"""The server protocol (server/protocol.py) as uvicorn's server creates it, over a recording
transport: what goes on the wire, in how many writes, and when the connection closes. Where
the answer is well formed, the bytes are compared with what uvicorn's own protocol sends."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from tokyo_ia.server.protocol import HIGH_WATER, LIMIT_ENV, HttpProtocol

Message = dict[str, Any]


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    @property
    def sent(self) -> bytes:
        return b"".join(self.writes)


class Connection:
    """A protocol instance on a recording transport, made as uvicorn's server makes one."""

    def __init__(self, app: Any, protocol_class: Any = HttpProtocol, keep_alive_s: float = 5) -> None:
        config = uvicorn.Config(
            app,
            http=protocol_class,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=keep_alive_s,
        )
        config.load()
        self.state = ServerState()
        self.state.default_headers = [(b"date", b"Tue, 24 Nov 2026 03:00:00 GMT")]  # uvicorn's, each second
        self.protocol = protocol_class(config=config, server_state=self.state, app_state={})
        self.transport = RecordingTransport()
        self.protocol.connection_made(self.transport)

    async def feed(self, data: bytes, turns: int = 20) -> None:
        self.protocol.data_received(data)
        await settle(turns)

    def lose(self) -> None:
        self.protocol.connection_lost(None)


async def settle(turns: int = 20) -> None:
    for _ in range(turns):  # let the request's task run as far as it can
        await asyncio.sleep(0)


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


async def serve_one(app: Any, request: bytes, protocol_class: Any = HttpProtocol) -> RecordingTransport:
    connection = Connection(app, protocol_class)
    await connection.feed(request)
    closed_by_server = connection.transport.closed
    connection.lose()
    connection.transport.closed = closed_by_server
    return connection.transport


def error_of(transport: RecordingTransport) -> tuple[bytes, dict[str, Any]]:
    """The status line and JSON error body of the one answer on the wire."""
    head, _, payload = transport.sent.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], orjson.loads(payload)


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
    assert not transport.closed  # keep-alive


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
    "chunked-declared": (start(200, (b"transfer-encoding", b"chunked")), body(b"ab", True), body(b"")),
    "no-content": (start(204), body(b"")),
    "not-modified": (start(304, (b"etag", b'"1"')), body(b"")),
}


@pytest.mark.parametrize("name", SEQUENCES)
@pytest.mark.parametrize("request_line", [GET, b"GET /x HTTP/1.0\r\n\r\n"], ids=["1.1", "1.0"])
async def test_the_bytes_on_the_wire_are_uvicorns(name: str, request_line: bytes) -> None:
    """Whatever the framing, the client receives exactly what uvicorn's protocol sends."""
    ours = await serve_one(reply_with(*SEQUENCES[name]), request_line)
    theirs = await serve_one(reply_with(*SEQUENCES[name]), request_line, HttpToolsProtocol)
    assert ours.sent == theirs.sent
    assert ours.closed == theirs.closed


async def test_a_streams_head_goes_out_with_its_first_chunk() -> None:
    transport = await serve_one(reply_with(*STREAM), GET)
    first = transport.writes[0]
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert first.endswith(b'transfer-encoding: chunked\r\n\r\nf\r\ndata: {"a":1}\n\n\r\n')
    assert transport.writes[1:] == [b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]


async def test_head_is_answered_without_a_body() -> None:
    app = reply_with(start(200, (b"content-length", b"2")), body(b"ok"))
    transport = await serve_one(app, b"HEAD /x HTTP/1.1\r\nhost: t\r\n\r\n")
    assert transport.sent.endswith(b"content-length: 2\r\n\r\n")
    assert not transport.closed


@pytest.mark.parametrize(
    "messages",
    [
        (start(200, (b"content-length", b"5")), body(b"toolongbody")),
        (start(200, (b"content-length", b"5")), body(b"shrt")),
    ],
    ids=["longer", "shorter"],
)
async def test_a_body_that_does_not_match_its_length_is_a_500_not_a_bad_frame(messages: Any) -> None:
    transport = await serve_one(reply_with(*messages), GET)
    status, error = error_of(transport)
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert error["error"]["code"] == "internal_error"
    assert transport.closed


async def test_an_app_that_fails_after_start_gets_a_500() -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send(start(200, (b"content-length", b"2")))
        raise RuntimeError("boom")

    transport = await serve_one(app, GET)
    status, _ = error_of(transport)
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert b"connection: close" in transport.sent
    assert transport.closed


async def test_an_app_that_fails_mid_stream_cuts_the_connection_without_a_second_answer() -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send(start(200, JSON))
        await send(body(b"data: 1\n\n", True))
        raise RuntimeError("boom")

    transport = await serve_one(app, GET)
    assert transport.sent.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"500" not in transport.sent
    assert not transport.sent.endswith(b"0\r\n\r\n")  # no clean end: the client sees a cut stream
    assert transport.closed


async def test_an_app_that_returns_without_answering_gets_a_500() -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()

    transport = await serve_one(app, GET)
    assert error_of(transport)[0] == b"HTTP/1.1 500 Internal Server Error"


@pytest.mark.parametrize(
    "header",
    [
        (b"x-bad", b"a\r\nb"),
        (b"x-bad", b"a\nb"),
        (b"x-bad", b"a\x00b"),
        (b"x-bad", b"a\x7fb"),
        (b"bad name", b"v"),
        (b"x\rinjected", b"v"),
        (b"x-a: 1\r\nx-injected", b"v"),
        (b"", b"v"),
    ],
    ids=["crlf", "lf", "nul", "del", "space", "cr", "name-crlf", "empty-name"],
)
async def test_bad_response_headers_are_refused(header: tuple[bytes, bytes]) -> None:
    app = reply_with(start(200, (b"content-length", b"2"), header), body(b"ok"))
    transport = await serve_one(app, GET)
    assert b"injected" not in transport.sent and b"a\r\nb" not in transport.sent
    assert error_of(transport)[0] == b"HTTP/1.1 500 Internal Server Error"
    assert transport.closed


async def test_tab_and_8_bit_values_and_any_case_names_are_sent() -> None:
    app = reply_with(start(200, (b"Content-Length", b"2"), (b"X-Mixed-Case", b"a\tb\xe9")), body(b"ok"))
    ours = await serve_one(app, GET)
    assert b"\r\nx-mixed-case: a\tb\xe9\r\n" in ours.sent
    assert ours.sent == (await serve_one(app, GET, HttpToolsProtocol)).sent


def echo_app(seen: list[Message]) -> Any:
    """Answers with the path and every request message it read."""

    async def app(scope: Message, receive: Any, send: Any) -> None:
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if not message.get("more_body"):
                break
        seen.append({"path": scope["path"], "messages": messages})
        payload = scope["path"].encode()
        await send(start(200, (b"content-length", str(len(payload)).encode())))
        await send(body(payload))

    return app


async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    requests = b"".join(b"GET /%d HTTP/1.1\r\nhost: t\r\n\r\n" % i for i in range(3))
    await connection.feed(requests)
    answers = connection.transport.sent.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers] == [b"/0", b"/1", b"/2"]
    assert [s["path"] for s in seen] == ["/0", "/1", "/2"]
    assert connection.transport.reading  # paused while requests waited, resumed after
    assert not connection.transport.closed
    assert connection.state.total_requests == 3


async def test_a_body_in_parts_reaches_the_app_as_it_arrives() -> None:
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    await connection.feed(b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 6\r\n\r\nabc")
    assert connection.transport.writes == []  # the app is waiting for the rest
    await connection.feed(b"def")
    assert seen[0]["messages"] == [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.request", "body": b"def", "more_body": False},
    ]
    assert connection.transport.sent.endswith(b"\r\n\r\n/up")


async def test_a_chunked_request_body_is_reassembled() -> None:
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    await connection.feed(
        b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert b"".join(m["body"] for m in seen[0]["messages"]) == b"abcde"
    assert seen[0]["messages"][-1]["more_body"] is False


async def test_reading_pauses_while_a_large_body_waits_for_the_app() -> None:
    release = asyncio.Event()
    got: list[int] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await release.wait()
        while True:
            message = await receive()
            got.append(len(message["body"]))
            if not message["more_body"]:
                break
        await send(start(204))
        await send(body(b""))

    connection = Connection(app)
    size = HIGH_WATER + 10
    await connection.feed(b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % (size + 5))
    await connection.feed(b"x" * size)
    assert not connection.transport.reading  # more than HIGH_WATER unread: stop reading
    release.set()
    await settle()
    assert connection.transport.reading  # the app read it: go on
    await connection.feed(b"y" * 5)
    assert sum(got) == size + 5
    assert connection.transport.sent.startswith(b"HTTP/1.1 204 No Content\r\n")


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body() -> None:
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    await connection.feed(b"POST /e HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
    assert connection.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    await connection.feed(b"ok")
    assert connection.transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_client_that_leaves_is_reported_to_an_app_waiting_on_receive() -> None:
    told: list[Message] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()  # the (empty) body
        await send(start(200, JSON))
        await send(body(b"data: 1\n\n", True))
        told.append(await receive())  # a stream watching for the client to go away

    connection = Connection(app)
    await connection.feed(GET)
    assert told == []
    connection.lose()
    await settle()
    assert told == [{"type": "http.disconnect"}]


async def test_sends_wait_while_the_socket_buffer_is_full() -> None:
    sent: list[int] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send(start(200, JSON))
        for i in range(3):
            await send(body(b"part", True))
            sent.append(i)
        await send(body(b""))

    connection = Connection(app)
    connection.protocol.pause_writing()
    await connection.feed(GET)
    assert sent == [] and connection.transport.writes == []
    connection.protocol.resume_writing()
    await settle()
    assert sent == [0, 1, 2]
    assert connection.transport.sent.endswith(b"0\r\n\r\n")


async def test_an_answer_before_the_body_arrived_closes_the_connection() -> None:
    async def app(scope: Message, receive: Any, send: Any) -> None:  # answers without reading
        await send(start(413, (b"content-length", b"0")))
        await send(body(b""))

    connection = Connection(app)
    await connection.feed(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\npartial")
    assert connection.transport.sent.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert connection.transport.closed  # the rest of the body is not worth reading


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() -> None:
    release = asyncio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/slow":
            await release.wait()
        await send(start(200, (b"content-length", b"2")))
        await send(body(b"ok"))

    # Timers fire late, never early: "closed" is checked after waiting well past the timeout,
    # "not closed" right after an event, half a second before the timeout could close it.
    connection = Connection(app, keep_alive_s=0.5)
    await connection.feed(GET)
    await asyncio.sleep(0.1)
    await connection.feed(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")  # in flight past the first timeout
    await asyncio.sleep(0.6)
    assert not connection.transport.closed
    release.set()
    await settle()
    assert not connection.transport.closed  # idle since just now
    await asyncio.sleep(0.7)
    assert connection.transport.closed


async def test_a_connection_that_never_sends_a_request_is_closed_after_the_keep_alive_timeout() -> None:
    silent = Connection(reply_with(), keep_alive_s=0.5)
    slow = Connection(reply_with(), keep_alive_s=0.5)
    await slow.feed(b"GET /x HTTP/1.1\r\n")  # headers under way: not idle
    assert not silent.transport.closed
    await asyncio.sleep(0.7)
    assert silent.transport.closed
    assert not slow.transport.closed


async def test_shutdown_closes_an_idle_connection_and_a_busy_one_after_its_answer() -> None:
    idle = Connection(reply_with(start(200, (b"content-length", b"2")), body(b"ok")))
    await idle.feed(GET)
    idle.protocol.shutdown()
    assert idle.transport.closed

    release = asyncio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await release.wait()
        await send(start(200, (b"content-length", b"2")))
        await send(body(b"ok"))

    busy = Connection(app)
    await busy.feed(GET)
    busy.protocol.shutdown()
    assert not busy.transport.closed
    release.set()
    await settle()
    assert b"connection: close\r\n" in busy.transport.sent
    assert busy.transport.closed


async def test_a_request_that_is_not_http_gets_a_json_400_and_a_closed_connection() -> None:
    transport = await serve_one(reply_with(), b"NOT HTTP AT ALL\r\n\r\n")
    status, error = error_of(transport)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert error["error"]["code"] == "invalid_http"
    assert transport.closed


async def test_headers_past_the_limit_get_431_before_they_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, "1024")
    connection = Connection(reply_with(start(200, (b"content-length", b"2")), body(b"ok")))
    await connection.feed(b"GET /x HTTP/1.1\r\nhost: t\r\n")
    for _ in range(3):
        if not connection.transport.closed:
            await connection.feed(b"x-pad: " + b"a" * 500 + b"\r\n")
    status, error = error_of(connection.transport)
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert error["error"]["type"] == "invalid_request_error"
    assert connection.transport.closed


async def test_a_pipelined_request_after_a_large_body_is_not_taken_for_a_header_flood(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(LIMIT_ENV, "1024")
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    big = b"x" * 20_000
    # One read: a large body, then the first bytes of the next request's headers.
    await connection.feed(
        b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big) + b"GET /next HT"
    )
    await connection.feed(b"TP/1.1\r\nhost: t\r\n\r\n")
    assert [s["path"] for s in seen] == ["/big", "/next"]
    assert b"431" not in connection.transport.sent and not connection.transport.closed


async def test_an_upgrade_request_is_answered_as_http_and_the_connection_closed() -> None:
    request = b"GET /ws HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    transport = await serve_one(reply_with(start(200, (b"content-length", b"2")), body(b"ok")), request)
    assert transport.sent.startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.sent.endswith(b"connection: close\r\n\r\nok")
    assert transport.closed


async def test_the_scope_is_what_the_app_reads() -> None:
    scopes: list[Message] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await receive()
        await send(start(204))
        await send(body(b""))

    await serve_one(
        app, b"POST /v1/a%20b?x=1 HTTP/1.1\r\nHost: t\r\nX-Api-Key: k\r\ncontent-length: 0\r\n\r\n"
    )
    scope = scopes[0]
    assert scope["method"] == "POST" and scope["http_version"] == "1.1"
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/v1/a b", b"/v1/a%20b", b"x=1")
    assert scope["headers"] == [(b"host", b"t"), (b"x-api-key", b"k"), (b"content-length", b"0")]
    assert scope["client"] == ("127.0.0.1", 5555) and scope["server"] == ("127.0.0.1", 8080)
    assert scope["scheme"] == "http"


PIPELINE = (
    b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"
    b"POST /b HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    b"GET /c?q=1 HTTP/1.1\r\nhost: t\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 7, 13, 64, len(PIPELINE)])
async def test_pipelined_requests_split_anywhere_give_the_same_exchanges(step: int) -> None:
    """However the socket cuts the bytes (one at a time included), the app sees the same
    requests and the client gets the same answers, in order."""
    seen: list[Message] = []
    connection = Connection(echo_app(seen))
    for start_at in range(0, len(PIPELINE), step):
        await connection.feed(PIPELINE[start_at : start_at + step], turns=3)
    await settle()
    assert [(s["path"], b"".join(m["body"] for m in s["messages"])) for s in seen] == [
        ("/a", b"hello"),
        ("/b", b"abcde"),
        ("/c", b""),
    ]
    answers = connection.transport.sent.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [a.rpartition(b"\r\n\r\n")[2] for a in answers] == [b"/a", b"/b", b"/c"]
    assert not connection.transport.closed and connection.transport.reading


async def test_garbage_never_escapes_the_protocol() -> None:
    """Random bytes after valid prefixes (seeded): every connection ends answered or closed,
    nothing raises out of ``data_received``, and what is written is whole HTTP answers."""
    rng = random.Random(7)
    prefixes = [b"", b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n\r\n", GET]
    for _ in range(300):
        connection = Connection(echo_app([]))
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        await connection.feed(rng.choice(prefixes) + noise, turns=5)
        sent = connection.transport.sent
        assert sent == b"" or sent.startswith(b"HTTP/1.1 "), sent[:80]
        connection.lose()
