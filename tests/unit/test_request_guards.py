"""Header checks (server/headers.py) and the audited payload of log_payloads keys (security/payloads.py)."""

from __future__ import annotations

import orjson
import pytest

from tokyo_ia.errors import HeadersTooLargeError, InvalidRequestError
from tokyo_ia.security.payloads import Transcript, payload_detail
from tokyo_ia.server.headers import check_headers


def test_header_size_counts_names_values_and_line_overhead() -> None:
    headers = [(b"host", b"x" * 96)]  # 4 + 96 + 4 = 104 bytes on the wire
    check_headers(headers, 104)
    with pytest.raises(HeadersTooLargeError, match="larger than 103 bytes") as info:
        check_headers(headers, 103)
    assert info.value.status == 431
    assert "max_header_bytes" in info.value.message


@pytest.mark.parametrize(
    "name", [b"authorization", b"x-api-key", b"x-request-id", b"traceparent", b"cache-control"]
)
@pytest.mark.parametrize("value", [b"a\tb", b"a\x00b", b"a\rb", b"a\x7fb"])
def test_control_characters_in_a_read_header_are_refused_by_name(name: bytes, value: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_headers([(b"host", b"x"), (name, value)], 16384)
    assert info.value.param == name.decode()
    assert info.value.code == "invalid_header"


def test_headers_the_gateway_does_not_read_are_left_alone() -> None:
    check_headers([(b"user-agent", b"curl\t8"), (b"x-api-key", "clé".encode())], 16384)


def test_payload_detail_keeps_messages_and_answers_cut_to_size() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    response = {"choices": [{"message": {"role": "assistant", "content": "hello"}}], "usage": {}}
    detail = payload_detail(request, response, 1024)
    assert orjson.loads(detail["request"]) == request["messages"]
    assert orjson.loads(detail["response"]) == [{"role": "assistant", "content": "hello"}]
    assert detail["truncated"] is False
    long = payload_detail({"input": "é" * 1000}, None, 301)
    assert long["truncated"] is True
    assert "response" not in long
    assert len(long["request"].encode()) <= 301  # cut on a character boundary, never mid-UTF-8


def test_a_stream_transcript_joins_the_text_deltas() -> None:
    transcript = Transcript()
    for chunk in (
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"total_tokens": 3}},
    ):
        transcript.add(chunk)
    detail = payload_detail({"messages": []}, transcript.response(), 100)
    assert orjson.loads(detail["response"]) == [{"role": "assistant", "content": "Hello"}]
