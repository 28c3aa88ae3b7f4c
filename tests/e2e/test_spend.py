"""The spend ledger through a real ``tokyo-ia serve``: a row per request (JSON and streamed)
after the batch flush and after SIGTERM, priced by the table, reported by ``GET /admin/spend``
(JSON and CSV) and by ``tokyo-ia spend``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider, sdk_client
from tokyo_ia.accounting.pricing import PriceTable

MASTER = "master-" + uuid.uuid4().hex
APP_KEY = "app-" + uuid.uuid4().hex
ADMIN = {"authorization": f"Bearer {MASTER}"}
USER = [{"role": "user", "content": "what does this cost?"}]
PRICES = PriceTable.load()


def _config(emu: OpenAIEmulator, db: Path, **ledger: Any) -> dict[str, Any]:
    return {
        "store": {"url": f"sqlite+aiosqlite:///{db}"},
        "auth": {"master_key": MASTER, "keys": [{"key": APP_KEY, "name": "app"}]},
        "providers": {"up": openai_provider(emu.url)},
        "models": {"gpt-4o-mini": [{"provider": "up", "model": "gpt-4o-mini"}]},
        "ledger": ledger,
    }


def _cost(usage: dict[str, Any]) -> Decimal:
    return PRICES.cost("gpt-4o-mini", usage)


def _report(gw: GatewayProcess, **params: str) -> dict[str, Any]:
    r = httpx.get(gw.url + "/admin/spend", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _rows(report: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {row["group"]: row for row in report["data"]}


def _wait_for(gw: GatewayProcess, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        report = _report(gw, by="model")
        if report["total"]["requests"] >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def test_rows_after_the_batch_flush_and_the_admin_report(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    with GatewayProcess(_config(openai_emu, tmp_path / "spend.db", flush_interval_s=0.05)) as gw:
        created = httpx.post(gw.url + "/admin/keys", headers=ADMIN, json={"name": "lab", "team": "research"})
        team_key, team_key_id = created.json()["key"], created.json()["id"]

        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {APP_KEY}"},
            json={"model": "gpt-4o-mini", "messages": USER},
        )
        assert r.status_code == 200
        json_usage = r.json()["usage"]
        assert r.headers["x-tokyo-ia-cost-usd"] == f"{_cost(json_usage):.8f}"

        stream = sdk_client(gw.url, team_key).chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        usages = [c.usage for c in stream if c.usage is not None]  # read to the end: the request completes
        assert len(usages) == 1
        stream_usage = usages[0].model_dump(exclude_none=True)

        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {APP_KEY}"},
            json={"model": "nope", "messages": USER},
        )
        assert r.status_code == 404

        by_model = _rows(_wait_for(gw, requests=3))
        by_team = _rows(_report(gw, by="team"))
        by_day = _report(gw, by="day", since=datetime.now(UTC).date().isoformat())
        csv_reply = httpx.get(gw.url + "/admin/spend?by=key&format=csv", headers=ADMIN)
        bad = httpx.get(gw.url + "/admin/spend?by=week", headers=ADMIN)
        not_admin = httpx.get(gw.url + "/admin/spend", headers={"authorization": f"Bearer {APP_KEY}"})

    expected = _cost(json_usage) + _cost(stream_usage)
    assert expected > 0
    mini = by_model["gpt-4o-mini"]
    assert (mini["requests"], mini["errors"]) == (2, 0)
    assert mini["tokens_in"] == json_usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    assert mini["tokens_out"] == json_usage["completion_tokens"] + stream_usage["completion_tokens"]
    assert Decimal(mini["cost_usd"]) == expected  # the price table's arithmetic, to the last digit
    assert (by_model["nope"]["requests"], by_model["nope"]["errors"], by_model["nope"]["cost_usd"]) == (
        1,
        1,
        "0",
    )

    assert Decimal(by_team["research"]["cost_usd"]) == _cost(stream_usage)  # the streamed request
    assert by_team[None]["requests"] == 2  # the static key has no team
    assert [row["requests"] for row in by_day["data"]] == [3]

    assert csv_reply.status_code == 200
    assert csv_reply.headers["content-type"] == "text/csv; charset=utf-8"
    lines = list(csv.DictReader(io.StringIO(csv_reply.text)))
    by_key = {line["key_id"]: line for line in lines}
    assert set(by_key) == {"static:app", team_key_id}
    assert Decimal(by_key[team_key_id]["cost_usd"]) == _cost(stream_usage)
    assert by_key["static:app"]["requests"] == "2" and by_key["static:app"]["errors"] == "1"

    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "by"
    assert "must be one of key, team, model, day" in bad.json()["error"]["message"]
    assert not_admin.status_code == 403


def _spend_cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tokyo_ia", "spend", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_row_is_drained_on_sigterm_and_reported_by_the_cli(
    openai_emu: OpenAIEmulator, tmp_path: Path
) -> None:
    config = _config(openai_emu, tmp_path / "spend.db", flush_interval_s=3600, batch_size=1000)
    gw = GatewayProcess(config).start()
    try:
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {APP_KEY}"},
            json={"model": "gpt-4o-mini", "messages": USER},
        )
        assert r.status_code == 200
        with contextlib.closing(sqlite3.connect(tmp_path / "spend.db")) as db:  # the batch still waits
            assert db.execute("SELECT count(*) FROM spend_ledger").fetchone() == (0,)
    finally:
        code = gw.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), gw.log

    config_path = gw.dir / "config.yaml"

    usage = r.json()["usage"]
    table = _spend_cli(config_path, "--by", "model").splitlines()
    assert table[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert table[1].split()[:5] == [
        "gpt-4o-mini",
        "1",
        "0",
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
    ]
    assert table[-1].startswith("TOTAL")
    report = json.loads(_spend_cli(config_path, "--by", "key", "--format", "json"))
    assert [(row["group"], row["requests"]) for row in report["data"]] == [("static:app", 1)]
    assert Decimal(report["data"][0]["cost_usd"]) == _cost(usage)
