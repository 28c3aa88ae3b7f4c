"""The upstream HTTP/1.1 client (providers/wire.py) against real sockets.

Each test runs a small asyncio server on loopback that writes exactly the bytes under test
(framing, keep-alive, encodings, stalls, drops), so every edge is a real one on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme

from tokyo_ia.providers.wire import ConnectError, Pool, WireError, WireTimeout, encode_headers

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader, server: Server) -> bytes | None:
    """One request's head (and its content-length body), or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    server.requests.append(head + body)
    return head + body


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


@asynccontextmanager
async def serve(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await handler(reader, writer, server)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            server.closed.set()

    srv = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=ssl_context)
    server.port = srv.sockets[0].getsockname()[1]
    async with srv:
        yield server


async def answer_each(reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await read_request(reader, server) is not None:
            writer.write(reply)
            await writer.drain()

    return handler


async def get(pool: Pool, path: str = "/x", within_s: float = 5.0) -> tuple[int, bytes]:
    resp = await pool.request("GET", path, b"", within_s=within_s)
    try:
        body = await resp.read()
    except BaseException:
        resp.close()
        raise
    resp.release()
    return resp.status, body


def pool_for(server: Server, **options: float | int | None) -> Pool:
    return Pool(f"http://127.0.0.1:{server.port}", **options)  # type: ignore[arg-type]


async def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request() -> None:
    async with serve(await answer_each(ok(b'{"a":1}'))) as server:
        pool = Pool(f"http://127.0.0.1:{server.port}/v1/")
        for _ in range(3):
            resp = await pool.request("POST", "/chat", encode_headers({"x-k": "v"}), b'{"q":1}', within_s=5)
            assert (resp.status, await resp.read()) == (200, b'{"a":1}')
            resp.release()
        assert server.connections == 1
        assert pool.stats().idle == 1 and pool.stats().active == 0
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{server.port}\r\n".encode() in first
        assert b"x-k: v\r\ncontent-length: 7\r\n\r\n" in first and first.endswith(b'{"q":1}')
        pool.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_body_framings(reply: bytes) -> None:
    async with serve(await answer_each(reply)) as server:
        pool = pool_for(server)
        assert await get(pool) == (200, b"hello world")
        assert await get(pool) == (200, b"hello world")
        assert server.connections == 1
        pool.close()


async def test_body_delimited_by_the_end_of_the_connection_and_connection_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with serve(handler) as server:
        pool = pool_for(server)
        assert await get(pool) == (200, b"until the end")
        assert await get(pool) == (200, b"until the end")
        assert server.connections == 2  # not reused after connection: close
        assert pool.stats().idle == 0
        pool.close()


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(ok(b"one"))
        await writer.drain()  # then close while the client keeps the connection idle

    async with serve(handler) as server:
        pool = pool_for(server)
        assert await get(pool) == (200, b"one")
        await server.closed.wait()
        await asyncio.sleep(0.05)
        assert await get(pool) == (200, b"one")
        assert server.connections == 2
        pool.close()


async def test_idle_connections_expire_after_keepalive() -> None:
    async with serve(await answer_each(ok(b"x"))) as server:
        pool = pool_for(server, keepalive_s=0.05)
        await get(pool)
        await asyncio.sleep(0.1)
        await get(pool)
        assert server.connections == 2
        pool.close()


async def test_headers_lower_cased_repeated_ones_joined_and_1xx_skipped() -> None:
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-Tag: a\r\nx-tag: b\r\ncontent-length: 2\r\n\r\n{}"
    )
    async with serve(await answer_each(reply)) as server:
        pool = pool_for(server)
        resp = await pool.request("GET", "/", b"", within_s=5)
        assert resp.status == 429
        assert resp.headers["retry-after"] == "3" and resp.headers["x-tag"] == "a, b"
        assert "link" not in resp.headers
        assert await resp.read() == b"{}"
        resp.release()
        pool.close()


async def test_gzip_answer_is_decoded_and_unknown_encoding_refused() -> None:
    packed = gzip.compress(b'{"ok": true}' * 100)
    async with serve(await answer_each(ok(packed, b"content-encoding: gzip\r\n"))) as server:
        pool = pool_for(server)
        assert await get(pool) == (200, b'{"ok": true}' * 100)
        pool.close()
    async with serve(await answer_each(ok(b"xx", b"content-encoding: br\r\n"))) as server:
        pool = pool_for(server)
        with pytest.raises(WireError, match="content-encoding 'br'"):
            await get(pool)
        pool.close()


async def test_connection_refused_is_a_connect_error() -> None:
    async with serve(await answer_each(ok(b""))) as server:
        port = server.port
    pool = Pool(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectError) as info:
        await get(pool)
    assert isinstance(info.value.os_error, ConnectionRefusedError)
    assert pool.stats().active == 0


async def test_total_timeout_while_the_upstream_says_nothing() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        await reader.read()  # until the client gives up and closes

    async with serve(silent) as server:
        pool = pool_for(server)
        started = asyncio.get_running_loop().time()
        with pytest.raises(WireTimeout, match="did not answer"):
            await get(pool, within_s=0.2)
        assert 0.15 < asyncio.get_running_loop().time() - started < 2
        await asyncio.wait_for(server.closed.wait(), 2)  # the connection was closed, not pooled
        assert pool.stats() == pool.stats().__class__(0, 0, 100)


async def test_read_timeout_between_chunks_of_a_stream() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        await reader.read()

    async with serve(stalls) as server:
        pool = pool_for(server, read_timeout_s=0.15)
        resp = await pool.request("GET", "/", b"", within_s=30)
        pieces = []
        with pytest.raises(WireTimeout, match=r"sent nothing for 0\.15 s"):
            async for piece in resp.iter_chunks():
                pieces.append(piece)
        resp.close()
        assert pieces == [b"one"]
        pool.close()


async def test_drop_in_the_middle_of_a_body_is_an_error() -> None:
    async def drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async with serve(drops) as server:
        pool = pool_for(server)
        with pytest.raises(WireError, match="in the middle of its answer"):
            await get(pool)
        assert pool.stats().active == 0 and pool.stats().idle == 0
        pool.close()


async def test_garbage_is_a_protocol_error() -> None:
    async with serve(await answer_each(b"SPDY/9 what\r\n\r\n")) as server:
        pool = pool_for(server)
        with pytest.raises(WireError, match="broke the HTTP protocol"):
            await get(pool)
        pool.close()


async def test_pool_limit_makes_callers_wait_then_time_out() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await read_request(reader, server) is not None:
            await release.wait()
            writer.write(ok(b"done"))
            await writer.drain()

    async with serve(slow) as server:
        pool = pool_for(server, limit=1)
        first = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0.05)
        assert pool.stats().active == 1
        with pytest.raises(WireTimeout, match="all 1 connections"):
            await get(pool, within_s=0.1)
        second = asyncio.ensure_future(get(pool))
        await asyncio.sleep(0.05)
        release.set()
        assert await first == (200, b"done") and await second == (200, b"done")
        assert server.connections == 1
        pool.close()


async def test_waiting_callers_get_slots_in_order_and_cancelled_waits_leak_none() -> None:
    gate = asyncio.Event()
    paths: list[bytes] = []

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while (request := await read_request(reader, server)) is not None:
            paths.append(request.split(b" ")[1])
            await gate.wait()
            writer.write(ok(b"done"))
            await writer.drain()

    async with serve(gated) as server:
        pool = pool_for(server, limit=2)
        busy = [asyncio.ensure_future(get(pool, f"/busy{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(get(pool, f"/wait{i}")) for i in range(4)]
        await asyncio.sleep(0.05)
        waiting[1].cancel()  # gives up while waiting: must not take (or lose) a slot
        with pytest.raises(asyncio.CancelledError):
            await waiting[1]
        gate.set()
        for task in [*busy, waiting[0], *waiting[2:]]:
            assert await task == (200, b"done")
        assert paths[:2] == [b"/busy0", b"/busy1"] or paths[:2] == [b"/busy1", b"/busy0"]
        assert paths[2:] == [b"/wait0", b"/wait2", b"/wait3"]  # first come, first served
        stats = pool.stats()
        assert (stats.active, stats.idle, server.connections) == (0, 2, 2)
        # Every slot came back: two more at once go straight through on the idle connections.
        assert await asyncio.gather(get(pool), get(pool)) == [(200, b"done")] * 2
        pool.close()


async def test_abandoned_stream_closes_its_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(1000):
            writer.write(b"6\r\ndata:\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.005)

    async with serve(endless) as server:
        pool = pool_for(server)
        resp = await pool.request("GET", "/", b"", within_s=30)
        async for _ in resp.iter_lines():
            break
        resp.close()
        await asyncio.wait_for(server.closed.wait(), 2)
        assert pool.stats().active == 0 and pool.stats().idle == 0
        pool.close()


async def test_lines_across_chunk_boundaries_and_back_pressure_on_a_big_stream() -> None:
    lines = [b"data: %d %s\n" % (i, b"x" * (i % 50)) for i in range(40_000)]  # ~1.3 MB

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await read_request(reader, server)
        blob = b"".join(lines) + b"tail"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob))
        for start in range(0, len(blob), 7777):  # odd sizes: lines split across writes
            writer.write(blob[start : start + 7777])
        await writer.drain()
        await reader.read()

    async with serve(big) as server:
        pool = pool_for(server, read_timeout_s=0.05)
        resp = await pool.request("GET", "/", b"", within_s=30)
        await asyncio.sleep(0.2)  # a slow consumer: reading pauses instead of buffering it all
        # (and that pause, longer than the read timeout, is not the upstream's silence)
        received = [line async for line in resp.iter_lines()]
        resp.release()
        assert received == [*lines, b"tail"]
        pool.close()


async def test_tls_with_a_trusted_and_an_untrusted_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serve(await answer_each(ok(b"secret")), server_context) as server:
        pool = Pool(f"https://127.0.0.1:{server.port}", ssl_context=client_context)
        assert await get(pool) == (200, b"secret")
        assert await get(pool) == (200, b"secret")
        assert server.connections == 1
        pool.close()
        untrusted = Pool(f"https://127.0.0.1:{server.port}")
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(untrusted)


async def test_releasing_twice_gives_the_connection_back_once() -> None:
    async with serve(await answer_each(ok(b"x"))) as server:
        pool = pool_for(server, limit=1)
        resp = await pool.request("GET", "/", b"", within_s=5)
        await resp.read()
        resp.release()
        resp.release()
        resp.close()
        assert pool.stats() == pool.stats().__class__(0, 1, 1)
        first = await pool.request("GET", "/", b"", within_s=5)
        with pytest.raises(WireTimeout, match="all 1 connections"):  # still only one slot
            await pool.request("GET", "/", b"", within_s=0.05)
        first.close()
        pool.close()


async def test_bytes_after_a_complete_answer_are_not_part_of_it() -> None:
    async with serve(await answer_each(ok(b"mine") + ok(b"unasked"))) as server:
        pool = pool_for(server)
        resp = await pool.request("GET", "/", b"", within_s=5)
        await asyncio.sleep(0.05)  # the extra answer arrives before the body is read
        assert await resp.read() == b"mine"
        resp.release()
        assert pool.stats().idle == 0  # a connection that said too much is not reused
        assert await get(pool) == (200, b"mine")
        assert server.connections == 2
        pool.close()


def test_header_injection_is_refused() -> None:
    assert encode_headers({"a": "1", "b": "2"}) == b"a: 1\r\nb: 2\r\n"
    for bad in ({"x": "1\r\ninjected: yes"}, {"x\n": "1"}, {"x": "nul\x00"}, {"a:b": "1"}):
        with pytest.raises(ValueError, match="not allowed"):
            encode_headers(bad)


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Pool("ftp://example.com")
    assert Pool("https://example.com/v1")._host_line == b"host: example.com\r\n"
    assert Pool("http://[::1]:8000")._host_line == b"host: [::1]:8000\r\n"
