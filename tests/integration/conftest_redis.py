"""Real-Redis test support, importable by any integration test module.

DESIGN.md: Redis tests talk to a real server; locally they are skipped with a loud reason
when none answers, and with ``CI=true`` a missing server is a failure, never a skip.
(Not named ``conftest.py`` on purpose: that file belongs to the whole integration suite.)
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.support import REDIS_URL, missing_service


async def connect_or_skip(url: str = REDIS_URL) -> Redis:
    """A connected client, or skip (locally) / fail (CI) saying exactly what is missing."""
    client = Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        reason = (
            f"REDIS NOT REACHABLE at {url} ({exc}); start one with "
            "`docker run -p 6379:6379 redis:7` or set TOKYO_IA_TEST_REDIS_URL"
        )
        missing_service(reason)
    return client


def unique_prefix(kind: str) -> str:
    """A key prefix no other test run shares; delete everything under it afterwards."""
    return f"tokyo-ia-test:{kind}:{uuid.uuid4().hex[:12]}:"


async def delete_prefix(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)


async def run_replicas(script: str, *args: str, count: int = 2, step_timeout_s: float = 15.0) -> list[bytes]:
    """Run ``count`` Python processes of ``script`` released at the same instant; their stdouts.

    Each process must print ``ready`` once set up, then wait for a line on stdin before it
    starts, so the replicas race for real; every process must exit 0.
    """
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), step_timeout_s) == b"ready\n"
        for proc in procs:  # release them all at once
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = [await asyncio.wait_for(proc.communicate(), step_timeout_s) for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert all(proc.returncode == 0 for proc in procs)
    return [out for out, _ in outputs]
