"""What every cache backend stores and reports, and how a streamed answer becomes cacheable.

An entry is always a *complete* ``chat.completion``: a streamed answer is cached as the
completion its chunks add up to (:func:`assemble_stream`) and replayed as chunks on a hit
(``providers.base.completion_to_chunks``). One stored shape serves both kinds of request, and
the cache key ignores ``stream`` (see :mod:`.keys`).

Entries are serialized once, on store (:func:`encode_entry`): orjson, zlib-compressed above a
threshold. Backends keep bytes, not objects, so a caller that edits the dict it got from a hit
can never corrupt the cache, and byte bounds are measured, not estimated.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson

JSON = dict[str, Any]

COMPRESS_OVER = 4096
"""Serialized entries larger than this many bytes are zlib-compressed (chat JSON shrinks ~3-5x)."""

_ZLIB_MARK = b"z"  # raw entries are JSON objects and so always start with b"{"


@dataclass(slots=True)
class CachedEntry:
    """A complete chat.completion plus what the gateway needs to report a hit.

    ``provider`` and ``model`` name the deployment that produced the answer (for the
    ``x-tokyo-ia-provider``/``-model`` headers of a hit); ``usage`` is what the answer cost
    the first time, i.e. what each hit saves.
    """

    response: JSON
    provider: str = ""
    model: str = ""
    usage: JSON | None = None
    created_at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, response: JSON, *, provider: str = "", model: str = "") -> CachedEntry:
        """An entry for ``response`` whose usage is read from the response itself."""
        usage = response.get("usage")
        return cls(response, provider, model, usage if isinstance(usage, dict) else None)

    @property
    def total_tokens(self) -> int:
        value = (self.usage or {}).get("total_tokens")
        return value if isinstance(value, int) else 0


@dataclass(slots=True)
class CacheStats:
    """Counters for ``GET /admin/cache`` and metrics.

    ``entries``/``bytes``/``evictions``/``expirations`` describe this process's memory cache
    (Redis manages its own memory). ``cluster`` holds the counters every replica shares
    (Redis backend only).
    """

    backend: str
    hits: int = 0
    misses: int = 0
    stores: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    expirations: int = 0
    tokens_saved: int = 0
    errors: int = 0
    cluster: CacheStats | None = None

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> JSON:
        data = asdict(self)
        data["hit_ratio"] = round(self.hit_ratio, 6)
        if self.cluster is not None:
            data["cluster"] = self.cluster.to_dict()
        return data


@runtime_checkable
class Cache(Protocol):
    """A response cache. Every method is safe to call on the hot path: backends never raise
    for their own failures (a broken Redis is a miss, a failed store is skipped)."""

    async def get(self, key: str) -> CachedEntry | None: ...

    async def set(self, key: str, entry: CachedEntry, ttl_s: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def stats(self) -> CacheStats: ...

    async def close(self) -> None: ...


def encode_entry(entry: CachedEntry, compress_over: int = COMPRESS_OVER) -> bytes:
    """The bytes a backend stores: orjson, zlib-compressed when larger than ``compress_over``."""
    raw = orjson.dumps(
        {
            "r": entry.response,
            "p": entry.provider,
            "m": entry.model,
            "u": entry.usage,
            "t": entry.created_at,
        }
    )
    if len(raw) > compress_over:
        packed = _ZLIB_MARK + zlib.compress(raw, 6)
        if len(packed) < len(raw):
            return packed
    return raw


def decode_entry(data: bytes) -> CachedEntry:
    """Inverse of :func:`encode_entry`; raises ``ValueError`` on bytes it did not write."""
    if data[:1] == _ZLIB_MARK:
        try:
            data = zlib.decompress(data[1:])
        except zlib.error as exc:
            raise ValueError(f"corrupt cache entry: {exc}") from exc
    obj = orjson.loads(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("r"), dict):
        raise ValueError("corrupt cache entry: not an encoded CachedEntry")
    return CachedEntry(obj["r"], obj.get("p") or "", obj.get("m") or "", obj.get("u"), obj.get("t") or 0.0)


def assemble_stream(chunks: Iterable[JSON]) -> JSON:
    """The chat.completion a sequence of ``chat.completion.chunk`` objects adds up to.

    String fields of a delta (``content``, ``refusal``, ``reasoning_content``...) are joined,
    tool calls are merged by their ``index`` (argument fragments joined in order), the last
    non-null ``finish_reason`` wins, ``logprobs.content`` lists are concatenated, and the last
    non-null ``usage`` is kept. Unknown non-string delta fields keep their last value, so new
    provider fields survive a cache round trip.
    """
    head: JSON = {}
    choices: dict[int, JSON] = {}
    usage: JSON | None = None
    for chunk in chunks:
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(name) is not None and name not in head:
                head[name] = chunk[name]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            _merge_choice(choices.setdefault(choice.get("index", 0), _new_choice()), choice)
    response: JSON = {
        "id": head.get("id", ""),
        "object": "chat.completion",
        "created": head.get("created", int(time.time())),
        "model": head.get("model", ""),
        "choices": [_finish_choice(index, state) for index, state in sorted(choices.items())],
    }
    for name in ("system_fingerprint", "service_tier"):
        if name in head:
            response[name] = head[name]
    if usage is not None:
        response["usage"] = usage
    return response


def _new_choice() -> JSON:
    return {
        "message": {"role": "assistant"},
        "parts": {},
        "tools": {},
        "finish_reason": None,
        "logprobs": None,
    }


def _merge_choice(state: JSON, choice: JSON) -> None:
    delta = choice.get("delta") or {}
    for name, value in delta.items():
        if name == "tool_calls":
            for call in value or []:
                _merge_tool_call(state["tools"], call)
        elif name == "role":
            if value:
                state["message"]["role"] = value
        elif isinstance(value, str):
            state["parts"].setdefault(name, []).append(value)
        elif value is not None:
            state["message"][name] = value
    if choice.get("finish_reason") is not None:
        state["finish_reason"] = choice["finish_reason"]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        merged = state["logprobs"] or {}
        for name, items in logprobs.items():
            if isinstance(items, list):
                merged.setdefault(name, []).extend(items)
        state["logprobs"] = merged


def _merge_tool_call(tools: dict[int, JSON], call: JSON) -> None:
    slot = tools.setdefault(call.get("index", len(tools)), {"function": {"name": "", "arguments": ""}})
    if call.get("id"):
        slot["id"] = call["id"]
    if call.get("type"):
        slot["type"] = call["type"]
    function = call.get("function") or {}
    slot["function"]["name"] += function.get("name") or ""
    slot["function"]["arguments"] += function.get("arguments") or ""


def _finish_choice(index: int, state: JSON) -> JSON:
    message: JSON = dict(state["message"])
    pieces = state["parts"].pop("content", None)
    text = "".join(pieces or [])
    # OpenAI sends ``"content": ""`` ahead of tool calls; the completion then says null.
    message["content"] = text if text or (pieces is not None and not state["tools"]) else None
    for name, pieces in state["parts"].items():
        message[name] = "".join(pieces)
    if state["tools"]:
        message["tool_calls"] = [
            {"id": call.get("id", ""), "type": call.get("type", "function"), "function": call["function"]}
            for _, call in sorted(state["tools"].items())
        ]
    choice: JSON = {"index": index, "message": message, "finish_reason": state["finish_reason"]}
    choice["logprobs"] = state["logprobs"]
    return choice
