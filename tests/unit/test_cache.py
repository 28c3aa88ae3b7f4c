"""Cache keys, per-request control, the memory backend and stream assembly."""

from __future__ import annotations

import copy
import os
import random
from typing import Any

import pytest

from tests.support import FakeClock
from tokyo_ia.accounting.pricing import PriceTable
from tokyo_ia.cache import (
    COMPRESS_OVER,
    Cache,
    CacheControl,
    CachedEntry,
    Coalescer,
    MemoryCache,
    assemble_stream,
    build_cache,
    build_coalescer,
    cache_control,
    cache_key,
    decode_entry,
    encode_entry,
    strip_cache_field,
)
from tokyo_ia.cache.layer import ResponseCache
from tokyo_ia.config import CacheConfig
from tokyo_ia.errors import ConfigError, InvalidRequestError
from tokyo_ia.pipeline import RequestContext
from tokyo_ia.providers.base import completion_to_chunks

BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
}

# Each changes the answer, so each must give a key of its own.
VARIANTS: list[dict[str, Any]] = [
    {"model": "gpt-4o"},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]},
    {"temperature": 0},
    {"temperature": 0.7},
    {"top_p": 0.5},
    {"max_tokens": 10},
    {"max_completion_tokens": 10},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "none"},
    {"response_format": {"type": "json_object"}},
    {"seed": 1},
    {"seed": 2},
    {"stop": ["\n"]},
    {"n": 2},
    {"logit_bias": {"50256": -100}},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
    {"logprobs": True},
    {"top_logprobs": 2},
    {"reasoning_effort": "low"},
    {"parallel_tool_calls": False},
    {"some_future_parameter": 1},
]


def _entry(text: str = "Hello!", total: int = 7) -> CachedEntry:
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": total - 2, "completion_tokens": 2, "total_tokens": total},
    }
    entry = CachedEntry.of(response, provider="openai", model="gpt-4o-mini-2024-07-18")
    entry.created_at = 1_700_000_000.5  # fixed, so every entry of the same text has the same size
    return entry


# --- keys -------------------------------------------------------------------------------------


def test_different_parameters_never_share_a_key() -> None:
    keys = [cache_key(BASE)] + [cache_key({**BASE, **variant}) for variant in VARIANTS]
    assert len(set(keys)) == len(keys)


def test_reordered_object_keys_share_a_key() -> None:
    body = {
        **BASE,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}],
    }
    shuffled = {
        "tools": [{"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}],
        "messages": [{"content": "Be brief.", "role": "system"}, {"content": "Hi", "role": "user"}],
        "model": "gpt-4o-mini",
    }
    assert cache_key(body) == cache_key(shuffled)


def test_transport_and_tracking_fields_do_not_change_the_key() -> None:
    key = cache_key(BASE)
    same = {
        **BASE,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "metadata": {"app": "x"},
        "store": True,
        "service_tier": "default",
        "cache": {"ttl": 5},
    }
    assert cache_key(same) == key


def test_namespace_and_isolated_key_split_the_cache() -> None:
    keys = {
        cache_key(BASE),
        cache_key(BASE, namespace="team-a"),
        cache_key(BASE, key_id="k1"),
        cache_key(BASE, key_id="k2"),
    }
    assert len(keys) == 4
    assert cache_key(BASE, key_id="k1") == cache_key(copy.deepcopy(BASE), key_id="k1")


def test_strip_cache_field_returns_a_new_dict() -> None:
    body = {**BASE, "cache": {"no-store": True}}
    stripped = strip_cache_field(body)
    assert "cache" not in stripped
    assert "cache" in body
    assert stripped is not body
    assert strip_cache_field(BASE) is not BASE


# --- per-request control -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_field", "headers", "expected"),
    [
        (None, None, CacheControl()),
        ({"no-cache": True}, None, CacheControl(no_cache=True)),
        ({"no_store": True, "ttl": 60}, None, CacheControl(no_store=True, ttl_s=60.0)),
        ({"no-cache": False}, None, CacheControl()),
        (None, {b"cache-control": b"no-cache"}, CacheControl(no_cache=True)),
        (None, {b"cache-control": b"No-Store, no-transform"}, CacheControl(no_store=True)),
        (None, {b"cache-control": b"max-age=30"}, CacheControl(ttl_s=30.0)),
        (None, {b"cache-control": b"max-age=0"}, CacheControl(no_cache=True)),
        (None, {"x-tokyo-ia-cache-ttl": "12.5"}, CacheControl(ttl_s=12.5)),
        (
            {"ttl": 60},
            {b"x-tokyo-ia-cache-ttl": b"10", b"cache-control": b"max-age=20"},
            CacheControl(ttl_s=10.0),
        ),
    ],
)
def test_cache_control(body_field: Any, headers: Any, expected: CacheControl) -> None:
    body = BASE if body_field is None else {**BASE, "cache": body_field}
    assert cache_control(body, headers) == expected


@pytest.mark.parametrize(
    ("body_field", "headers", "param"),
    [
        ("yes", None, "cache"),
        ({"ttl": "soon"}, None, "cache.ttl"),
        ({"ttl": -1}, None, "cache.ttl"),
        ({"ttl": 0}, None, "cache.ttl"),
        ({"ttl": True}, None, "cache.ttl"),
        ({"ttl": float("inf")}, None, "cache.ttl"),
        ({"no-cache": "true"}, None, "cache.no-cache"),
        ({"nocache": True}, None, "cache.nocache"),
        (None, {b"cache-control": b"max-age=abc"}, "cache-control"),
        (None, {b"cache-control": b"max-age=-5"}, "cache-control"),
        (None, {b"x-tokyo-ia-cache-ttl": b"0"}, "x-tokyo-ia-cache-ttl"),
        (None, {"x-tokyo-ia-cache-ttl": "NaN"}, "x-tokyo-ia-cache-ttl"),
    ],
)
def test_invalid_cache_control_names_the_field(body_field: Any, headers: Any, param: str) -> None:
    body = BASE if body_field is None else {**BASE, "cache": body_field}
    with pytest.raises(InvalidRequestError) as info:
        cache_control(body, headers)
    assert info.value.param == param
    assert param in info.value.message


def test_lifetime_defaults_to_the_configured_ttl() -> None:
    assert CacheControl().lifetime(3600) == 3600
    assert CacheControl(ttl_s=5).lifetime(3600) == 5


# --- encoding ----------------------------------------------------------------------------------


def test_small_entries_stay_plain_and_large_ones_are_compressed() -> None:
    small = _entry()
    assert encode_entry(small)[:1] == b"{"
    large = _entry("lorem ipsum dolor " * 1000)
    data = encode_entry(large)
    assert data[:1] == b"z"
    assert len(data) < COMPRESS_OVER
    assert decode_entry(data) == large
    assert decode_entry(encode_entry(small)) == small


def test_incompressible_entries_are_stored_plain() -> None:
    noise = _entry(os.urandom(6000).hex())
    data = encode_entry(noise)
    assert decode_entry(data) == noise


@pytest.mark.parametrize("data", [b"z-not-zlib", b"[1, 2]", b'{"r": 1}'])
def test_decoding_foreign_bytes_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="corrupt"):
        decode_entry(data)


# --- memory backend ------------------------------------------------------------------------


async def test_memory_roundtrip_and_stats() -> None:
    cache = MemoryCache(1 << 20)
    assert isinstance(cache, Cache)
    assert await cache.get("k") is None
    entry = _entry(total=7)
    await cache.set("k", entry, ttl_s=60)
    hit = await cache.get("k")
    assert hit == entry
    assert hit is not None
    assert (hit.provider, hit.model, hit.usage) == ("openai", "gpt-4o-mini-2024-07-18", hit.response["usage"])
    await cache.get("k")
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.stores, stats.entries, stats.tokens_saved) == (2, 1, 1, 1, 14)
    assert stats.hit_ratio == pytest.approx(2 / 3)
    assert stats.bytes == len(encode_entry(entry)) + 1
    assert stats.to_dict()["hit_ratio"] == pytest.approx(2 / 3, abs=1e-6)


async def test_memory_hits_are_copies() -> None:
    cache = MemoryCache(1 << 20)
    await cache.set("k", _entry(), ttl_s=60)
    first = await cache.get("k")
    assert first is not None
    first.response["choices"].clear()
    second = await cache.get("k")
    assert second is not None
    assert second.response["choices"]


async def test_memory_ttl_expiry_with_an_injected_clock() -> None:
    clock = FakeClock(100.0)
    cache = MemoryCache(1 << 20, clock=clock)
    await cache.set("short", _entry(), ttl_s=5)
    await cache.set("long", _entry(), ttl_s=50)
    clock.now += 4.9
    assert await cache.get("short") is not None
    clock.now += 0.2
    assert await cache.get("short") is None
    assert await cache.get("long") is not None
    clock.now += 100
    assert cache.purge_expired() == 1
    stats = await cache.stats()
    assert (stats.expirations, stats.entries, stats.bytes) == (2, 0, 0)
    await cache.set("zero", _entry(), ttl_s=0)
    assert len(cache) == 0


async def test_memory_lru_evicts_the_least_recently_used() -> None:
    size = len(encode_entry(_entry())) + 1
    cache = MemoryCache(size * 3)
    for key in "abc":
        await cache.set(key, _entry(), ttl_s=60)
    await cache.get("a")  # b is now the coldest
    await cache.set("d", _entry(), ttl_s=60)
    assert await cache.get("b") is None
    assert all([await cache.get(k) for k in "acd"])
    assert (await cache.stats()).evictions == 1


async def test_memory_expired_entries_leave_first_and_count_as_expirations() -> None:
    clock = FakeClock(100.0)
    size = len(encode_entry(_entry())) + 1
    cache = MemoryCache(size * 2, clock=clock)
    await cache.set("a", _entry(), ttl_s=1)
    await cache.set("b", _entry(), ttl_s=60)
    clock.now += 2
    await cache.set("c", _entry(), ttl_s=60)
    stats = await cache.stats()
    assert (stats.evictions, stats.expirations, stats.entries) == (0, 1, 2)


async def test_memory_byte_bound_holds_under_load() -> None:
    rng = random.Random(7)
    bound = 64 * 1024
    cache = MemoryCache(bound)
    for i in range(5000):
        await cache.set(f"key-{i}", _entry("x" * rng.randrange(0, 3000) + str(i)), ttl_s=60)
        if i % 3 == 0:
            await cache.get(f"key-{rng.randrange(0, i + 1)}")
        assert cache.snapshot().bytes <= bound
    stats = await cache.stats()
    assert stats.entries == len(cache) > 10
    assert stats.stores == 5000
    assert stats.evictions == 5000 - stats.entries
    assert await cache.get("key-4999") is not None


async def test_memory_replacing_a_key_and_oversized_entries() -> None:
    cache = MemoryCache(2048, compress_over=1 << 30)
    await cache.set("k", _entry("one"), ttl_s=60)
    await cache.set("k", _entry("two"), ttl_s=60)
    hit = await cache.get("k")
    assert hit is not None
    assert hit.response["choices"][0]["message"]["content"] == "two"
    assert len(cache) == 1
    await cache.set("big", _entry("y" * 5000), ttl_s=60)
    assert await cache.get("big") is None
    await cache.delete("k")
    await cache.delete("missing")
    assert len(cache) == 0
    assert cache.snapshot().bytes == 0
    await cache.close()


# --- build -----------------------------------------------------------------------------------


async def test_build_cache_and_coalescer() -> None:
    assert build_cache(None, None) is None
    config = CacheConfig(max_bytes=1234)
    cache = build_cache(config, None)
    assert isinstance(cache, MemoryCache)
    assert cache.max_bytes == 1234
    assert isinstance(build_coalescer(config, cache), Coalescer)
    assert build_coalescer(CacheConfig(coalesce=False), cache) is None
    with pytest.raises(ConfigError, match=r"redis\.url"):
        build_cache(CacheConfig(backend="redis"), None)


# --- stream assembly -----------------------------------------------------------------------


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        **extra,
    }
    if delta is not None or finish is not None:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return chunk


def test_assemble_text_stream() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks = [
        _chunk({"role": "assistant", "content": ""}, system_fingerprint="fp"),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({}, "stop"),
        {**_chunk(), "choices": [], "usage": usage},
    ]
    assert assemble_stream(chunks) == {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "system_fingerprint": "fp",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def test_assemble_tool_call_fragments_by_index() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return _chunk({"tool_calls": [{"index": index, **fields}]})

    chunks = [
        _chunk({"role": "assistant", "content": None}),
        call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
        call(0, function={"arguments": '{"city": '}),
        call(1, id="call_b", type="function", function={"name": "get_time", "arguments": "{}"}),
        call(0, function={"arguments": '"Paris"}'}),
        _chunk({}, "tool_calls"),
    ]
    message = assemble_stream(chunks)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }
    assert assemble_stream(chunks)["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" not in assemble_stream(chunks)


def test_assemble_several_choices_refusal_and_logprobs() -> None:
    token = {"token": "a", "logprob": -0.1, "top_logprobs": []}
    chunks = [
        {**_chunk(), "choices": [{"index": 1, "delta": {"content": "B"}, "finish_reason": None}]},
        {**_chunk(), "choices": [{"index": 0, "delta": {"refusal": "No"}, "logprobs": {"content": [token]}}]},
        {**_chunk(), "choices": [{"index": 0, "delta": {"refusal": "pe"}, "logprobs": {"content": [token]}}]},
        {**_chunk(), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**_chunk(), "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
    ]
    response = assemble_stream(chunks)
    first, second = response["choices"]
    assert first["message"] == {"role": "assistant", "content": None, "refusal": "Nope"}
    assert first["logprobs"] == {"content": [token, token]}
    assert (second["index"], second["message"]["content"], second["finish_reason"]) == (1, "B", "length")


def test_assemble_inverts_completion_to_chunks() -> None:
    response = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 9,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    assert assemble_stream(completion_to_chunks(response)) == response


# --- dollars saved ---------------------------------------------------------------------------


async def test_dollars_saved_are_priced_per_stored_entry_and_follow_a_replaced_one() -> None:
    """Each hit adds what its entry cost when it was made; the price is worked out once per
    stored entry, and an entry stored again under the same key (new usage) is priced anew."""
    prices = PriceTable.load()
    cache = ResponseCache(MemoryCache(max_bytes=1 << 20), None, ttl_s=60, prices=prices)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    first = _entry("Hello!", total=7)
    ctx = RequestContext("r-0", None)
    await cache.backend.set(cache.key(ctx, body), first, 60)

    async def never() -> dict[str, Any]:
        raise AssertionError("a hit must not call upstream")

    for i in range(3):
        await cache.complete(RequestContext(f"r-{i}", None), body, [], never)
    one = float(prices.cost(first.model, first.usage))
    assert one > 0 and cache.hits == 3
    assert cache.usd_saved == pytest.approx(3 * one)

    second = _entry("A much longer answer this time.", total=4000)
    second.created_at = first.created_at + 1  # stored again: another answer, other usage
    await cache.backend.set(cache.key(ctx, body), second, 60)
    await cache.complete(RequestContext("r-3", None), body, [], never)
    assert cache.usd_saved == pytest.approx(3 * one + float(prices.cost(second.model, second.usage)))
