"""Structured logs: one JSON object per line (or readable console lines on a terminal).

:func:`configure_logging` runs once per process, before the app serves. Disabled levels cost
one no-op method call (``structlog.make_filtering_bound_logger``). JSON goes through orjson
straight to bytes. Standard-library loggers (uvicorn, ``tokyo_ia.*``, libraries) are routed
through the same processors, so every line on the stream has the same shape.

Every line passes :func:`redact`: fields named like credentials (``api_key``,
``authorization``, ``*_token``, ``password``, ``secret``...) are masked, fields that would
carry prompt or completion text (``messages``, ``prompt``, ``content``...) are replaced, and
strings that contain an ``sk-...`` key or a ``Bearer ...`` credential are scrubbed. The
access log (:func:`access_log`) only takes metadata in the first place.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, BinaryIO, Literal, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"
Format = Literal["auto", "json", "console"]

_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10}
_SECRET_SUFFIXES = (
    "api_key", "apikey", "authorization", "auth", "secret", "password", "passwd", "token",
    "cookie", "credential", "credentials", "master_key", "private_key", "signature",
)  # fmt: skip
_TEXT_FIELDS = frozenset(
    {"prompt", "prompts", "messages", "message_content", "content", "input", "body", "completion", "choices"}
)
_MAX_DECISIONS = 1024
_decisions: dict[str, bool] = {}  # field name → must redact (memo; names come from code)
# 20+ characters: a whole key, not the shown prefix "sk-tia-AbCd…wxYz" that identifies one.
_INLINE_SECRET = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}|(?i:\bbearer\s+)\S+")

_access: Any = structlog.get_logger("tokyo_ia.access")  # rebound by configure_logging
_access_json: _AccessSink | None = None  # JSON at info or below: access lines skip structlog
_bound = False  # bind_request was used: access lines merge the bound fields too


def _must_redact(name: str) -> bool:
    decided = _decisions.get(name)
    if decided is not None:
        return decided
    key = name.lower().replace("-", "_")
    decided = key in _TEXT_FIELDS or any(key == s or key.endswith("_" + s) for s in _SECRET_SUFFIXES)
    if len(_decisions) < _MAX_DECISIONS:
        _decisions[name] = decided
    return decided


def _redact_mapping(fields: MutableMapping[str, Any]) -> None:
    decisions = _decisions
    for name, value in fields.items():
        masked = decisions.get(name)
        if masked is None:
            masked = _must_redact(name)
        if masked:
            fields[name] = REDACTED
        elif type(value) is str:
            fields[name] = _masked(value)
        elif type(value) is dict:
            copy = dict(value)  # never mutate the caller's object
            _redact_mapping(copy)
            fields[name] = copy


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask credentials and prompt text (one nested dict level deep too)."""
    _redact_mapping(event_dict)
    return event_dict


class _Timestamp:
    """ISO-8601 UTC timestamps, formatting the date and time only once per second.

    structlog's ``TimeStamper(fmt="iso")`` builds a datetime per line; this costs a fraction.
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = self.now()
        return event_dict

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"


_timestamp = _Timestamp()


class _AccessSink:
    """Access lines, buffered while the event loop runs: a busy gateway writes them in blocks
    (at 16 KiB, or 0.2 s after the first waiting line) instead of one write and flush per
    request. Outside a running loop every line is written at once. :func:`flush_access_log`
    writes what waits (the gateway calls it on shutdown, and at exit)."""

    __slots__ = ("parts", "size", "stream", "timer")

    FLUSH_BYTES = 16384
    FLUSH_AFTER_S = 0.2

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.parts: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None

    def write(self, line: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._emit(line)
            return
        self.parts.append(line)
        self.size += len(line)
        if self.size >= self.FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.parts:
            data = b"".join(self.parts)
            self.parts.clear()
            self.size = 0
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # logging must never take the request down
            pass


def flush_access_log() -> None:
    """Write the access lines still buffered (see :class:`_AccessSink`)."""
    if _access_json is not None:
        _access_json.flush()


def _orjson_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _orjson_bytes(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=str)


class _BytesHandler(logging.Handler):
    """A stdlib handler writing formatted lines to the same binary stream as structlog."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace") + b"\n"
            self.stream.write(line)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the request down
            self.handleError(record)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of: {', '.join(_LEVELS)}") from None


def _choose_format(fmt: Format, stream: BinaryIO | None) -> Literal["json", "console"]:
    if fmt != "auto":
        return fmt
    if stream is None and sys.stderr.isatty():
        return "console"
    return "json"


def configure_logging(
    level: str | int = "info", fmt: Format = "auto", stream: BinaryIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger for this process.

    ``stream`` is a binary stream (default: stderr). ``fmt="auto"`` picks console lines when
    stderr is a terminal, JSON otherwise. Call again to reconfigure (tests do); uvicorn must be
    started with ``log_config=None`` so it does not install handlers of its own.
    """
    levelno = _level(level)
    chosen = _choose_format(fmt, stream)
    out: BinaryIO = stream if stream is not None else sys.stderr.buffer
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        redact,
    ]
    if chosen == "json":
        shared.append(structlog.processors.format_exc_info)
        final: Processor = structlog.processors.JSONRenderer(serializer=_orjson_bytes)
        stdlib_final: Processor = structlog.processors.JSONRenderer(serializer=_orjson_str)
        factory: Any = structlog.BytesLoggerFactory(file=out)
    else:
        colors = stream is None and sys.stderr.isatty()
        final = stdlib_final = structlog.dev.ConsoleRenderer(colors=colors)
        factory = structlog.PrintLoggerFactory(
            file=sys.stderr if stream is None else cast(TextIO, _TextOver(out))
        )
    structlog.configure(
        processors=[*shared, final],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib(out, levelno, shared, stdlib_final)
    global _access, _access_json
    _access = structlog.get_logger().bind(logger="tokyo_ia.access")
    flush_access_log()
    _access_json = _AccessSink(out) if chosen == "json" and levelno <= logging.INFO else None


def _route_stdlib(out: BinaryIO, levelno: int, shared: list[Processor], final: Processor) -> None:
    """Send every stdlib record (uvicorn, libraries, ``tokyo_ia.*``) through the same chain."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, final],
    )
    handler = _BytesHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _BytesHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in ("uvicorn", "uvicorn.error", "tokyo_ia"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
        named.setLevel(logging.NOTSET)
    # The gateway writes its own access line (access_log below). uvicorn's must stay off even
    # where this runs after uvicorn configured logging (each worker process): uvicorn turns its
    # access log on whenever "uvicorn.access" has a handler, its ancestors' included, and then
    # writes a second line per request through the slow stdlib path.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False


class _TextOver:
    """Minimal text writer over a binary stream, for console output to a given stream."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        self.raw.flush()


def access_log(
    *,
    request_id: str,
    status: int,
    latency_ms: float,
    key_id: str | None = None,
    model: str | None = None,
    provider: str | None = None,
    tokens_in: int = 0,
    tokens_out: int = 0,
    cost_usd: float = 0.0,
    cache: str | None = None,
    attempts: int = 0,
    route: str | None = None,
    **extra: Any,
) -> None:
    """One line per finished request: metadata only, never the key or any text.

    ``key_id`` is the key's database id or prefix (``sk-tia-AbCd…wxYz``), not the key.
    ``extra`` (e.g. ``route``, ``method``, ``stream``) is added as-is after redaction.

    In JSON format this is the one line per request a gateway always writes, so it skips
    structlog's processor chain and builds the same line directly (same fields, same
    redaction), buffered by :class:`_AccessSink`.
    """
    sink = _access_json
    if sink is None:
        _access.info(
            "request",
            request_id=request_id,
            key_id=key_id,
            model=model,
            provider=provider,
            status=status,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost_usd,
            latency_ms=round(latency_ms, 3),
            cache=cache,
            attempts=attempts,
            **({} if route is None else {"route": route}),
            **extra,
        )
        return
    if extra:
        _redact_mapping(extra)
    # The named fields are never secret by name; a value that carries a key (a client can put
    # one in its request id, model name or path) is masked like the chain's redaction does.
    line: dict[str, Any] = {
        "logger": "tokyo_ia.access",
        "event": "request",
        "request_id": _masked(request_id),
        "key_id": key_id,
        "model": _masked(model),
        "provider": provider,
        "status": status,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost_usd": cost_usd,
        "latency_ms": round(latency_ms, 3),
        "cache": cache,
        "attempts": attempts,
    }
    if route is not None:
        line["route"] = _masked(route)
    if extra:
        line |= extra
    line["level"] = "info"
    line["timestamp"] = _timestamp.now()
    if _bound:
        bound = dict(structlog.contextvars.get_contextvars())
        _redact_mapping(bound)
        line = {**bound, **line}
    sink.write(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE))


def _masked(value: str | None) -> str | None:
    """``value`` with any inline credential masked. A whole key is 20+ characters: short strings
    (ids, model names) and strings without a key's marks skip the regex."""
    if value is not None and len(value) > 19 and ("sk-" in value or "earer " in value):
        return _INLINE_SECRET.sub(REDACTED, value)
    return value


def bind_request(fields: Mapping[str, Any]) -> None:
    """Attach fields (e.g. ``request_id``) to every log line of the current request/task."""
    global _bound
    _bound = True
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)


atexit.register(flush_access_log)
