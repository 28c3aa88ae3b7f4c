"""Metrics scraped after real traffic match the requests sent; cost header and access log."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

USER = [{"role": "user", "content": "count me"}]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_match_traffic_and_cost_is_reported(openai_emu: OpenAIEmulator) -> None:
    config = {
        "providers": {"up": openai_provider(openai_emu.url)},
        "models": {"gpt-4o-mini": [{"provider": "up", "model": "gpt-4o-mini"}]},
    }
    with GatewayProcess(config, args=["--log-format", "json"]) as gw:
        costs = []
        for _ in range(3):
            r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": USER})
            assert r.status_code == 200
            costs.append(float(r.headers["x-tokyo-ia-cost-usd"]))
        usage = r.json()["usage"]
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "nope", "messages": USER})
        assert r.status_code == 404
        text = httpx.get(gw.url + "/metrics").text
        time.sleep(0.4)  # access lines are written in blocks, at most 0.2 s after the request
        log = gw.log
    samples = _samples(text)
    route = ("route", "/v1/chat/completions")
    ok = samples[
        ("tokyo_ia_requests_total", (("model", "gpt-4o-mini"), ("provider", "up"), route, ("status", "200")))
    ]
    assert ok == 3
    assert (
        samples[("tokyo_ia_requests_total", (("model", "other"), ("provider", ""), route, ("status", "404")))]
        == 1
    )
    tokens_in = samples[("tokyo_ia_tokens_total", (("direction", "input"), ("model", "gpt-4o-mini")))]
    assert tokens_in == 3 * usage["prompt_tokens"]
    # gpt-4o-mini's shipped price: the header equals the table's arithmetic
    from tokyo_ia.accounting.pricing import PriceTable

    expected = float(PriceTable.load().cost("gpt-4o-mini", usage))
    assert expected > 0
    assert costs[-1] == round(expected, 8)
    assert samples[("tokyo_ia_cost_usd_total", (("model", "gpt-4o-mini"),))] > 0
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"request_id"' in line]
    access = [line for line in lines if line.get("status") == 200]
    assert len(access) == 3
    assert access[0]["model"] == "gpt-4o-mini" and access[0]["tokens_in"] == usage["prompt_tokens"]


def test_usage_carries_the_cost_when_the_client_asks_for_it(openai_emu: OpenAIEmulator) -> None:
    from tokyo_ia.accounting.pricing import PriceTable

    config = {
        "providers": {"up": openai_provider(openai_emu.url)},
        "models": {"gpt-4o-mini": [{"provider": "up", "model": "gpt-4o-mini"}]},
    }
    body = {"model": "gpt-4o-mini", "messages": USER}
    ask = {"x-tokyo-ia-include-cost": "true"}
    prices = PriceTable.load()
    with GatewayProcess(config) as gw:
        plain = httpx.post(gw.url + "/v1/chat/completions", json=body).json()
        assert "cost_usd" not in plain["usage"]  # only when asked: strict clients see OpenAI's shape
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=ask)
        usage = r.json()["usage"]
        expected = float(prices.cost("gpt-4o-mini", {k: v for k, v in usage.items() if k != "cost_usd"}))
        assert usage["cost_usd"] == pytest.approx(expected) and expected > 0
        assert float(r.headers["x-tokyo-ia-cost-usd"]) == pytest.approx(expected, abs=1e-8)
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=stream, headers=ask) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        last = events[-1]["usage"]
        usage_only = {k: v for k, v in last.items() if k != "cost_usd"}
        streamed = float(prices.cost("gpt-4o-mini", usage_only))
        assert last["cost_usd"] == pytest.approx(streamed) and streamed > 0
