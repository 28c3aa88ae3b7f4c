"""In-process coalescing: one upstream call per key in flight, shared results, errors and
streams; cancellation never strands the remaining waiters."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tokyo_ia.cache import Coalescer, StreamLaggedError
from tokyo_ia.errors import UpstreamError


class Upstream:
    """A factory whose calls block until released, counting how often it was called."""

    def __init__(self, result: Any = "answer") -> None:
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.result = result

    async def __call__(self) -> Any:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_identical_calls_share_one_upstream_call() -> None:
    co, upstream = Coalescer(), Upstream({"ok": 1})
    tasks = [asyncio.create_task(co.run("k", upstream)) for _ in range(20)]
    await settle()
    upstream.release.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert all(r == {"ok": 1} for r in results)
    assert co.stats() == {"led": 1, "coalesced": 19, "in_flight": 0}


async def test_different_keys_and_later_calls_are_not_coalesced() -> None:
    co, upstream = Coalescer(), Upstream()
    upstream.release.set()
    await asyncio.gather(co.run("a", upstream), co.run("b", upstream))
    await co.run("a", upstream)
    assert upstream.calls == 3
    assert co.coalesced == 0


async def test_only_the_caller_whose_factory_ran_led() -> None:
    co, upstream = Coalescer(), Upstream()
    ran: list[int] = []

    def factory_for(i: int) -> Callable[[], Any]:
        async def factory() -> Any:
            ran.append(i)
            return await upstream()

        return factory

    tasks = [asyncio.create_task(co.run("k", factory_for(i))) for i in range(3)]
    await settle()
    upstream.release.set()
    await asyncio.gather(*tasks)
    assert ran == [0]


async def test_the_leaders_exception_reaches_every_follower() -> None:
    co = Coalescer()
    upstream = Upstream(UpstreamError("boom", provider="p"))
    tasks = [asyncio.create_task(co.run("k", upstream)) for _ in range(5)]
    await settle()
    upstream.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert upstream.calls == 1
    assert all(isinstance(r, UpstreamError) and r.message == "boom" for r in results)


async def test_a_cancelled_follower_does_not_cancel_the_call() -> None:
    co, upstream = Coalescer(), Upstream()
    leader = asyncio.create_task(co.run("k", upstream))
    follower = asyncio.create_task(co.run("k", upstream))
    await settle()
    follower.cancel()
    await settle()
    assert follower.cancelled()
    upstream.release.set()
    assert await leader == "answer"
    assert upstream.cancelled == 0


async def test_a_cancelled_leader_leaves_the_call_running_for_its_followers() -> None:
    co, upstream = Coalescer(), Upstream()
    leader = asyncio.create_task(co.run("k", upstream))
    await settle()
    followers = [asyncio.create_task(co.run("k", upstream)) for _ in range(3)]
    await settle()
    leader.cancel()
    await settle()
    assert leader.cancelled()
    assert upstream.cancelled == 0
    upstream.release.set()
    assert await asyncio.gather(*followers) == ["answer"] * 3
    assert upstream.calls == 1


async def test_the_call_is_cancelled_when_every_waiter_left() -> None:
    co, upstream = Coalescer(), Upstream()
    tasks = [asyncio.create_task(co.run("k", upstream)) for _ in range(3)]
    await settle()
    for task in tasks:
        task.cancel()
    await settle()
    assert upstream.cancelled == 1
    assert co.stats()["in_flight"] == 0
    fresh = Upstream()
    fresh.release.set()
    assert await co.run("k", fresh) == "answer"  # a new call, not the cancelled one


async def test_a_call_cancelled_from_inside_is_an_upstream_error_for_waiters() -> None:
    co = Coalescer()

    async def factory() -> str:
        raise asyncio.CancelledError

    with pytest.raises(UpstreamError, match="cancelled"):
        await co.run("k", factory)


async def test_clone_gives_followers_their_own_copy() -> None:
    co, upstream = Coalescer(clone=copy.deepcopy), Upstream({"choices": [1]})
    tasks = [asyncio.create_task(co.run("k", upstream)) for _ in range(3)]
    await settle()
    upstream.release.set()
    first, *others = await asyncio.gather(*tasks)
    assert first is upstream.result
    assert all(o == first and o is not first for o in others)


# --- streams -----------------------------------------------------------------------------------


class StreamUpstream:
    """An upstream stream whose chunks are released one at a time by the test."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n = n
        self.fail_after = fail_after
        self.calls = 0
        self.closed = 0
        self.gates = [asyncio.Event() for _ in range(n + 1)]

    def open(self, upto: int) -> None:
        for gate in self.gates[: upto + 1]:
            gate.set()

    def __call__(self) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        try:
            for i in range(self.n):
                await self.gates[i].wait()
                if self.fail_after is not None and i == self.fail_after:
                    raise UpstreamError("stream broke", provider="p")
                yield {"i": i}
        finally:
            self.closed += 1


async def collect(iterator: AsyncIterator[dict[str, Any]], out: list[int] | None = None) -> list[int]:
    out = [] if out is None else out
    async for chunk in iterator:
        out.append(chunk["i"])
    return out


async def test_stream_fan_out_to_concurrent_and_late_readers() -> None:
    co, upstream = Coalescer(), StreamUpstream(6)
    first = asyncio.create_task(collect(co.stream("k", upstream)))
    second = asyncio.create_task(collect(co.stream("k", upstream)))
    upstream.open(2)
    await settle()
    late = asyncio.create_task(collect(co.stream("k", upstream)))  # joins after 3 chunks
    await settle()
    upstream.open(6)
    assert list(await asyncio.gather(first, second, late)) == [list(range(6))] * 3
    assert upstream.calls == 1
    assert upstream.closed == 1
    assert co.stats() == {"led": 1, "coalesced": 2, "in_flight": 0}


async def test_stream_error_reaches_every_reader_after_its_chunks() -> None:
    co, upstream = Coalescer(), StreamUpstream(5, fail_after=2)
    seen: list[list[int]] = [[], []]
    tasks = [asyncio.create_task(collect(co.stream("k", upstream), seen[i])) for i in range(2)]
    upstream.open(5)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.message == "stream broke" for r in results)
    assert seen == [[0, 1], [0, 1]]
    assert upstream.calls == 1


async def test_a_reader_leaving_early_does_not_stop_the_others() -> None:
    co, upstream = Coalescer(), StreamUpstream(4)
    leader = co.stream("k", upstream)
    follower = asyncio.create_task(collect(co.stream("k", upstream)))
    upstream.open(0)
    assert await anext(leader) == {"i": 0}
    await leader.aclose()  # the first reader (client gone)
    upstream.open(4)
    assert await follower == [0, 1, 2, 3]
    assert upstream.calls == 1


async def test_cancelling_the_first_reader_task_keeps_the_stream_for_the_rest() -> None:
    co, upstream = Coalescer(), StreamUpstream(3)
    leader = asyncio.create_task(collect(co.stream("k", upstream)))
    await settle()
    follower = asyncio.create_task(collect(co.stream("k", upstream)))
    await settle()
    leader.cancel()
    await settle()
    upstream.open(3)
    assert await follower == [0, 1, 2]
    assert upstream.closed == 1


async def test_the_stream_stops_when_its_last_reader_leaves() -> None:
    co, upstream = Coalescer(), StreamUpstream(10)
    reader = co.stream("k", upstream)
    upstream.open(0)
    assert await anext(reader) == {"i": 0}
    await reader.aclose()
    await settle()
    assert upstream.closed == 1
    assert co.stats()["in_flight"] == 0


async def test_stream_memory_is_bounded_and_the_stream_closes_to_late_joiners() -> None:
    co, upstream = Coalescer(max_stream_chunks=4), StreamUpstream(20)
    fast: list[int] = []
    task = asyncio.create_task(collect(co.stream("k", upstream), fast))
    upstream.open(6)
    await settle()
    assert co.stats()["in_flight"] == 0  # past 4 chunks: no new reader may join
    other = StreamUpstream(2)
    other.open(2)
    assert await collect(co.stream("k", other)) == [0, 1]  # so this one made its own call
    upstream.open(20)
    assert await task == list(range(20))


async def test_a_reader_too_far_behind_is_cut_off() -> None:
    co, upstream = Coalescer(max_stream_chunks=3, lag_grace_s=0.05), StreamUpstream(12)
    slow = co.stream("k", upstream)
    fast = asyncio.create_task(collect(co.stream("k", upstream)))
    upstream.open(0)
    assert await anext(slow) == {"i": 0}  # then stalls
    upstream.open(12)
    assert await fast == list(range(12))
    with pytest.raises(StreamLaggedError):
        await collect(slow)
    assert upstream.calls == 1
