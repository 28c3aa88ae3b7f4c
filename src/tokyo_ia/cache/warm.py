"""``tokyo-ia cache warm FILE.jsonl``: fill a running gateway's cache by replaying requests.

The requests go through the gateway's HTTP API like any client's (so the cache that gets
filled is the one the gateway really uses, in its memory or in Redis), with a key allowed to
use the models. Each line of the file is a chat request body, or an OpenAI batch-file line
``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
``stream`` is ignored (answers are stored the same either way). A bad line is reported with
its number and skipped; the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(slots=True)
class WarmReport:
    sent: int = 0
    results: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        r = self.results
        lines = [
            f"sent {self.sent}: stored {r['miss']}, already cached {r['hit'] + r['coalesced']}, "
            f"not cached {r['none']}, failed {len(self.failures)}"
        ]
        lines += [f"  {failure}" for failure in self.failures]
        return "\n".join(lines)


def read_requests(path: Path, report: WarmReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, chat body)`` for each usable line; bad lines go to ``report``."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                report.failures.append(f"line {number}: not JSON ({exc})")
                continue
            body = item.get("body") if isinstance(item, dict) and "body" in item else item
            if not isinstance(body, dict) or "model" not in body or "messages" not in body:
                report.failures.append(
                    f'line {number}: expected a chat request {{"model": ..., "messages": [...]}} '
                    'or a batch line {"body": {...}}'
                )
                continue
            yield number, {**body, "stream": False}


async def warm(url: str, key: str | None, path: Path, concurrency: int) -> WarmReport:
    import aiohttp

    report = WarmReport()
    headers = {"authorization": f"Bearer {key}"} if key else {}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, number: int, body: dict[str, Any]) -> None:
        async with gate, session.post(endpoint, json=body, headers=headers) as response:
            report.sent += 1
            if response.status != 200:
                text = (await response.text())[:300]
                report.failures.append(f"line {number}: HTTP {response.status}: {text}")
                return
            await response.read()
            report.results[response.headers.get("x-tokyo-ia-cache", "none")] += 1

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await asyncio.gather(*(one(session, n, b) for n, b in read_requests(path, report)))
        except aiohttp.ClientConnectionError as exc:
            report.failures.append(f"cannot reach the gateway at {url}: {exc}")
    return report


def cmd_warm(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"tokyo-ia: error: no such file: {path}", file=sys.stderr)
        return 2
    key = args.key or os.environ.get("TOKYO_IA_KEY")
    report = asyncio.run(warm(args.url, key, path, max(1, args.concurrency)))
    print(report.summary())
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    cache = sub.add_parser("cache", help="the response cache of a running gateway")
    commands = cache.add_subparsers(dest="cache_command", required=True)
    warm_parser = commands.add_parser("warm", help="replay the requests of a JSONL file to fill the cache")
    warm_parser.add_argument("file", help="JSONL: one chat request body (or batch-API line) per line")
    warm_parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    warm_parser.add_argument("--key", help="API key to send (default: $TOKYO_IA_KEY)")
    warm_parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    warm_parser.set_defaults(func=cmd_warm)
