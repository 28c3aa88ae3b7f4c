"""Streams: a client that leaves cancels the upstream; an upstream that drops ends the stream."""

from __future__ import annotations

import http.client
import json
import time

import openai
import pytest

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, sdk_client

USER = [{"role": "user", "content": "hello"}]


def test_client_disconnect_cancels_the_upstream_stream(
    emu_gateway: GatewayProcess, openai_emu: OpenAIEmulator
) -> None:
    cancelled_before = openai_emu.state.streams_cancelled
    conn = http.client.HTTPConnection("127.0.0.1", emu_gateway.port, timeout=10)
    body = json.dumps({"model": "trickle", "messages": USER, "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the stream is flowing
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 10
    while openai_emu.state.streams_cancelled == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert openai_emu.state.streams_cancelled == cancelled_before + 1


def test_upstream_drop_ends_the_stream_with_an_error_event(emu_gateway: GatewayProcess) -> None:
    c = sdk_client(emu_gateway.url)
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in c.chat.completions.create(model="drop", messages=USER, stream=True):  # type: ignore[arg-type]
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received == ["partial "]
    assert "drop" in str(info.value) or "connection" in str(info.value).lower()
