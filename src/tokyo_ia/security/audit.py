"""The append-only, tamper-evident audit trail (table ``audit_log``).

Why it is shaped like this:

- **Never on the hot path.** :meth:`AuditWriter.record` only appends to an in-memory deque; a
  background task writes batches, one transaction each, every ``flush_interval_s`` or as soon as
  ``batch_size`` events wait. :meth:`AuditWriter.close` drains the queue, so a SIGTERM (uvicorn's
  lifespan shutdown) loses nothing that was recorded.
- **Bounded memory.** When the database cannot keep up (or is down) and ``max_queue`` events
  wait, the *oldest* event is dropped: the caller must never block or fail because of auditing,
  and the newest events describe what is happening now. Drops are counted (``dropped``), logged
  at most every ``_WARN_EVERY_S`` seconds, and written into the trail itself as an
  ``audit.dropped`` event, so the gap is visible to anyone who reads or verifies the log.
- **Tamper-evident.** Each row's ``hash`` is the SHA-256 of its ``prev_hash`` followed by a
  canonical JSON of its fields (sorted keys, ``ts`` as ISO 8601 UTC with microseconds);
  ``prev_hash`` is the previous row's ``hash`` (the first row links to 64 zeros). Changing,
  deleting or re-hashing a row breaks the chain at that row, which :func:`verify` reports.
  Truncating the *tail* leaves a valid shorter chain: anchor ``VerifyReport.last_hash``
  somewhere else (a ticket, a log shipper) if that matters.
- **One chain across replicas.** Reading the last hash and inserting the batch happen in one
  transaction that holds a lock: ``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE``
  (the database write lock) on SQLite. Ids are assigned inside the lock, so id order is chain
  order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..store.models import AuditEntry, utcnow

log = logging.getLogger("tokyo_ia.audit")

GENESIS_HASH = "0" * 64
#: The advisory lock every replica takes to append ("tokyoaud" in ASCII; any constant would do).
ADVISORY_LOCK_ID = 0x746F6B796F617564
_WARN_EVERY_S = 10.0
_CLOSE_ATTEMPTS = 3
_VERIFY_PAGE = 1000
_INT32 = (-(2**31), 2**31 - 1)
#: Column widths (see store/models.py): longer values are cut so one event never poisons a batch.
_WIDTHS = {"actor_key_id": 128, "action": 64, "route": 256, "model": 256, "client_ip": 64}
_INTS = ("status", "tokens_in", "tokens_out")
#: The fields covered by the hash, in no particular order (the JSON is key-sorted).
HASHED_FIELDS = (
    "ts",
    "actor_key_id",
    "action",
    "route",
    "model",
    "status",
    "tokens_in",
    "tokens_out",
    "client_ip",
    "detail",
)

Row = dict[str, Any]


@dataclass(slots=True)
class AuditEvent:
    """One thing worth proving later: an API call (``action="request"``) or an admin action.

    ``actor_key_id`` is the key's id, never the key. ``detail`` holds e.g. ``request_id``,
    ``provider``, ``latency_ms``; put prompts and completions in it only for keys with
    ``log_payloads``. ``detail`` must be JSON-serialisable (orjson) and must not be mutated
    after :meth:`AuditWriter.record`, which keeps a reference rather than a copy.
    """

    action: str
    actor_key_id: str | None = None
    route: str | None = None
    model: str | None = None
    status: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    client_ip: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=utcnow)


# -- hashing ------------------------------------------------------------------------------


def _iso(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """The hash of a row given its predecessor's; ``row`` as stored (``ts`` a datetime)."""
    fields = {name: row.get(name) for name in HASHED_FIELDS}
    fields["ts"] = _iso(row["ts"])
    canonical = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def _clamp(value: int | None) -> int | None:
    return None if value is None else max(_INT32[0], min(_INT32[1], int(value)))


def _json_detail(detail: dict[str, Any] | None) -> Any:
    """``detail`` as it will be read back; never raises, so one odd value cannot block a batch."""
    try:
        return orjson.loads(orjson.dumps(detail or {}, default=str, option=orjson.OPT_NON_STR_KEYS))
    except orjson.JSONEncodeError as exc:
        return {"unserialisable_detail": str(exc)[:200]}


def _to_row(event: AuditEvent) -> Row:
    """The row as the database will give it back, so hashing now and re-hashing later agree.

    ``detail`` goes through an orjson round trip: it fixes the JSON form (PostgreSQL JSONB
    reorders keys and the hash sorts them anyway) and turns datetimes, tuples and other
    orjson-native types into what will be read back (anything else via ``str``). The timestamp is cut to microseconds,
    the precision both backends keep.
    """
    row: Row = {
        "ts": event.ts if event.ts.tzinfo else event.ts.replace(tzinfo=UTC),
        "action": event.action[: _WIDTHS["action"]],
        "detail": _json_detail(event.detail),
    }
    for name in ("actor_key_id", "route", "model", "client_ip"):
        value = getattr(event, name)
        row[name] = None if value is None else str(value)[: _WIDTHS[name]]
    for name in _INTS:
        row[name] = _clamp(getattr(event, name))
    row["ts"] = row["ts"].astimezone(UTC)
    return row


async def _lock_chain(session: AsyncSession) -> None:
    """Serialise appenders for the rest of this transaction (released at commit/rollback)."""
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
    else:
        # pysqlite opens transactions lazily, at the first write; the SELECT of the last hash
        # would run unlocked and two writers could fork the chain. Take the write lock first.
        await conn.exec_driver_sql("BEGIN IMMEDIATE")


async def append(sessions: async_sessionmaker[AsyncSession], rows: list[Row]) -> None:
    """Chain and insert ``rows`` in one locked transaction (the only writer of ``audit_log``)."""
    async with sessions() as session, session.begin():
        await _lock_chain(session)
        last = await session.scalar(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1))
        prev = last or GENESIS_HASH
        values = []
        for row in rows:
            digest = row_hash(prev, row)
            values.append({**row, "prev_hash": prev, "hash": digest})
            prev = digest
        await session.execute(insert(AuditEntry), values)


# -- the writer ---------------------------------------------------------------------------


class AuditWriter:
    """Queues events in memory and writes them in batches from a background task.

    Create it anywhere, call :meth:`start` inside the running event loop, :meth:`close` on
    shutdown. ``record`` works before ``start`` (events wait) and is a no-op counted as a drop
    after ``close``.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        batch_size: int = 200,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or flush_interval_s <= 0:
            raise ValueError("batch_size and max_queue must be >= 1 and flush_interval_s > 0")
        self._sessions = session_factory
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self._queue: deque[AuditEvent] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Events dropped since start, and the part not yet written into the trail.
        self.dropped = 0
        self._dropped_unreported = 0
        self._last_warning = float("-inf")
        #: Batches committed (one transaction each) and events written; for tests and metrics.
        self.batches_written = 0
        self.events_written = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, event: AuditEvent) -> None:
        """Queue ``event``; O(1), never blocks, never touches the database, never raises."""
        if self._closed:
            self._drop(1, "the audit writer is closed")
            return
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self._drop(1, f"the audit queue is full ({self.max_queue} events)")
        self._queue.append(event)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._dropped_unreported += count
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("audit events dropped: %s (%d dropped so far)", why, self.dropped)

    def start(self) -> None:
        """Start the background writer; call from inside the running event loop."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tokyo-ia-audit-writer")

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            if not await self.flush() and not self._closed:
                # Back off: during an outage every record() would wake us again at once.
                await asyncio.sleep(self.flush_interval_s)

    async def flush(self) -> bool:
        """Write everything queued now, batch by batch; False if the database refused a batch.

        A failed batch goes back to the front of the queue and is retried on the next tick, so
        a database outage delays the trail instead of losing it (up to ``max_queue`` events).
        """
        while self._queue or self._dropped_unreported:
            reported = self._dropped_unreported
            events = self._take_batch()
            try:
                await append(self._sessions, [_to_row(e) for e in events])
            except Exception:  # any failure (outage, bad row): keep the events, retry later
                log.exception("audit: writing %d events failed; will retry", len(events))
                self._dropped_unreported += reported
                self._requeue(events[1:] if reported else events)
                return False
            self.batches_written += 1
            self.events_written += len(events)
        return True

    def _take_batch(self) -> list[AuditEvent]:
        events: list[AuditEvent] = []
        if self._dropped_unreported:
            detail = {"count": self._dropped_unreported, "total": self.dropped}
            events.append(AuditEvent(action="audit.dropped", detail=detail))
            self._dropped_unreported = 0
        while self._queue and len(events) < self.batch_size:
            events.append(self._queue.popleft())
        return events

    def _requeue(self, events: list[AuditEvent]) -> None:
        room = self.max_queue - len(self._queue)
        if room < len(events):
            self._drop(len(events) - room, "the audit queue is full while the database is failing")
            events = events[len(events) - room :] if room > 0 else []
        self._queue.extendleft(reversed(events))

    async def close(self) -> None:
        """Stop the background task and write every queued event before returning."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        for attempt in range(_CLOSE_ATTEMPTS):
            if await self.flush():
                return
            await asyncio.sleep(min(self.flush_interval_s, 0.5) * (attempt + 1))
        lost = len(self._queue)
        self._queue.clear()
        self._drop(lost, "the database refused the last audit events at shutdown")
        log.error("audit: %d events could not be written at shutdown and are lost", lost)


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of walking the chain: ``ok`` with ``count`` rows, or the first broken row.

    ``count``, ``last_id`` and ``last_hash`` describe the intact prefix (all of it when ``ok``).
    """

    ok: bool
    count: int
    last_id: int | None = None
    last_hash: str = GENESIS_HASH
    broken_id: int | None = None
    reason: str | None = None


def _stored(entry: AuditEntry) -> Row:
    return {name: getattr(entry, name) for name in HASHED_FIELDS}


def _check(entry: AuditEntry, prev_id: int | None, prev_hash: str) -> str | None:
    """Why ``entry`` breaks the chain, or None. Content is checked before the link."""
    if row_hash(entry.prev_hash or "", _stored(entry)) != entry.hash:
        return "content changed: the stored hash does not match the record's fields"
    if entry.prev_hash == prev_hash:
        return None
    after = "the start of the log" if prev_id is None else f"record {prev_id}"
    missing = (
        "" if prev_id is None or entry.id == prev_id + 1 else f"; ids {prev_id + 1}..{entry.id - 1} absent"
    )
    return f"link broken: prev_hash does not match the hash of {after} (record deleted or altered{missing})"


async def verify(session_factory: async_sessionmaker[AsyncSession]) -> VerifyReport:
    """Walk the whole trail in id order, recomputing every hash and every link.

    Reads page by page, so memory stays flat on a large log. Rows appended while the walk
    runs are included if they land on a page not yet read; that never breaks the result.
    """
    count, prev_id, prev_hash = 0, None, GENESIS_HASH
    while True:
        async with session_factory() as session:
            query = select(AuditEntry).order_by(AuditEntry.id).limit(_VERIFY_PAGE)
            if prev_id is not None:
                query = query.where(AuditEntry.id > prev_id)
            page = list(await session.scalars(query))
        if not page:
            return VerifyReport(ok=True, count=count, last_id=prev_id, last_hash=prev_hash)
        for entry in page:
            reason = _check(entry, prev_id, prev_hash)
            if reason is not None:
                return VerifyReport(
                    ok=False,
                    count=count,
                    last_id=prev_id,
                    last_hash=prev_hash,
                    broken_id=entry.id,
                    reason=reason,
                )
            count, prev_id, prev_hash = count + 1, entry.id, entry.hash


# -- client address -----------------------------------------------------------------------

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def _parse_ip(text: str) -> _Address | None:
    """An address from an X-Forwarded-For hop, tolerating ``[v6]:port`` and ``v4:port``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: _Address | None, networks: Iterable[_Network]) -> bool:
    return address is not None and any(address in n for n in networks)


def client_ip(
    scope_client_host: str | None, forwarded_for_header: str | None, trusted_proxies: list[str]
) -> str:
    """The address of the real client, for the audit trail and per-IP decisions.

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy: anyone else
    can write anything in it. The header is walked right to left (each proxy appends the peer
    it saw), skipping trusted hops; the first untrusted address is the client. If a hop is not
    an address at all, the last trusted hop is the best we can vouch for. Pass several
    ``X-Forwarded-For`` headers joined with ``","``. Returns ``""`` when nothing is known.
    """
    peer = scope_client_host or ""
    networks = _networks(tuple(trusted_proxies))
    if not forwarded_for_header or not networks or not _trusted(_parse_ip(peer), networks):
        return peer
    vouched = peer
    for hop in reversed(forwarded_for_header.split(",")):
        if not hop.strip():
            continue
        address = _parse_ip(hop)
        if address is None:
            return vouched
        vouched = str(address)
        if not _trusted(address, networks):
            return vouched
    return vouched
