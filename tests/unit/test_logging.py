"""Structured logging: one JSON line per event, the access-log fields, and redaction."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

from tokyo_ia.observability.logging import REDACTED, access_log, bind_request, configure_logging


@pytest.fixture
def out() -> Iterator[io.BytesIO]:
    stream = io.BytesIO()
    configure_logging("info", "json", stream=stream)
    yield stream
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_BytesHandler":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_access_log_is_one_json_line_with_the_contract_fields(out: io.BytesIO) -> None:
    access_log(
        request_id="req-1", key_id="sk-tia-AbCd…wxYz", model="gpt-4o-mini", provider="openai",
        status=200, tokens_in=12, tokens_out=34, cost_usd=0.00012, latency_ms=12.34567,
        cache="miss", attempts=2, route="/v1/chat/completions",
    )  # fmt: skip
    [line] = lines(out)
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["logger"] == "tokyo_ia.access"
    assert "timestamp" in line
    expected = {
        "request_id": "req-1", "key_id": "sk-tia-AbCd…wxYz", "model": "gpt-4o-mini", "provider": "openai",
        "status": 200, "tokens_in": 12, "tokens_out": 34, "cost_usd": 0.00012, "latency_ms": 12.346,
        "cache": "miss", "attempts": 2, "route": "/v1/chat/completions",
    }  # fmt: skip
    assert expected.items() <= line.items()


def test_access_line_masks_keys_a_client_put_in_its_own_fields(out: io.BytesIO) -> None:
    secret = "sk-" + "k" * 40
    bind_request({"session_token": "abc", "tenant": "t1"})
    access_log(
        request_id=secret, model=f"Bearer {secret}", status=401, latency_ms=1.0,
        route=f"/v1/{secret}", api_key=secret, note="ok",
    )  # fmt: skip
    assert secret.encode() not in out.getvalue()
    [line] = lines(out)
    assert line["request_id"] == REDACTED and line["model"] == REDACTED
    assert line["route"] == f"/v1/{REDACTED}" and line["api_key"] == REDACTED
    assert (line["session_token"], line["tenant"], line["note"]) == (REDACTED, "t1", "ok")
    assert line["logger"] == "tokyo_ia.access" and line["status"] == 401


def test_credentials_and_prompt_text_never_reach_the_stream(out: io.BytesIO) -> None:
    secret = "sk-tia-" + "x" * 43
    log = structlog.get_logger("test")
    log.info(
        "debugging",
        api_key=secret, authorization=f"Bearer {secret}", x_api_key=secret, access_token="t0ps3cret",
        password="hunter2", client_secret="s3", messages=[{"role": "user", "content": "my diary"}],
        prompt="my diary", headers={"Authorization": "Bearer abc", "accept": "json"},
        note=f"client sent {secret} as Bearer zzz-token", max_tokens=5, tokens_in=7,
    )  # fmt: skip
    raw = out.getvalue()
    for leaked in (secret.encode(), b"t0ps3cret", b"hunter2", b"my diary", b"abc", b"zzz-token"):
        assert leaked not in raw
    [line] = lines(out)
    for field in ("api_key", "authorization", "x_api_key", "access_token", "password", "client_secret"):
        assert line[field] == REDACTED, field
    assert line["messages"] == REDACTED and line["prompt"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "accept": "json"}
    assert line["note"] == f"client sent {REDACTED} as {REDACTED}"
    assert line["max_tokens"] == 5 and line["tokens_in"] == 7  # token *counts* are not secrets


def test_redaction_does_not_mutate_the_callers_objects(out: io.BytesIO) -> None:
    headers = {"authorization": "Bearer abc"}
    structlog.get_logger().info("x", headers=headers)
    assert headers == {"authorization": "Bearer abc"}


def test_stdlib_loggers_share_the_format_and_the_redaction(out: io.BytesIO) -> None:
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("tokyo_ia.server").warning("refusing key %s", "sk-tia-" + "y" * 43)
    first, second = lines(out)
    assert first["event"] == "Started server process"
    assert first["logger"] == "uvicorn.error" and first["level"] == "info"
    assert second["event"] == f"refusing key {REDACTED}" and second["level"] == "warning"


def test_disabled_levels_are_dropped_and_exceptions_are_rendered(out: io.BytesIO) -> None:
    log = structlog.get_logger()
    log.debug("not shown")
    logging.getLogger("tokyo_ia").debug("not shown either")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    [line] = lines(out)
    assert line["event"] == "failed" and line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"]


def test_bound_request_fields_appear_on_every_line(out: io.BytesIO) -> None:
    bind_request({"request_id": "req-9"})
    structlog.get_logger().info("routing")
    logging.getLogger("tokyo_ia.pipeline").info("cache miss")
    assert [line["request_id"] for line in lines(out)] == ["req-9", "req-9"]


def test_console_format_and_bad_level() -> None:
    stream = io.BytesIO()
    try:
        configure_logging("debug", "console", stream=stream)
        structlog.get_logger().debug("hello", api_key="sk-tia-zzzzzzzzzzzz")
        text = stream.getvalue().decode()
        assert "hello" in text and "sk-tia-zzzz" not in text
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in list(root.handlers):
            if type(handler).__name__ == "_BytesHandler":
                root.removeHandler(handler)
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")
