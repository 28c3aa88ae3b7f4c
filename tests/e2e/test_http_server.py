"""The HTTP server as clients meet it (``tokyo-ia serve``): keep-alive, pipelining, framing.

Raw sockets, so the bytes on the wire are what is checked, as the gateway's own HTTP/1.1
protocol (server/protocol.py) sends them under uvicorn's server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.support import GatewayProcess


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    with GatewayProcess() as process:
        yield process


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response (status line, lower-cased headers, body by content-length) from ``sock``."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a complete head"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the whole body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def chat(stream: bool = False) -> bytes:
    body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


def test_keep_alive_and_pipelined_requests_come_back_in_order(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        buffer = bytearray()
        for _ in range(20):  # one connection, one request at a time
            sock.sendall(chat())
            status, headers, body = read_response(sock, buffer)
            assert status == b"HTTP/1.1 200 OK"
            assert orjson.loads(body)["object"] == "chat.completion"
            assert headers[b"x-content-type-options"] == b"nosniff" and b"date" in headers
        # Three requests in one write: three answers, in order, on the same connection.
        sock.sendall(
            b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n"
            + chat()
            + b"GET /nope HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        answers = [read_response(sock, buffer) for _ in range(3)]
        assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]
        assert orjson.loads(answers[0][2]) == {"status": "live"}
        assert orjson.loads(answers[2][2])["error"]["code"] == "unknown_route"
        assert buffer == b""


def test_a_stream_and_connection_close(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(chat(stream=True))
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert b"transfer-encoding: chunked" in data and b"data: [DONE]" in data
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        buffer = bytearray()
        status, headers, body = read_response(sock, buffer)
        assert (status, headers[b"connection"], orjson.loads(body)) == (
            b"HTTP/1.1 200 OK",
            b"close",
            {"status": "live"},
        )
        assert sock.recv(1) == b""  # closed by the server


def test_large_bodies_arrive_whole_with_reading_paused_and_resumed() -> None:
    """Bodies many times the protocol's read pause threshold (64 KiB), back to back on one
    connection, in pieces as the socket delivers them."""
    config = {
        "server": {"max_body_bytes": 8 * 1024 * 1024},
        "providers": {"demo": {"kind": "demo"}},
        "models": {"demo": [{"provider": "demo", "model": "demo"}]},
    }
    with GatewayProcess(config) as process, httpx.Client(base_url=process.url, timeout=30) as client:
        for size in (3_000_000, 5_000_000):
            text = "y" * size
            r = client.post(
                "/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": text}]},
            )
            assert r.status_code == 200, r.text
            # the demo model counts ceil(characters / 4) (+4 per message) prompt tokens
            assert r.json()["usage"]["prompt_tokens"] >= size // 4
