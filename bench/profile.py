"""``python -m bench.profile``: py-spy the gateway under load and say where its CPU goes.

Starts the fake upstream and the gateway exactly as ``python -m bench`` does (full pipeline,
virtual key, pinned to its own core), puts wrk load on it (64 connections), records it with
py-spy (``pip install py-spy``) and prints the share of samples per area of the code, then
the top functions by own time. The raw collapsed stacks are kept (``--out``) for flamegraphs
(``flamegraph.pl`` or https://www.speedscope.app).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from . import wrk
from .measure import CHAT, STREAM, Plan
from .runner import Bench

# First match wins, in this order: a sample inside the upstream client under the pipeline is
# "upstream call", not "pipeline".
AREAS: list[tuple[str, str]] = [
    ("audit + spend-ledger writers (SQLAlchemy, aiosqlite)", r"aiosqlite/|sqlalchemy/|store/batch\.py"),
    ("upstream call (providers/: wire.py client, provider code)", r"tokyo_ia/providers/"),
    ("access log", r"access_log|structlog/|observability/logging\.py"),
    ("metrics (prometheus_client)", r"prometheus_client/|observability/metrics\.py"),
    ("audit/ledger rows built on the request path", r"spend_entry|AuditEvent|accounting/ledger\.py"),
    ("tracing", r"observability/tracing\.py|opentelemetry/"),
    ("response cache", r"tokyo_ia/cache/"),
    ("admission (rate limits)", r"resilience/ratelimit\.py|resilience/admission\.py"),
    ("auth (key cache, may_use)", r"tokyo_ia/security/"),
    ("routing, health, breakers", r"Pipeline\._select|resilience/health\.py|resilience/breaker|routing/"),
    ("cost", r"accounting/pricing\.py"),
    ("validation + JSON parse", r"schema/chat\.py|Request\.json|Request\.body"),
    ("HTTP server (uvicorn, server/)", r"uvicorn/|tokyo_ia/server/|httptools"),
    ("pipeline (rest)", r"tokyo_ia/pipeline\.py"),
]
_LINE = re.compile(r":\d+\)$")


def summarize(raw: Path, top: int = 25) -> str:
    """Areas and top self-time functions of a py-spy ``--format raw`` file."""
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        area = next((name for name, pattern in AREAS if re.search(pattern, stack)), "event loop, other")
        areas[area] += n
        leaf = _LINE.sub(")", stack.rsplit(";", 1)[-1]).replace(sys.prefix, "")
        own[leaf] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "share  area"]
    lines += [f"{100 * n / total:5.1f}% {name}" for name, n in areas.most_common()]
    lines += ["", "self   function"]
    lines += [f"{100 * n / total:5.1f}% {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=30, help="recording time")
    parser.add_argument("--mode", choices=["chat", "stream", "cache"], default="chat")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tokyo-ia-profile.txt")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists() or not wrk.available():
        print("bench.profile needs py-spy (pip install py-spy) and wrk (apt-get install wrk)")
        return 2
    bench = Bench(Plan(), Path(tempfile.mkdtemp(prefix="tokyo-ia-profile-")))
    try:
        bench.start_support()
        gateway = bench.start_gateway("gateway", workers=1, cache=args.mode == "cache")
        target = bench.targets(gateway)[2]
        url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
        body = orjson.dumps(STREAM if args.mode == "stream" else CHAT)
        wrk.load(url, body, target.headers, connections=64, seconds=3)  # warm-up
        record = [spy, "record", "--pid", str(gateway.pid), "--rate", str(args.rate), "--nonblocking"]
        record += ["--duration", str(args.seconds), "--format", "raw", "-o", str(args.out)]
        with subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as recorder:
            result = wrk.load(url, body, target.headers, connections=64, seconds=args.seconds + 2)
            recorder.wait()
    finally:
        bench.stop()
    print(f"{args.mode}: {result.rps:.0f} req/s under the profiler; raw stacks in {args.out}\n")
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
