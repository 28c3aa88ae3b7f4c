"""The append-only, tamper-evident audit trail (table ``audit_log``).

Why it is shaped like this:

- **Never on the hot path, bounded, drained on shutdown.** :class:`AuditWriter` is a
  :class:`~tokyo_ia.store.batch.BatchWriter`: ``record`` only appends to a deque, a background
  task writes batches (one transaction each), ``close`` drains the queue, and a full queue drops
  the *oldest* event. Drops are also written into the trail itself as an ``audit.dropped``
  event, so the gap is visible to anyone who reads or verifies the log.
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

import functools
import hashlib
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from sqlalchemy import Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..store.batch import BatchWriter, slices
from ..store.models import AuditEntry, utcnow

# Core INSERT on the table (not the ORM-enabled one): no per-row ORM book-keeping.
_INSERT_AUDIT = insert(cast(Table, AuditEntry.__table__))
log = logging.getLogger("tokyo_ia.audit")

GENESIS_HASH = "0" * 64
#: The advisory lock every replica takes to append ("tokyoaud" in ASCII; any constant would do).
ADVISORY_LOCK_ID = 0x746F6B796F617564
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
        "ts": (event.ts if event.ts.tzinfo else event.ts.replace(tzinfo=UTC)).astimezone(UTC),
        "action": event.action[: _WIDTHS["action"]],
        "detail": _json_detail(event.detail),
    }
    for name in ("actor_key_id", "route", "model", "client_ip"):
        value = getattr(event, name)
        row[name] = None if value is None else str(value)[: _WIDTHS[name]]
    for name in _INTS:
        row[name] = _clamp(getattr(event, name))
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
        async for part in slices(rows):
            values = []
            for row in part:
                digest = row_hash(prev, row)
                values.append({**row, "prev_hash": prev, "hash": digest})
                prev = digest
            await session.execute(_INSERT_AUDIT, values)


# -- the writer ---------------------------------------------------------------------------


class AuditWriter(BatchWriter[AuditEvent]):
    """Queues events in memory and appends them to the chain in batches (store/batch.py).

    Create it anywhere, call :meth:`start` inside the running event loop, :meth:`close` on
    shutdown. ``record`` works before ``start`` (events wait) and is a no-op counted as a drop
    after ``close``. Drops are written into the trail as an ``audit.dropped`` event.
    """

    label = "audit"
    logger = log

    @property
    def events_written(self) -> int:
        return self.items_written

    async def write(self, items: list[AuditEvent]) -> None:
        rows: list[Row] = []
        async for part in slices(items):  # building rows is event-loop work: let requests in
            rows.extend(_to_row(e) for e in part)
        await append(self.sessions, rows)

    def drop_marker(self, count: int) -> AuditEvent:
        return AuditEvent(action="audit.dropped", detail={"count": count, "total": self.dropped})


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
