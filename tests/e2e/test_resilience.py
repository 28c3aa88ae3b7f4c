"""Circuit breakers and /admin/health through a running gateway."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.fakes.base import free_port
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


def _pair(first: dict[str, Any], first_model: str, second: dict[str, Any]) -> dict[str, Any]:
    """A config whose model "m" is provider "a" (``first_model``), then "b" (gpt-4o-mini)."""
    return {
        "auth": {"master_key": MASTER},
        "providers": {"a": first, "b": second},
        "models": {"m": [{"provider": "a", "model": first_model}, {"provider": "b", "model": "gpt-4o-mini"}]},
        "resilience": {"health": {"active": False}},
    }


def _post(gw: GatewayProcess, model: str = "m") -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {MASTER}"},
        json={"model": model, "messages": USER},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("failing", "extra"),
    [
        ("refused", {}),  # nothing listens on the port
        ("error-500", {}),
        ("error-429", {}),  # with retry-after: failover does not wait for it
        ("slow-5000", {"timeout_s": 0.5}),  # hangs past the provider timeout
        # Not worth asking the same deployment again, but another may answer:
        ("gpt-4o-mini", {"api_key": "revoked-key"}),  # the emulator's own 401 for a wrong key
        ("error-403", {}),
        ("error-404", {}),  # the model is not (or no longer) at that provider
        ("error-402", {}),  # the deployment's account cannot pay
    ],
)
def test_each_kind_of_upstream_failure_fails_over(
    openai_emu: OpenAIEmulator, failing: str, extra: dict[str, Any]
) -> None:
    url = f"http://127.0.0.1:{free_port()}" if failing == "refused" else openai_emu.url
    config = _pair(openai_provider(url, max_retries=0, **extra), failing, openai_provider(openai_emu.url))
    with GatewayProcess(config) as gw:
        r = _post(gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-tokyo-ia-provider"] == "b"
    assert r.headers["x-tokyo-ia-attempts"] == "2"


@pytest.mark.parametrize("failing", ["error-400", "error-422"])
def test_a_request_the_upstream_refuses_is_not_tried_elsewhere(
    openai_emu: OpenAIEmulator, failing: str
) -> None:
    """The caller must change the request: any other deployment would refuse it as well."""
    with GatewayProcess(
        _pair(openai_provider(openai_emu.url), failing, openai_provider(openai_emu.url))
    ) as gw:
        r = _post(gw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"provider 'a' returned {failing[-3:]}")
    assert (r.headers["x-tokyo-ia-provider"], r.headers["x-tokyo-ia-attempts"]) == ("a", "1")


def test_when_every_deployment_refuses_the_gateways_credentials_each_is_named(
    openai_emu: OpenAIEmulator,
) -> None:
    config = _pair(
        openai_provider(openai_emu.url, api_key="revoked-a"),
        "gpt-4o-mini",
        openai_provider(openai_emu.url, api_key="revoked-b"),
    )
    with GatewayProcess(config) as gw:
        r = _post(gw)
        health = httpx.get(gw.url + "/admin/health", headers={"authorization": f"Bearer {MASTER}"}).json()
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "check providers.a.api_key" in message and "check providers.b.api_key" in message
    assert r.headers["x-tokyo-ia-attempts"] == "2"
    for label in ("a/gpt-4o-mini", "b/gpt-4o-mini"):  # the operator sees why, per deployment
        deployment = health["deployments"][label]
        assert deployment["last_error"]["kind"] == "upstream_auth_failed"
        assert deployment["circuit"] == "closed"  # not worth a retry, and not a sign of overload


def test_breaker_goes_through_every_state(openai_emu: OpenAIEmulator) -> None:
    """closed → open (failures) → half_open (cool-down) → open (trial fails) → half_open →
    closed (trial succeeds), as seen by clients and at /admin/health."""
    with OpenAIEmulator() as flaky:
        config = {
            "auth": {"master_key": MASTER},
            "providers": {
                "primary": openai_provider(flaky.url, max_retries=0),
                "backup": openai_provider(openai_emu.url),
            },
            "models": {
                "m": [
                    {"provider": "primary", "model": "gpt-4o-mini", "priority": 0},
                    {"provider": "backup", "model": "gpt-4o-mini", "priority": 1},
                ]
            },
            "resilience": {
                "breaker": {"consecutive_failures": 2, "min_requests": 10, "cooldown_s": 1.0},
                "health": {"active": False},
            },
        }
        with GatewayProcess(config) as gw:

            def circuit() -> str:
                health = httpx.get(gw.url + "/admin/health", headers={"authorization": f"Bearer {MASTER}"})
                return str(health.json()["deployments"]["primary/gpt-4o-mini"]["circuit"])

            def served() -> tuple[str, str]:
                r = _post(gw)
                assert r.status_code == 200, r.text  # the backup always saves the request
                return r.headers["x-tokyo-ia-provider"], r.headers["x-tokyo-ia-attempts"]

            assert served() == ("primary", "1") and circuit() == "closed"
            flaky.state.fault = 503
            assert [served(), served()] == [("backup", "2")] * 2
            assert circuit() == "open"
            assert served() == ("backup", "1")  # primary skipped while open
            time.sleep(1.2)
            assert served() == ("backup", "2")  # half-open trial failed ...
            assert circuit() == "open"  # ... so open again
            flaky.state.fault = None
            time.sleep(1.2)
            assert served() == ("primary", "1")  # trial succeeded
            assert circuit() == "closed"
            health = httpx.get(gw.url + "/admin/health", headers={"authorization": f"Bearer {MASTER}"}).json()
            times = health["deployments"]["primary/gpt-4o-mini"]["time_in_state_s"]
            assert set(times) >= {"closed", "open", "half_open"}


def test_the_request_timeout_bounds_the_whole_request(openai_emu: OpenAIEmulator) -> None:
    """server.request_timeout_s cuts a slow call short and no deployment is tried after it."""
    config = _pair(
        openai_provider(openai_emu.url, timeout_s=30), "slow-5000", openai_provider(openai_emu.url)
    )
    config["server"] = {"request_timeout_s": 0.5}
    with GatewayProcess(config) as gw:
        r = _post(gw)
    # Uncut, the slow model would have answered 200 after 5 s (its provider allows 30).
    assert r.status_code == 504, r.text
    assert "server.request_timeout_s" in r.json()["error"]["message"]
    assert (r.headers["x-tokyo-ia-provider"], r.headers["x-tokyo-ia-attempts"]) == ("a", "1")
