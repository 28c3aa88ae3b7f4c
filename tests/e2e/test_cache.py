"""The response cache and request coalescing through a running gateway.

Every test counts what actually reached the upstream emulator: a cache that "hits" but still
calls upstream, or coalesces by serving a different request's answer, fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider, sdk_client

MASTER = "master-cache-test"
AUTH = {"authorization": f"Bearer {MASTER}"}


def cache_config(emu_url: str, **cache: Any) -> dict[str, Any]:
    return {
        "auth": {"master_key": MASTER},
        "providers": {"emu": openai_provider(emu_url)},
        "models": {
            "m": [{"provider": "emu", "model": "gpt-4o-mini"}],
            "slow": [{"provider": "emu", "model": "slow-400"}],
        },
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        "resilience": {"health": {"active": False}},
        "cache": {"backend": "memory", "ttl_s": 60, **cache},
    }


@pytest.fixture(scope="module")
def emu() -> Iterator[OpenAIEmulator]:
    with OpenAIEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def gateway(emu: OpenAIEmulator) -> Iterator[GatewayProcess]:
    with GatewayProcess(cache_config(emu.url)) as gw:
        yield gw


def upstream_calls(emu: OpenAIEmulator) -> int:
    return sum(1 for r in emu.requests if r.path == "/v1/chat/completions")


def ask(
    gw: GatewayProcess, content: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **extra}
    r = httpx.post(gw.url + "/v1/chat/completions", headers={**AUTH, **(headers or {})}, json=body)
    assert r.status_code == 200, r.text
    return r


def test_second_identical_request_is_a_hit_without_an_upstream_call(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    before = upstream_calls(emu)
    first = ask(gateway, "cache me")
    second = ask(gateway, "cache me")
    assert upstream_calls(emu) == before + 1
    assert first.headers["x-tokyo-ia-cache"] == "miss"
    assert second.headers["x-tokyo-ia-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert float(first.headers["x-tokyo-ia-cost-usd"]) > 0
    assert float(second.headers["x-tokyo-ia-cost-usd"]) == 0  # a hit costs nothing
    assert second.headers["x-tokyo-ia-provider"] == "emu"  # who made the answer
    time.sleep(0.4)  # access lines are written in blocks, at most 0.2 s after the request
    line = next(x for x in gateway.log.splitlines() if second.headers["x-request-id"] in x)
    assert '"cache":"hit"' in line.replace(" ", "")  # the access log says so too


def test_parameters_that_change_the_answer_never_share_an_entry(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    ask(gateway, "params")
    before = upstream_calls(emu)
    variants: list[dict[str, Any]] = [
        {"temperature": 0.5},
        {"temperature": 0.7},
        {"max_tokens": 5},
        {"seed": 1},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"response_format": {"type": "json_object"}},
        {"some_new_provider_field": True},
    ]
    for extra in variants:
        assert ask(gateway, "params", **extra).headers["x-tokyo-ia-cache"] == "miss", extra
    assert upstream_calls(emu) == before + len(variants)
    # fields that cannot change the answer do share it
    assert ask(gateway, "params", user="someone", metadata={"a": "b"}).headers["x-tokyo-ia-cache"] == "hit"


def test_no_store_no_cache_and_ttl_are_honoured(gateway: GatewayProcess, emu: OpenAIEmulator) -> None:
    assert ask(gateway, "nostore", cache={"no-store": True}).headers["x-tokyo-ia-cache"] == "miss"
    assert ask(gateway, "nostore").headers["x-tokyo-ia-cache"] == "miss"  # nothing was stored
    assert ask(gateway, "nostore").headers["x-tokyo-ia-cache"] == "hit"
    before = upstream_calls(emu)
    fresh = ask(gateway, "nostore", headers={"cache-control": "no-cache"})
    assert fresh.headers["x-tokyo-ia-cache"] == "miss" and upstream_calls(emu) == before + 1
    assert ask(gateway, "nostore", headers={"cache-control": "no-store"}).headers["x-tokyo-ia-cache"] == "hit"

    assert ask(gateway, "short ttl", cache={"ttl": 0.3}).headers["x-tokyo-ia-cache"] == "miss"
    assert ask(gateway, "short ttl").headers["x-tokyo-ia-cache"] == "hit"
    time.sleep(0.5)
    assert ask(gateway, "short ttl").headers["x-tokyo-ia-cache"] == "miss"  # expired


def test_the_cache_field_is_validated_and_never_sent_upstream(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=AUTH,
        json={"model": "m", "messages": [{"role": "user", "content": "x"}], "cache": {"ttl": "soon"}},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "cache.ttl"
    ask(gateway, "field", cache={"ttl": 30})
    sent = [r.body for r in emu.requests if r.path == "/v1/chat/completions"]
    assert sent and all("cache" not in body for body in sent)


def test_streams_replay_from_the_cache_in_both_directions(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    client = sdk_client(gateway.url, MASTER)
    messages: Any = [{"role": "user", "content": "stream me"}]
    before = upstream_calls(emu)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="m", messages=messages, stream=True)
        if c.choices
    )
    # the streamed answer, assembled, now serves a plain request ...
    plain = client.chat.completions.with_raw_response.create(model="m", messages=messages)
    assert plain.headers["x-tokyo-ia-cache"] == "hit"
    assert plain.parse().choices[0].message.content == streamed
    # ... and is replayed as a stream, with usage when asked for
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-tokyo-ia-cache"] == "hit"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert upstream_calls(emu) == before + 1


async def _concurrent(gw: GatewayProcess, n: int, body: dict[str, Any], url: str | None = None) -> list[Any]:
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> tuple[str, str]:
            target = url or gw.url
            if body.get("stream"):
                async with client.stream(
                    "POST", target + "/v1/chat/completions", headers=AUTH, json=body
                ) as r:
                    text = (await r.aread()).decode()
                    assert r.status_code == 200, text
                    return r.headers["x-tokyo-ia-cache"], text
            r = await client.post(target + "/v1/chat/completions", headers=AUTH, json=body)
            assert r.status_code == 200, r.text
            return r.headers["x-tokyo-ia-cache"], r.json()["choices"][0]["message"]["content"]

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_identical_concurrent_requests_share_one_upstream_call(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    before = upstream_calls(emu)
    body = {"model": "slow", "messages": [{"role": "user", "content": "coalesce me"}]}
    results = asyncio.run(_concurrent(gateway, 8, body))
    assert upstream_calls(emu) == before + 1
    statuses = sorted(s for s, _ in results)
    assert statuses == ["coalesced"] * 7 + ["miss"]
    assert len({answer for _, answer in results}) == 1


def test_identical_concurrent_streams_share_one_upstream_stream(
    gateway: GatewayProcess, emu: OpenAIEmulator
) -> None:
    before = upstream_calls(emu)
    body = {"model": "slow", "messages": [{"role": "user", "content": "coalesce my stream"}], "stream": True}
    results = asyncio.run(_concurrent(gateway, 6, body))
    assert upstream_calls(emu) == before + 1
    assert sorted(s for s, _ in results) == ["coalesced"] * 5 + ["miss"]
    for _, text in results:
        assert text.rstrip().endswith("data: [DONE]")
        assert '"usage"' not in text  # nobody asked for it
    contents = {text.count("chat.completion.chunk") for _, text in results}
    assert len(contents) == 1  # every reader saw every chunk


def test_admin_cache_reports_hits_misses_and_savings(gateway: GatewayProcess) -> None:
    ask(gateway, "stats")
    ask(gateway, "stats")
    stats = httpx.get(gateway.url + "/admin/cache", headers=AUTH).json()
    assert stats["enabled"] is True
    assert stats["hits"] >= 1 and stats["misses"] >= 1
    assert 0 < stats["hit_ratio"] < 1
    assert stats["usd_saved"] > 0 and stats["tokens_saved"] > 0
    assert stats["backend"]["entries"] >= 1 and stats["backend"]["bytes"] > 0
    assert stats["coalescing"]["coalesced"] >= 1
    assert httpx.get(gateway.url + "/admin/cache").status_code == 401


def test_per_key_isolation_and_memory_bound(emu: OpenAIEmulator) -> None:
    config = cache_config(emu.url, per_key=True, max_bytes=20_000)
    config["auth"]["keys"] = [
        {"key": "sk-tia-static-aaaaaaaaaaaaaaaaaaaaaaaa", "name": "a"},
        {"key": "sk-tia-static-bbbbbbbbbbbbbbbbbbbbbbbb", "name": "b"},
    ]
    with GatewayProcess(config) as gw:

        def as_key(key: str, content: str) -> str:
            r = httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "m", "messages": [{"role": "user", "content": content}]},
            )
            assert r.status_code == 200, r.text
            return r.headers["x-tokyo-ia-cache"]

        a, b = (k["key"] for k in config["auth"]["keys"])
        assert as_key(a, "mine") == "miss"
        assert as_key(a, "mine") == "hit"
        assert as_key(b, "mine") == "miss"  # another key's entry is not shared
        for i in range(100):  # ~100 entries of ~0.5 KB into a 20 KB cache
            as_key(a, f"filler {i} " + "x" * 200)
        stats = httpx.get(gw.url + "/admin/cache", headers=AUTH).json()["backend"]
        assert stats["bytes"] <= 20_000 and stats["evictions"] > 0


def test_cache_warm_fills_the_cache_of_a_running_gateway(
    gateway: GatewayProcess, emu: OpenAIEmulator, tmp_path: Any
) -> None:
    lines = [
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "warm 1"}]}),
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "warm 2"}], "stream": True},
            }
        ),
        "{not json",
        json.dumps({"model": "nope", "messages": [{"role": "user", "content": "warm 3"}]}),
        "",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "warm 1"}]}),
    ]
    path = tmp_path / "warm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokyo_ia",
            "cache",
            "warm",
            str(path),
            "--url",
            gateway.url,
            "--concurrency",
            "1",
        ],
        env={**os.environ, "TOKYO_IA_KEY": MASTER},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr  # two bad lines
    assert "sent 4: stored 2, already cached 1, not cached 0, failed 2" in done.stdout
    assert "line 3: not JSON" in done.stdout
    assert "line 4: HTTP 404" in done.stdout
    before = upstream_calls(emu)
    assert ask(gateway, "warm 1").headers["x-tokyo-ia-cache"] == "hit"
    assert ask(gateway, "warm 2").headers["x-tokyo-ia-cache"] == "hit"
    assert upstream_calls(emu) == before
