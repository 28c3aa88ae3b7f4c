"""Cache keys and per-request cache control.

The key rule
============

A key is the SHA-256 of a canonical JSON document (orjson, ``OPT_SORT_KEYS``, so key order in
any object, however deep, never matters; list order always does) holding:

- a format version (bump :data:`KEY_VERSION` to invalidate every entry at once);
- the ``namespace`` given by the caller and, only when the caller's key is configured to
  isolate its cache, that key's id;
- the request body **minus** :data:`IGNORED_FIELDS`.

Everything else is part of the key: model, messages, every sampling and output parameter
(temperature, top_p, max_tokens, tools, tool_choice, response_format, seed, stop, n, ...),
and fields this gateway has never heard of. Providers add parameters every month; a field we
do not know might change the answer, so it must split the cache. A conservative key costs
some hit ratio; a lax one serves wrong answers.

:data:`IGNORED_FIELDS` are fields that provably do not change the answer's content:
``stream`` and ``stream_options`` (only the transport; a stream is cached as its assembled
completion), ``user`` and ``metadata`` (tracking labels), ``store`` (whether OpenAI keeps a
copy), ``service_tier`` (latency/price class of the same model), and ``cache`` (our own
control field, see below). Numbers are compared as JSON text, so ``1`` and ``1.0`` are
different keys: a missed hit, never a wrong one.

Per-request control
===================

:func:`cache_control` reads the body field ``cache: {"no-cache": true, "no-store": true,
"ttl": 60}`` and the headers ``cache-control: no-cache | no-store | max-age=N`` and
``x-tokyo-ia-cache-ttl: N``. ``no-cache`` = do not answer from the cache (the fresh answer is
still stored); ``no-store`` = do not store this answer. When several TTLs are given the
shortest wins. ``max-age=0`` means ``no-cache``, as browsers send it on reload. The ``cache``
field is ours, so :func:`strip_cache_field` removes it before a request goes upstream.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import InvalidRequestError

KEY_VERSION = 1

IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier", "cache"})
"""Body fields left out of the key because they cannot change the answer (see module doc)."""

_BODY_FLAGS = {"no-cache": "no_cache", "no_cache": "no_cache", "no-store": "no_store", "no_store": "no_store"}


def cache_key(body: Mapping[str, Any], *, namespace: str = "", key_id: str | None = None) -> str:
    """The cache key of a chat request (64 hex characters); see the module doc for the rule."""
    document = {
        "v": KEY_VERSION,
        "ns": namespace,
        "key": key_id,
        "body": {name: value for name, value in body.items() if name not in IGNORED_FIELDS},
    }
    try:
        canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # only reachable for bodies that did not come from JSON
        raise InvalidRequestError(f"request body cannot be cached: {exc}") from exc
    return hashlib.sha256(canonical).hexdigest()


def strip_cache_field(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` without our ``cache`` control field; the input is never changed."""
    return {name: value for name, value in body.items() if name != "cache"}


@dataclass(frozen=True, slots=True)
class CacheControl:
    """What one request asks of the cache. ``ttl_s`` None = the configured default."""

    no_cache: bool = False
    no_store: bool = False
    ttl_s: float | None = None

    def lifetime(self, default_s: float) -> float:
        return default_s if self.ttl_s is None else self.ttl_s


DEFAULT_CONTROL = CacheControl()

HeaderMap = Mapping[bytes, bytes] | Mapping[str, str]


def cache_control(body: Mapping[str, Any], headers: HeaderMap | None = None) -> CacheControl:
    """Parse the body ``cache`` field and the cache headers into one :class:`CacheControl`.

    Header names must be lower case (ASGI guarantees it). Invalid values raise
    :class:`~tokyo_ia.errors.InvalidRequestError` naming the field, so clients learn of a typo
    instead of silently getting cached answers.
    """
    no_cache = no_store = False
    ttls: list[float] = []
    field = body.get("cache")
    if field is not None:
        no_cache, no_store, ttl = _parse_body_field(field)
        if ttl is not None:
            ttls.append(ttl)
    if headers:
        value = _header(headers, "cache-control")
        if value is not None:
            nc, ns, ttl = _parse_cache_control(value)
            no_cache, no_store = no_cache or nc, no_store or ns
            if ttl is not None:
                ttls.append(ttl)
        value = _header(headers, "x-tokyo-ia-cache-ttl")
        if value is not None:
            ttls.append(_positive_seconds(value, "x-tokyo-ia-cache-ttl"))
    if not (no_cache or no_store or ttls):
        return DEFAULT_CONTROL
    return CacheControl(no_cache, no_store, min(ttls) if ttls else None)


def _parse_body_field(field: Any) -> tuple[bool, bool, float | None]:
    if not isinstance(field, dict):
        raise InvalidRequestError(
            '\'cache\' must be an object like {"no-cache": true, "no-store": true, "ttl": 60}', param="cache"
        )
    flags = {"no_cache": False, "no_store": False}
    ttl: float | None = None
    for name, value in field.items():
        if name == "ttl":
            ttl = _positive_seconds(value, "cache.ttl")
        elif name in _BODY_FLAGS:
            if not isinstance(value, bool):
                raise InvalidRequestError(f"'cache.{name}' must be true or false", param=f"cache.{name}")
            flags[_BODY_FLAGS[name]] |= value
        else:
            raise InvalidRequestError(
                f"unknown field 'cache.{name}'; allowed: 'no-cache', 'no-store', 'ttl'", param=f"cache.{name}"
            )
    return flags["no_cache"], flags["no_store"], ttl


def _parse_cache_control(value: str) -> tuple[bool, bool, float | None]:
    """Request ``cache-control`` directives; ones we do not act on are ignored, as HTTP says."""
    no_cache = no_store = False
    ttl: float | None = None
    for raw in value.split(","):
        directive = raw.strip().lower()
        if directive == "no-cache":
            no_cache = True
        elif directive == "no-store":
            no_store = True
        elif directive.startswith("max-age"):
            _, _, number = directive.partition("=")
            seconds = _seconds(number.strip().strip('"'), "cache-control")
            if seconds == 0:
                no_cache = True
            else:
                ttl = seconds
    return no_cache, no_store, ttl


def _seconds(value: Any, name: str) -> float:
    number: Any = value
    if isinstance(value, bool):
        number = None  # True is an int in Python, never a duration
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if not isinstance(number, int | float) or not math.isfinite(number) or number < 0:
        raise InvalidRequestError(
            f"'{name}' must be a number of seconds such as 60, got {value!r}", param=name
        )
    return float(number)


def _positive_seconds(value: Any, name: str) -> float:
    seconds = _seconds(value, name)
    if seconds <= 0:
        raise InvalidRequestError(
            f"'{name}' must be more than 0 seconds; use no-store to skip the cache", param=name
        )
    return seconds


def _header(headers: HeaderMap, name: str) -> str | None:
    value: Any = headers.get(name.encode())  # type: ignore[call-overload]
    if value is None:
        value = headers.get(name)  # type: ignore[call-overload]
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
