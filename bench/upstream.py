"""A fake OpenAI-compatible upstream that is never the bottleneck.

A bare asyncio protocol on uvloop with httptools parsing: no framework, responses built once
per model name and written with a single ``transport.write``. On one core it answers roughly
ten times what the gateway can, so the gateway's numbers are the gateway's.

It speaks just enough of OpenAI's API for the gateway's ``openai`` provider:

- ``POST /v1/chat/completions``: a JSON completion with usage; with ``"stream": true`` an SSE
  stream (role chunk, ``--chunks`` content chunks, a finish chunk, a usage chunk when
  ``stream_options.include_usage`` is set, ``[DONE]``), sent with chunked transfer encoding;
- ``GET /v1/models``: one model (the provider's health check calls it).

``--delay-ms`` waits before the answer (or the first chunk); ``--chunk-interval-ms`` paces the
chunks of a stream. A request may override both with the body fields ``bench_delay_ms`` and
``bench_chunk_interval_ms`` (the gateway forwards unknown fields untouched).

Run: ``python -m bench.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, cast

import httptools
import orjson
import uvloop

_JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n%s\r\n"
)
_CLOSE = b"connection: close\r\n"
_USAGE = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}


@dataclass(frozen=True, slots=True)
class Settings:
    delay_ms: float = 0.0
    chunks: int = 8
    chunk_interval_ms: float = 0.0


def _completion(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
            "system_fingerprint": "fp_bench",
        }
    )


def _event(payload: Any) -> bytes:
    """One SSE event framed as one HTTP chunk."""
    data = b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_events(model: str, chunks: int) -> tuple[list[bytes], bytes]:
    """The events of a stream (without usage) and the usage event."""

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        return _event(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
        )

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": f"tok{i} "}, None) for i in range(chunks)]
    events.append(chunk({}, "stop"))
    usage = _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [],
            "usage": _USAGE,
        }
    )
    return events, usage


_DONE = _event(b"[DONE]") + b"0\r\n\r\n"
_MODELS = orjson.dumps(
    {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "bench"}]}
)
_NOT_FOUND = orjson.dumps({"error": {"message": "no such route", "type": "invalid_request_error"}})
_BAD = orjson.dumps({"error": {"message": "body is not JSON", "type": "invalid_request_error"}})


class _Responses:
    """Prebuilt bodies per model name (bounded: model names come from the gateway config)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._json: dict[str, bytes] = {}
        self._stream: dict[str, tuple[list[bytes], bytes]] = {}

    def json(self, model: str) -> bytes:
        body = self._json.get(model)
        if body is None:
            body = self._json[model] = _completion(model) if len(self._json) < 64 else _completion("other")
        return body

    def stream(self, model: str) -> tuple[list[bytes], bytes]:
        events = self._stream.get(model)
        if events is None:
            events = _stream_events(model, self.settings.chunks)
            if len(self._stream) < 64:
                self._stream[model] = events
        return events


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection (requests are answered in order)."""

    def __init__(self, responses: _Responses) -> None:
        self.responses = responses
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.busy: asyncio.Task[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()
        self.transport = None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"POST" and path == b"/v1/chat/completions":
            self._chat(b"".join(self.body), keep_alive)
        elif method == b"GET" and path == b"/v1/models":
            self._reply(_MODELS, keep_alive)
        else:
            self._reply(_NOT_FOUND, keep_alive, status=b"404 Not Found")

    # -- answers
    def _reply(self, body: bytes, keep_alive: bool, status: bytes = b"200 OK") -> None:
        transport = self.transport
        if transport is None:
            return
        head = _JSON_HEAD % (len(body), b"" if keep_alive else _CLOSE)
        if status != b"200 OK":
            head = head.replace(b"200 OK", status, 1)
        transport.write(head + body)
        if not keep_alive:
            transport.close()

    def _chat(self, raw: bytes, keep_alive: bool) -> None:
        try:
            request = orjson.loads(raw)
            model = str(request.get("model") or "gpt-4o-mini")
        except (orjson.JSONDecodeError, AttributeError):
            self._reply(_BAD, keep_alive, status=b"400 Bad Request")
            return
        s = self.responses.settings
        delay = float(request.get("bench_delay_ms", s.delay_ms)) / 1000
        if request.get("stream"):
            options = request.get("stream_options") or {}
            interval = float(request.get("bench_chunk_interval_ms", s.chunk_interval_ms)) / 1000
            events, usage = self.responses.stream(model)
            if options.get("include_usage"):
                events = [*events, usage]
            if delay or interval:
                self.busy = asyncio.ensure_future(self._paced(events, delay, interval, keep_alive))
            elif self.transport is not None:
                self.transport.write(_SSE_HEAD % (b"" if keep_alive else _CLOSE) + b"".join(events) + _DONE)
                if not keep_alive:
                    self.transport.close()
        elif delay:
            self.busy = asyncio.ensure_future(self._later(self.responses.json(model), delay, keep_alive))
        else:
            self._reply(self.responses.json(model), keep_alive)

    async def _later(self, body: bytes, delay: float, keep_alive: bool) -> None:
        await asyncio.sleep(delay)
        self._reply(body, keep_alive)

    async def _paced(self, events: list[bytes], delay: float, interval: float, keep_alive: bool) -> None:
        if delay:
            await asyncio.sleep(delay)
        head = _SSE_HEAD % (b"" if keep_alive else _CLOSE)
        for i, event in enumerate(events):
            if self.transport is None:
                return
            self.transport.write(head + event if i == 0 else event)
            if interval:
                await asyncio.sleep(interval)
        if self.transport is not None:
            self.transport.write(_DONE)
            if not keep_alive:
                self.transport.close()


async def serve(host: str, port: int, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    responses = _Responses(settings)
    server = await loop.create_server(lambda: _Connection(responses), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per stream")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0, help="pause between chunks")
    args = parser.parse_args(argv)
    settings = Settings(args.delay_ms, args.chunks, args.chunk_interval_ms)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, settings))


if __name__ == "__main__":
    main()
