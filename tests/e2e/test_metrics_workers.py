"""Two worker processes, one scrape: every counter equals the traffic sent, whichever worker
served it and whichever answers ``/metrics``.

The traffic mixes every event the gateway counts: plain and streamed answers, a retry, a
failover, caller errors, a rate-limit refusal, a circuit that opens, and a stream the client
abandons (in flight while it runs, back to zero once it ended).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

KEY, SMALL_KEY = "k-main", "k-small"
PLAIN, STREAMED = 6, 4
MAX_CONNECTIONS = 7
CHAT = "/v1/chat/completions"
POOL = "tokyo_ia_upstream_pool_connections"


def _config(emu: OpenAIEmulator) -> dict[str, object]:
    up = openai_provider(emu.url, max_retries=1, retry_backoff_s=0, max_connections=MAX_CONNECTIONS)
    down = openai_provider(emu.url, max_retries=0, max_connections=MAX_CONNECTIONS)
    return {
        "auth": {
            "keys": [
                {"key": KEY, "name": "main"},
                {"key": SMALL_KEY, "name": "small", "tpm": 20},  # any long prompt is refused
            ]
        },
        "providers": {"up": up, "down": down, "backup": openai_provider(emu.url)},
        "models": {
            "gpt": [{"provider": "up", "model": "gpt-4o-mini"}],
            "flaky": [{"provider": "up", "model": "flaky-1"}],
            "failover": [
                {"provider": "down", "model": "error-503"},
                {"provider": "backup", "model": "gpt-4o-mini"},
            ],
            "bad": [{"provider": "down", "model": "error-400"}],
            "trickle": [{"provider": "up", "model": "trickle"}],
        },
        "resilience": {"breaker": {"consecutive_failures": 1}, "health": {"active": False}},
    }


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(gw: GatewayProcess) -> Samples:
    text = httpx.get(gw.url + "/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _wait_for(gw: GatewayProcess, name: str, value: float, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (samples := _scrape(gw)) and _total(samples, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}: {_total(samples, name)}"
        time.sleep(0.05)


def _workers(multiproc: Path) -> set[str]:
    """Pids of the workers that counted something (prometheus_client's per-process files)."""
    return {p.stem.rsplit("_", 1)[1] for p in multiproc.glob("counter_*.db")}


def _chat(gw: GatewayProcess, model: str, key: str = KEY, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "count me " * 20}], **extra}
    return httpx.post(
        gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=10
    )


@pytest.fixture
def emu() -> Iterator[OpenAIEmulator]:
    """An emulator of its own: ``flaky-1`` fails once per emulator, other tests count on theirs."""
    with OpenAIEmulator() as emulator:
        yield emulator


def test_two_workers_count_what_was_sent(emu: OpenAIEmulator, tmp_path: Path) -> None:
    multiproc = tmp_path / "prom"
    with GatewayProcess(
        _config(emu), args=["--workers", "2"], env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    ) as gw:
        calls: list[Callable[[], httpx.Response]] = [
            *([lambda: _chat(gw, "gpt")] * PLAIN),
            *([lambda: _chat(gw, "gpt", stream=True)] * STREAMED),
        ]
        rounds = 0
        while rounds < 10 and len(_workers(multiproc)) < 2:  # concurrent rounds until both served
            with ThreadPoolExecutor(8) as pool:
                statuses = [r.status_code for r in pool.map(lambda call: call(), calls)]
            assert statuses == [200] * (PLAIN + STREAMED)
            rounds += 1
        plain, streamed = PLAIN * rounds, STREAMED * rounds
        assert _chat(gw, "flaky").headers["x-tokyo-ia-attempts"] == "2"  # 500, retried on `up`
        assert _chat(gw, "failover").headers["x-tokyo-ia-provider"] == "backup"
        assert _chat(gw, "bad").status_code == 400
        assert _chat(gw, "nope").status_code == 404
        refused = _chat(gw, "gpt", key=SMALL_KEY)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "request_exceeds_tpm"

        # a stream in flight, then abandoned by its client
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json={"model": "trickle", "messages": [{"role": "user", "content": "go"}], "stream": True},
            headers={"authorization": f"Bearer {KEY}"},
        ) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator would close the stream at once
            next(lines)
            # Workers add to their files every quarter of a second (metrics.FLUSH_AFTER_S): the
            # worker that answers may see the other's latest updates a little late.
            _wait_for(gw, "tokyo_ia_in_flight_requests", 1)
        _wait_for(gw, "tokyo_ia_in_flight_requests", 0)
        _wait_for(gw, "tokyo_ia_requests_total", plain + streamed + 6)  # both workers' latest
        scrapes = [_scrape(gw) for _ in range(4)]  # whichever worker answers, the same totals
        workers = _workers(multiproc)

    assert len(workers) == 2, workers
    # One access line per API request, the gateway's own: uvicorn's access log stays off in the
    # workers too (it used to come back there, a second line per request).
    access = [line for line in gw.log.splitlines() if '"tokyo_ia.access"' in line]
    assert "uvicorn.access" not in gw.log
    assert len(access) == plain + streamed + 6, len(access)
    for s in scrapes[1:]:  # pools are samples: the answering worker refreshes its own
        diff = {k: (v, scrapes[0].get(k)) for k, v in s.items() if scrapes[0].get(k) != v and k[0] != POOL}
        assert not diff, diff
    m = scrapes[0]
    req = "tokyo_ia_requests_total"
    route = {"route": CHAT}
    assert _total(m, req, model="gpt", provider="up", status="200", **route) == plain + streamed
    assert _total(m, req, model="flaky", provider="up", status="200") == 1
    assert _total(m, req, model="failover", provider="backup", status="200") == 1
    assert _total(m, req, model="bad", provider="down", status="400") == 1
    assert _total(m, req, model="other", status="404") == 1
    assert _total(m, req, model="gpt", provider="", status="429") == 1
    assert _total(m, req, model="trickle", status="200") == 1
    assert _total(m, req) == plain + streamed + 6
    assert _total(m, "tokyo_ia_request_duration_seconds_count") == plain + streamed + 6

    # retries, failovers, rate limits
    assert _total(m, "tokyo_ia_retries_total") == _total(m, "tokyo_ia_retries_total", provider="up") == 1
    assert (
        _total(m, "tokyo_ia_failovers_total") == _total(m, "tokyo_ia_failovers_total", model="failover") == 1
    )
    assert (
        _total(m, "tokyo_ia_rate_limited_total") == _total(m, "tokyo_ia_rate_limited_total", scope="key") == 1
    )

    # one upstream duration per attempt: gpt (every round), flaky x2, failover x2, bad x1, trickle x1
    up = "tokyo_ia_upstream_duration_seconds_count"
    assert _total(m, up, provider="up", model="gpt-4o-mini") == plain + streamed
    assert _total(m, up, provider="up", model="flaky-1") == 2
    assert _total(m, up, provider="down", model="error-503") == 1
    assert _total(m, up, provider="backup", model="gpt-4o-mini") == 1
    assert _total(m, up) == plain + streamed + 6

    # time to first token: every stream, the abandoned one included
    assert _total(m, "tokyo_ia_time_to_first_token_seconds_count", model="gpt") == streamed
    assert _total(m, "tokyo_ia_time_to_first_token_seconds_count") == streamed + 1

    # gauges: nothing in flight; circuits that failed once are open (consecutive_failures: 1)
    assert _total(m, "tokyo_ia_in_flight_requests") == 0
    circuit = "tokyo_ia_circuit_state"
    assert _total(m, circuit, deployment="down/error-503") == 2
    assert _total(m, circuit, deployment="up/flaky-1") == 2
    assert _total(m, circuit, deployment="up/gpt-4o-mini") == 0
    assert _total(m, circuit, deployment="backup/gpt-4o-mini") == 0
    # every worker samples its own pools; the pool sizes add up
    assert _total(m, POOL, provider="up", state="limit") == 2 * MAX_CONNECTIONS
    assert (POOL, frozenset({("provider", "up"), ("state", "idle")})) in m  # values: a sample, up to 5 s old
