"""Failure drill: one of two deployments is killed in the middle of a steady load.

Every request had a healthy alternative (the second deployment), so none may fail: requests
in flight on the killed upstream, and those sent to it before its circuit opens, must be
failed over. The numbers are printed (``pytest -s``) for the issue note.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

MASTER = "master-drill"
AUTH = {"authorization": f"Bearer {MASTER}"}
CLIENTS = 8
DURATION_S = 4.0
KILL_AT_S = 1.5


def test_killing_one_of_two_deployments_mid_load_fails_no_request() -> None:
    with OpenAIEmulator() as doomed, OpenAIEmulator() as survivor:
        config = {
            "auth": {"master_key": MASTER},
            "providers": {
                "a": openai_provider(doomed.url, max_retries=1, retry_backoff_s=0.01),
                "b": openai_provider(survivor.url, max_retries=1, retry_backoff_s=0.01),
            },
            # equal priority, equal weight: both take traffic until one dies
            "models": {"m": [{"provider": "a", "model": "slow-20"}, {"provider": "b", "model": "slow-20"}]},
            "resilience": {
                "breaker": {"consecutive_failures": 3, "min_requests": 3, "cooldown_s": 60},
                "health": {"active": False},
            },
        }
        with GatewayProcess(config) as gw:
            outcome = asyncio.run(_drive(gw, doomed))
    stats = outcome["stats"]
    print(
        f"\nfailure drill: sent {stats['sent']}, ok {stats['ok']}, failed {stats['failed']}, "
        f"failed over {stats['failed_over']} (served by a: {stats['served_a']}, b: {stats['served_b']}; "
        f"after the kill, a served {stats['a_after_kill']})"
    )
    assert stats["failed"] == 0, outcome["errors"][:5]
    assert stats["sent"] == stats["ok"] > 50
    assert stats["served_a"] > 0 and stats["served_b"] > 0  # both took load before the kill
    assert stats["failed_over"] > 0  # the kill was felt, and absorbed
    assert stats["a_after_kill"] == 0


async def _drive(gw: GatewayProcess, doomed: OpenAIEmulator) -> dict[str, object]:
    counts: Counter[str] = Counter()
    errors: list[str] = []
    start = time.monotonic()
    killed_at: list[float] = []

    async def client(http: httpx.AsyncClient, n: int) -> None:
        i = 0
        while time.monotonic() - start < DURATION_S:
            i += 1
            body = {"model": "m", "messages": [{"role": "user", "content": f"drill {n}-{i}"}]}
            sent_at = time.monotonic()
            counts["sent"] += 1
            try:
                r = await http.post(gw.url + "/v1/chat/completions", headers=AUTH, json=body)
            except httpx.HTTPError as exc:
                counts["failed"] += 1
                errors.append(repr(exc))
                continue
            if r.status_code != 200:
                counts["failed"] += 1
                errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            counts["ok"] += 1
            provider = r.headers["x-tokyo-ia-provider"]
            counts[f"served_{provider}"] += 1
            if int(r.headers["x-tokyo-ia-attempts"]) > 1:
                counts["failed_over"] += 1
            if provider == "a" and killed_at and sent_at > killed_at[0]:
                counts["a_after_kill"] += 1

    async def killer() -> None:
        await asyncio.sleep(KILL_AT_S)
        await asyncio.to_thread(doomed.stop)
        killed_at.append(time.monotonic())  # once it is really gone

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(killer(), *(client(http, n) for n in range(CLIENTS)))
    keys = ("sent", "ok", "failed", "failed_over", "served_a", "served_b", "a_after_kill")
    return {"stats": {k: counts[k] for k in keys}, "errors": errors}
