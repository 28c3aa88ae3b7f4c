"""The pipeline's events reach the metrics: retries, failovers, rate limits by scope, circuits,
upstream attempts, time to first token and in-flight requests (one process, ``demo`` models).

``tests/e2e/test_metrics_workers.py`` checks the same counters across two worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.inprocess import in_process
from tokyo_ia.observability.metrics import MULTIPROC_ENV
from tokyo_ia.server.app import GatewayApp

DEMO = {"kind": "demo", "max_retries": 0}


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)


def value(app: GatewayApp, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    body, _ = app.gateway.metrics.render_metrics()
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def test_a_provider_limit_refusal_counts_and_fails_over(tmp_path: Path) -> None:
    config = {
        "providers": {"a": {**DEMO, "rpm": 1, "throttle_wait_s": 0}, "b": DEMO},
        "models": {"m": [{"provider": "a", "model": "demo"}, {"provider": "b", "model": "demo"}]},
    }
    async with in_process(config, tmp_path) as (app, client):
        first = await client.post("/v1/chat/completions", json=chat("m"))
        second = await client.post("/v1/chat/completions", json=chat("m"))
        assert first.headers["x-tokyo-ia-provider"] == "a"
        assert second.headers["x-tokyo-ia-provider"] == "b"  # a refused at once: its rpm is spent
        assert value(app, "tokyo_ia_rate_limited_total", scope="provider") == 1
        assert value(app, "tokyo_ia_failovers_total", model="m") == 1
        assert value(app, "tokyo_ia_retries_total") == 0
        # the refused attempt never reached the provider: no upstream duration for it
        assert value(app, "tokyo_ia_upstream_duration_seconds_count", provider="a") == 1
        assert value(app, "tokyo_ia_upstream_duration_seconds_count", provider="b") == 1


async def test_an_open_circuit_is_skipped_and_that_is_a_failover(tmp_path: Path) -> None:
    config = {
        "providers": {"a": DEMO, "b": DEMO},
        "models": {"m": [{"provider": "a", "model": "demo-fail"}, {"provider": "b", "model": "demo"}]},
        "resilience": {"breaker": {"consecutive_failures": 1}, "health": {"active": False}},
    }
    async with in_process(config, tmp_path) as (app, client):
        assert value(app, "tokyo_ia_circuit_state", deployment="a/demo-fail") == 0  # known from the start
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=chat("m"))
            assert r.headers["x-tokyo-ia-provider"] == "b"
        assert r.headers["x-tokyo-ia-attempts"] == "1"  # the second request did not even try a
        assert value(app, "tokyo_ia_circuit_state", deployment="a/demo-fail") == 2
        assert value(app, "tokyo_ia_circuit_state", deployment="b/demo") == 0
        assert value(app, "tokyo_ia_failovers_total", model="m") == 2
        assert value(app, "tokyo_ia_upstream_duration_seconds_count", provider="a") == 1


async def test_retries_are_counted_per_provider(tmp_path: Path) -> None:
    config = {
        "providers": {"a": {"kind": "demo", "max_retries": 2, "retry_backoff_s": 0}},
        "models": {"m": [{"provider": "a", "model": "demo-fail"}]},
        "resilience": {"breaker": {"enabled": False}, "health": {"active": False}},
    }
    async with in_process(config, tmp_path) as (app, client):
        r = await client.post("/v1/chat/completions", json=chat("m"))
        assert r.status_code == 502 and r.headers["x-tokyo-ia-attempts"] == "3"
        assert value(app, "tokyo_ia_retries_total", provider="a") == 2
        assert value(app, "tokyo_ia_failovers_total") == 0
        assert value(app, "tokyo_ia_upstream_duration_seconds_count", provider="a") == 3


async def test_admission_refusals_by_scope(tmp_path: Path) -> None:
    config = {
        "auth": {"keys": [{"key": "k1", "name": "one", "rpm": 1}, {"key": "k2", "name": "two"}]},
        "limits": {"rpm": 2},
        "providers": {"demo": DEMO},
        "models": {"demo": [{"provider": "demo", "model": "demo"}]},
    }
    async with in_process(config, tmp_path) as (app, client):

        async def send(key: str) -> int:
            r = await client.post("/v1/chat/completions", json=chat("demo"), headers={"x-api-key": key})
            return r.status_code

        assert [await send("k1"), await send("k1")] == [200, 429]  # the key's own rpm
        assert [await send("k2"), await send("k2")] == [200, 429]  # the gateway's rpm
        assert value(app, "tokyo_ia_rate_limited_total", scope="key") == 1
        assert value(app, "tokyo_ia_rate_limited_total", scope="global") == 1
        assert value(app, "tokyo_ia_requests_total", status="429") == 2


async def test_streams_time_to_first_token_and_in_flight(tmp_path: Path) -> None:
    config = {"providers": {"demo": DEMO}, "models": {"demo": [{"provider": "demo", "model": "demo"}]}}
    async with in_process(config, tmp_path) as (app, client):
        # (httpx's ASGI transport buffers whole responses: the e2e test sees a stream in flight)
        r = await client.post("/v1/chat/completions", json=chat("demo", stream=True))
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert (await client.post("/v1/chat/completions", json=chat("demo"))).status_code == 200
        assert value(app, "tokyo_ia_in_flight_requests") == 0
        assert value(app, "tokyo_ia_time_to_first_token_seconds_count", model="demo") == 1  # streams only
        assert value(app, "tokyo_ia_upstream_duration_seconds_count", provider="demo", model="demo") == 2
        await client.get("/metrics")
        await client.get("/health/ready")
        assert value(app, "tokyo_ia_in_flight_requests") == 0
        assert value(app, "tokyo_ia_requests_total") == 2  # probes and scrapes are not requests
