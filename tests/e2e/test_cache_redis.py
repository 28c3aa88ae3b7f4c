"""Two gateway processes sharing one Redis: one cache, and coalescing across replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.test_cache import AUTH, cache_config, upstream_calls
from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, require_redis


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[OpenAIEmulator, GatewayProcess, GatewayProcess]]:
    url = require_redis()
    with OpenAIEmulator() as emu:
        config = cache_config(emu.url, backend="redis")
        config["redis"] = {"url": url}
        with GatewayProcess(config) as a, GatewayProcess(config) as b:
            yield emu, a, b


def _body(model: str, **extra: Any) -> dict[str, Any]:
    # a prompt no earlier run can have cached
    return {"model": model, "messages": [{"role": "user", "content": uuid.uuid4().hex}], **extra}


def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(
    pair: tuple[OpenAIEmulator, GatewayProcess, GatewayProcess],
) -> None:
    emu, a, b = pair
    body = _body("m")
    before = upstream_calls(emu)
    first = httpx.post(a.url + "/v1/chat/completions", headers=AUTH, json=body)
    second = httpx.post(b.url + "/v1/chat/completions", headers=AUTH, json=body)
    assert (first.headers["x-tokyo-ia-cache"], second.headers["x-tokyo-ia-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert upstream_calls(emu) == before + 1
    # Replica a adds its counters to the shared hash at most once a second, and at once when
    # its own stats are read: read them, so that the count b sees does not depend on timing.
    httpx.get(a.url + "/admin/cache", headers=AUTH).raise_for_status()
    stats = httpx.get(b.url + "/admin/cache", headers=AUTH).json()
    assert stats["backend"]["backend"] == "redis"
    assert stats["backend"]["cluster"]["stores"] >= 1  # counted by replica a, seen from b


def test_identical_requests_across_both_replicas_make_one_upstream_call(
    pair: tuple[OpenAIEmulator, GatewayProcess, GatewayProcess],
) -> None:
    emu, a, b = pair
    body = _body("slow")
    before = upstream_calls(emu)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(client.post(gw.url + "/v1/chat/completions", headers=AUTH, json=body) for gw in [a, b] * 5)
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 10
    assert upstream_calls(emu) == before + 1
    results = sorted(r.headers["x-tokyo-ia-cache"] for r in responses)
    assert results == ["coalesced"] * 9 + ["miss"]
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
