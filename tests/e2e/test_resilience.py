"""Circuit breakers and /admin/health through a running gateway."""

from __future__ import annotations

import httpx

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

MASTER = "master-resilience-test"
USER = [{"role": "user", "content": "hi"}]


def test_breaker_opens_and_traffic_skips_the_broken_deployment(openai_emu: OpenAIEmulator) -> None:
    config = {
        "auth": {"master_key": MASTER},
        "providers": {
            "broken": openai_provider(openai_emu.url, max_retries=0),
            "good": openai_provider(openai_emu.url),
        },
        "models": {
            "m": [{"provider": "broken", "model": "error-503"}, {"provider": "good", "model": "gpt-4o-mini"}]
        },
        "resilience": {
            "breaker": {"consecutive_failures": 3, "min_requests": 3, "cooldown_s": 60},
            "health": {"active": False},
        },
    }
    auth = {"authorization": f"Bearer {MASTER}"}
    with GatewayProcess(config) as gw:
        attempts = []
        for _ in range(6):
            r = httpx.post(
                gw.url + "/v1/chat/completions", headers=auth, json={"model": "m", "messages": USER}
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-tokyo-ia-provider"] == "good"
            attempts.append(r.headers["x-tokyo-ia-attempts"])
        assert attempts[:3] == ["2", "2", "2"]  # broken tried and failed over
        assert attempts[3:] == ["1", "1", "1"]  # circuit open: broken skipped
        health = httpx.get(gw.url + "/admin/health", headers=auth).json()
        broken = health["deployments"]["broken/error-503"]
        assert broken["circuit"] == "open"
        assert health["deployments"]["good/gpt-4o-mini"]["circuit"] == "closed"
        assert httpx.get(gw.url + "/admin/health").status_code == 401
