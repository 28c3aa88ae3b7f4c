"""Start ``tokyo-ia serve`` as a user would, in a subprocess, and wait until it is ready."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.fakes.base import free_port


class GatewayProcess:
    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.config = config
        self.port = free_port()
        self.env = env or {}
        self.args = args or []
        self.dir = Path(tempfile.mkdtemp(prefix="tokyo-ia-test-"))
        self.log_path = self.dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "http"
        self.verify: str | None = None  # CA file for https

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        cmd = [sys.executable, "-m", "tokyo_ia", "serve", "--port", str(self.port), *self.args]
        if self.config is not None:
            path = self.dir / "config.yaml"
            path.write_text(yaml.safe_dump(self.config))
            cmd += ["--config", str(path)]
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.pop("TOKYO_IA_CONFIG", None)
        env.update(self.env)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log}")
            try:
                context = ssl.create_default_context(cafile=self.verify) if self.verify else None
                with urllib.request.urlopen(self.url + "/health/ready", timeout=1, context=context) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def openai_provider(emu_url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": emu_url + "/v1", "api_key": "test-key", **extra}


class Outage:
    """A database session factory that is down (refuses to connect) until ``up`` is set."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.up = False

    def __call__(self) -> AsyncSession:
        if not self.up:
            raise ConnectionRefusedError("database down")
        return self.sessions()


class FakeClock:
    """Time that moves only when the test says so (pass it where code takes a clock)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


_OPEN_CLIENTS: list[Any] = []


def sdk_client(gateway_url: str, key: str = "unused", **options: Any) -> Any:
    """The official openai SDK pointed at a gateway (no retries: tests see every error).

    Clients are closed after each e2e test (tests/e2e/conftest.py), so no socket is left for
    the garbage collector to report.
    """
    import openai

    client = openai.OpenAI(
        base_url=gateway_url + "/v1", api_key=key, **{"max_retries": 0, "timeout": 10, **options}
    )
    _OPEN_CLIENTS.append(client)
    return client


def close_sdk_clients() -> None:
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


REDIS_URL = os.environ.get("TOKYO_IA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def missing_service(reason: str) -> NoReturn:
    """A service a test needs is not there: skip loudly, or fail with ``CI=true`` (DESIGN.md)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service is a failure, not a skip)", pytrace=False)
    pytest.skip(f"!!! {reason}")


def require_redis() -> str:
    """The test Redis URL; skip loudly when none answers (a failure with ``CI=true``)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        missing_service(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL
