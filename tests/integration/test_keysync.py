"""Key changes reach every replica's key cache through real Redis pub/sub, and survive outages.

Each "replica" is a KeyService + KeyCache + KeySubscriber on the same database, with a key
cache TTL of 300 s: a replica that stops honouring a revoked key did so because it was told,
never because its entry expired. Each test uses its own channel, so parallel runs never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.fakes.base import free_port
from tests.integration.conftest_redis import REDIS_URL
from tests.integration.test_store_cli import Cli
from tokyo_ia.errors import AuthenticationError
from tokyo_ia.security.auth import digest
from tokyo_ia.security.keycache import KeyCache
from tokyo_ia.security.keys import KeyService
from tokyo_ia.security.keysync import CHANNEL, KeySubscriber, announcer

Sessions = async_sessionmaker[AsyncSession]


class Replica:
    def __init__(self, sessions: Sessions, redis: Redis, channel: str, url: str = REDIS_URL) -> None:
        self.keys = KeyService(sessions)
        self.cache = KeyCache(self.keys, ttl_s=300.0)
        self.keys.on_change(announcer(redis, channel))
        self.subscriber = KeySubscriber(url, self.cache, channel=channel, backoff_s=0.02, max_backoff_s=0.1)

    async def __aenter__(self) -> Replica:
        self.subscriber.start()
        await asyncio.wait_for(self.subscriber.subscribed.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.subscriber.close()


@pytest.fixture
def channel() -> str:
    return f"tokyo-ia-test:keys:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def replicas(sessions: Sessions, redis_client: Redis, channel: str) -> Callable[..., Replica]:
    return lambda url=REDIS_URL: Replica(sessions, redis_client, channel, url)


async def refused_within(check: Callable[[], Awaitable[object]], timeout_s: float = 2.0) -> str:
    """Poll ``check`` until it raises AuthenticationError; its code (fails after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await check()
            except AuthenticationError as exc:
                return str(exc.code)
            await asyncio.sleep(0.005)


async def test_a_revocation_on_one_replica_reaches_the_other_at_once(
    replicas: Callable[..., Replica],
) -> None:
    async with replicas() as a, replicas() as b:
        plaintext, record = await a.keys.create("svc")
        assert await b.cache.authenticate(plaintext) is not None  # cached on b for 300 s
        await a.keys.revoke(record.id)
        assert await refused_within(lambda: b.cache.authenticate(plaintext)) == "key_revoked"


async def test_disable_and_rotate_are_announced_too(replicas: Callable[..., Replica]) -> None:
    async with replicas() as a, replicas() as b:
        plaintext, record = await a.keys.create("svc")
        assert await b.cache.authenticate(plaintext) is not None
        await a.keys.update(record.id, enabled=False)
        assert await refused_within(lambda: b.cache.authenticate(plaintext)) == "key_disabled"
        await a.keys.update(record.id, enabled=True)
        async with asyncio.timeout(2):
            while True:
                with contextlib.suppress(AuthenticationError):
                    if await b.cache.authenticate(plaintext) is not None:
                        break
                await asyncio.sleep(0.005)
        await a.keys.rotate(record.id)
        assert await refused_within(lambda: b.cache.authenticate(plaintext)) == "key_revoked"


async def test_an_unknown_message_clears_the_whole_cache(
    replicas: Callable[..., Replica], redis_client: Redis, channel: str
) -> None:
    async with replicas() as b:
        plaintext, _ = await b.keys.create("svc")
        await b.cache.authenticate(plaintext)
        assert len(b.cache) == 1
        await redis_client.publish(channel, "not-a-digest")
        await eventually(lambda: len(b.cache) == 0)
        await redis_client.publish(channel, digest("sk-tia-unrelated"))  # harmless


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not true within {timeout_s} s")


class TcpProxy:
    """A loopback TCP proxy to Redis that the test can cut and restore, like a Redis restart."""

    def __init__(self, target_port: int = 6379) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/15"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def proxy(redis_client: Redis) -> AsyncIterator[TcpProxy]:
    port = redis_client.connection_pool.connection_kwargs.get("port", 6379)
    proxy = TcpProxy(int(port))
    await proxy.start()
    yield proxy
    with contextlib.suppress(Exception):
        await proxy.cut()


async def test_after_an_outage_the_cache_is_cleared_since_messages_were_missed(
    replicas: Callable[..., Replica], proxy: TcpProxy
) -> None:
    async with replicas() as a, replicas(proxy.url) as b:
        plaintext, record = await a.keys.create("svc")
        assert await b.cache.authenticate(plaintext) is not None
        await proxy.cut()
        await eventually(lambda: not b.subscriber.subscribed.is_set())
        await a.keys.revoke(record.id)  # announced while b cannot hear it
        await asyncio.sleep(0.05)
        assert await b.cache.authenticate(plaintext) is not None  # the TTL is the bound meanwhile
        await proxy.start()
        await asyncio.wait_for(b.subscriber.subscribed.wait(), 5)
        assert b.subscriber.connections == 2
        with pytest.raises(AuthenticationError) as info:
            await b.cache.authenticate(plaintext)
        assert info.value.code == "key_revoked"


async def test_a_quiet_channel_is_pinged_not_dropped(
    sessions: Sessions, channel: str, redis_client: Redis
) -> None:
    cache = KeyCache(KeyService(sessions))
    subscriber = KeySubscriber(REDIS_URL, cache, channel=channel, ping_every_s=0.02)
    subscriber.start()
    try:
        await asyncio.wait_for(subscriber.subscribed.wait(), 5)
        await asyncio.sleep(0.3)  # fifteen ping intervals without a message
        assert subscriber.subscribed.is_set()
        assert subscriber.connections == 1
    finally:
        await subscriber.close()


def _shell(db_url: str, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": db_url}, "redis": {"url": redis_url}}))
    return Cli(config, capsys)


async def test_a_revocation_from_the_shell_is_announced(
    db_url: str, redis_client: Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _shell(db_url, REDIS_URL, tmp_path, capsys)
    created = await asyncio.to_thread(cli.json, "keys", "create", "--name", "shell")
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(CHANNEL)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        code, _, err = await asyncio.to_thread(cli, "keys", "revoke", created["id"])
        assert code == 0, err
        async with asyncio.timeout(5):
            while True:  # other test runs may announce their own keys on the channel
                message = await pubsub.get_message(timeout=1)
                if message is not None and message["data"] == digest(created["key"]).encode():
                    break


async def test_a_change_from_the_shell_is_saved_when_redis_is_down(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    cli = _shell(db_url, f"redis://127.0.0.1:{free_port()}/0", tmp_path, capsys)
    created = await asyncio.to_thread(cli.json, "keys", "create", "--name", "shell")
    with caplog.at_level(logging.WARNING, logger="tokyo_ia.keys"):
        revoked = await asyncio.to_thread(cli.json, "keys", "revoke", created["id"])
    assert revoked["status"] == "revoked"
    assert "other replicas could not be told" in caplog.text
    assert "key_cache_ttl_s" in caplog.text
