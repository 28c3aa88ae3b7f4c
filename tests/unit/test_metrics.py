"""Metrics: names, labels, folding, and multiprocess aggregation across real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tokyo_ia.observability.metrics import (
    FLUSH_AFTER_S,
    METRIC_NAMES,
    MULTIPROC_ENV,
    Metrics,
    _buffered_class,
    flush_buffered,
    setup_multiprocess_dir,
)

CHAT = "/v1/chat/completions"


def samples(metrics: Metrics) -> list[Sample]:
    body, content_type = metrics.render_metrics()
    assert content_type.startswith("text/plain; version=0.0.4")
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(s.value for s in found if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return Metrics(
        models=["gpt-4o-mini", "gpt-4o-mini-2024-07-18"],
        providers=["openai", "anthropic"],
        deployments=["openai/gpt-4o-mini-2024-07-18"],
    )


def test_observe_request_then_read_it_back(metrics: Metrics) -> None:
    for _ in range(3):
        metrics.observe_request(CHAT, "gpt-4o-mini", "openai", 200, 0.3, 100, 20, 0.0005, ttft_s=0.12)
    metrics.observe_request(CHAT, "gpt-4o-mini", "openai", 502, 1.5)
    found = samples(metrics)
    ok = {"route": CHAT, "model": "gpt-4o-mini", "provider": "openai", "status": "200"}
    assert value(found, "tokyo_ia_requests_total", **ok) == 3
    assert value(found, "tokyo_ia_requests_total", status="502") == 1
    assert value(found, "tokyo_ia_request_duration_seconds_count", route=CHAT, model="gpt-4o-mini") == 4
    assert value(found, "tokyo_ia_request_duration_seconds_sum", model="gpt-4o-mini") == pytest.approx(2.4)
    assert value(found, "tokyo_ia_request_duration_seconds_bucket", model="gpt-4o-mini", le="0.5") == 3
    assert value(found, "tokyo_ia_tokens_total", model="gpt-4o-mini", direction="input") == 300
    assert value(found, "tokyo_ia_tokens_total", model="gpt-4o-mini", direction="output") == 60
    assert value(found, "tokyo_ia_cost_usd_total", model="gpt-4o-mini") == pytest.approx(0.0015)
    assert value(found, "tokyo_ia_time_to_first_token_seconds_count", model="gpt-4o-mini") == 3


def test_every_event_and_every_contract_name(metrics: Metrics) -> None:
    metrics.observe_request(CHAT, "gpt-4o-mini", "openai", 200, 0.1, 1, 1, 0.01, 0.05)
    metrics.observe_upstream("openai", "gpt-4o-mini-2024-07-18", 0.08)
    for result in ("hit", "miss", "miss"):
        metrics.observe_cache(result)
    metrics.observe_retry("openai")
    metrics.observe_failover("gpt-4o-mini")
    metrics.observe_rate_limited("key")
    metrics.set_circuit_state("openai/gpt-4o-mini-2024-07-18", "open")
    metrics.request_started()
    metrics.request_started()
    metrics.request_finished()
    metrics.set_pool_connections("openai", active=3, idle=5, limit=100)
    found = samples(metrics)
    names = {s.name for s in found}
    for name in METRIC_NAMES:
        assert name in names or f"{name}_count" in names, name
    assert value(found, "tokyo_ia_cache_requests_total", result="miss") == 2
    assert value(found, "tokyo_ia_upstream_duration_seconds_count", provider="openai") == 1
    assert value(found, "tokyo_ia_circuit_state", deployment="openai/gpt-4o-mini-2024-07-18") == 2
    assert value(found, "tokyo_ia_in_flight_requests") == 1
    assert value(found, "tokyo_ia_upstream_pool_connections", provider="openai", state="idle") == 5
    assert value(found, "tokyo_ia_retries_total", provider="openai") == 1
    assert value(found, "tokyo_ia_failovers_total", model="gpt-4o-mini") == 1
    assert value(found, "tokyo_ia_rate_limited_total", scope="key") == 1


def test_unknown_label_values_fold_into_other(metrics: Metrics) -> None:
    for i in range(200):
        metrics.observe_request(f"/v1/x{i}", f"made-up-{i}", f"p{i}", 404, 0.001)
        metrics.observe_cache(f"weird-{i}")
        metrics.observe_rate_limited(f"key-{i}")
    found = samples(metrics)
    requests = [s for s in found if s.name == "tokyo_ia_requests_total"]
    assert [s.labels for s in requests] == [
        {"route": "other", "model": "other", "provider": "other", "status": "404"}
    ]
    assert requests[0].value == 200
    assert value(found, "tokyo_ia_cache_requests_total", result="other") == 200
    assert len({s.labels.get("scope") for s in found if s.name == "tokyo_ia_rate_limited_total"}) == 1


def test_from_config_allows_public_and_upstream_names() -> None:
    from tokyo_ia.config import parse_config

    config = parse_config(
        {
            "providers": {"demo": {"kind": "demo"}},
            "models": {"chat": [{"provider": "demo", "model": "demo-a"}]},
        }
    )
    m = Metrics.from_config(config)
    m.observe_request(CHAT, "chat", "demo", 200, 0.01)
    m.observe_upstream("demo", "demo-a", 0.01)
    m.set_circuit_state("demo/demo-a", 1)
    found = samples(m)
    assert value(found, "tokyo_ia_requests_total", model="chat", provider="demo") == 1
    assert value(found, "tokyo_ia_upstream_duration_seconds_count", model="demo-a") == 1
    assert value(found, "tokyo_ia_circuit_state", deployment="demo/demo-a") == 1


WORKER = textwrap.dedent(
    """
    import sys
    from tokyo_ia.observability.metrics import Metrics
    m = Metrics(models=["gpt-4o-mini"], providers=["openai"], deployments=["openai/gpt-4o-mini"])
    n, state, close = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "close"
    for _ in range(n):
        m.observe_request("/v1/chat/completions", "gpt-4o-mini", "openai", 200, 0.2, 10, 5, 0.001)
    m.observe_cache("hit")
    m.request_started()
    m.set_circuit_state("openai/gpt-4o-mini", state)
    print("ready", flush=True)
    sys.stdin.readline()
    if close:
        m.close()
    """
)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, n, state, close],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, state, close in (("3", "0", "close"), ("5", "2", "crash"))
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield tmp_path, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()


def test_multiprocess_mode_aggregates_every_worker(workers: tuple[Path, list[subprocess.Popen[str]]]) -> None:
    path, procs = workers
    collector = Metrics(multiprocess_dir=str(path))  # this test process only reads the files
    live = samples(collector)
    assert value(live, "tokyo_ia_requests_total", model="gpt-4o-mini", status="200") == 8
    assert value(live, "tokyo_ia_request_duration_seconds_count", model="gpt-4o-mini") == 8
    assert value(live, "tokyo_ia_tokens_total", direction="input") == 80
    assert value(live, "tokyo_ia_cost_usd_total", model="gpt-4o-mini") == pytest.approx(0.008)
    assert value(live, "tokyo_ia_cache_requests_total", result="hit") == 2
    assert value(live, "tokyo_ia_in_flight_requests") == 2  # livesum
    assert value(live, "tokyo_ia_circuit_state", deployment="openai/gpt-4o-mini") == 2  # livemax

    for p in procs:  # one worker marks itself dead; the other just exits, like a crash
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(timeout=10) == 0
    after = samples(collector)
    assert value(after, "tokyo_ia_requests_total") == 8  # counters of exited workers remain
    assert value(after, "tokyo_ia_in_flight_requests") == 0  # gauges of exited workers do not
    assert not any(s.name == "tokyo_ia_circuit_state" for s in after)
    assert not list(path.glob("gauge_live*"))


def test_setup_multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, "placeholder")  # so monkeypatch restores the original state
    monkeypatch.delenv(MULTIPROC_ENV)
    assert setup_multiprocess_dir(1) is None
    assert MULTIPROC_ENV not in os.environ

    made = setup_multiprocess_dir(2)
    assert made is not None and os.environ[MULTIPROC_ENV] == made
    assert Path(made).is_dir() and not any(Path(made).iterdir())

    stale = tmp_path / "counter_123.db"
    stale.write_bytes(b"old")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    assert setup_multiprocess_dir(4) == str(tmp_path)
    assert not stale.exists()


# -- multiprocess values written in batches ---------------------------------------------------


def _file_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    """prometheus_client's memory-mapped value class, its files in ``tmp_path``."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    return values.MultiProcessValue(lambda: 4242)  # type: ignore[no-untyped-call]


def _in_file(tmp_path: Path) -> float:
    """What another worker's scrape reads: the counter's value in this process's file."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    return sum(s.value for f in registry.collect() for s in f.samples if s.name == "hits_total")


async def test_increments_reach_the_file_together_within_the_flush_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffered = _buffered_class(_file_value(tmp_path, monkeypatch))
    counter = buffered("counter", "hits", "hits_total", (), (), "Hits.")
    gauge = buffered("gauge", "depth", "depth", (), (), "Depth.", multiprocess_mode="livesum")
    for _ in range(3):
        counter.inc(1.0)
    gauge.inc(5.0)
    assert (counter.get(), gauge.get()) == (3.0, 5.0)  # this process sees them at once
    assert _in_file(tmp_path) == 0.0  # the file, not yet
    gauge.set(2.0)  # a set writes through and replaces what was added before it
    assert gauge.file_value.get() == 2.0 and gauge.get() == 2.0
    await asyncio.sleep(FLUSH_AFTER_S + 0.2)
    assert _in_file(tmp_path) == 3.0 and counter.get() == 3.0
    counter.inc(4.0)
    flush_buffered()  # what /metrics and a worker's exit do first
    assert _in_file(tmp_path) == 7.0


def test_without_an_event_loop_every_increment_is_written_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = _buffered_class(_file_value(tmp_path, monkeypatch))(
        "counter", "hits", "hits_total", (), (), "H."
    )
    counter.inc(2.0)
    assert _in_file(tmp_path) == 2.0
