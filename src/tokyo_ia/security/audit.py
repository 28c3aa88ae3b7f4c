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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from sqlalchemy import Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from ..store.batch import BatchWriter, cut_text, slices, sqlite_datetime, sqlite_insert
from ..store.models import AuditEntry, utcnow

_TABLE = cast(Table, AuditEntry.__table__)
#: The fields covered by the hash (its JSON is key-sorted, so their order does not matter
#: there), in the order :func:`_prepare` gives a row's values.
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
#: The columns written, in the order of a row's values.
_COLUMNS = (*HASHED_FIELDS, "prev_hash", "hash")
# Core INSERT on the table (not the ORM-enabled one): no per-row ORM book-keeping.
_INSERT_AUDIT = insert(_TABLE)
_SQLITE_INSERT = sqlite_insert(_TABLE, _COLUMNS)
_LAST_HASH = select(_TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1)
log = logging.getLogger("tokyo_ia.audit")

GENESIS_HASH = "0" * 64
#: The advisory lock every replica takes to append ("tokyoaud" in ASCII; any constant would do).
ADVISORY_LOCK_ID = 0x746F6B796F617564
_VERIFY_PAGE = 1000
_INT32 = (-(2**31), 2**31 - 1)

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


def _canonical(fields: dict[str, Any]) -> bytes:
    """The bytes a row's hash covers after its predecessor's hash: ``fields`` (the
    :data:`HASHED_FIELDS`, ``ts`` a datetime) as key-sorted JSON, ``ts`` spelled by :func:`_iso`.

    Stored chains depend on these exact bytes: any change here breaks every existing trail.
    ``fields`` is used up (its ``ts`` may be replaced).
    """
    ts = fields["ts"]
    # orjson spells an exact ``datetime`` in UTC with microseconds as isoformat() does, at a
    # fifth of the cost; it leaves ".000000" out, hence the fallback (tests hold the two equal).
    if type(ts) is not datetime or ts.tzinfo is not UTC or not ts.microsecond:
        fields["ts"] = _iso(ts)
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def _link(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """The hash of a row given its predecessor's; ``row`` as stored (``ts`` a datetime)."""
    return _link(prev_hash, _canonical({name: row.get(name) for name in HASHED_FIELDS}))


def _clamp(value: int | None) -> int | None:
    if type(value) is int and _INT32[0] <= value <= _INT32[1]:
        return value  # the common case, without the calls below (this runs three times a row)
    return None if value is None else max(_INT32[0], min(_INT32[1], int(value)))


def _json_detail(detail: dict[str, Any] | None) -> tuple[Any, bytes]:
    """``detail`` as it will be read back, and its JSON (what orjson writes for that value
    again); never raises, so one odd value cannot block a batch.

    Floats of magnitude 1e16 and more (orjson writes them with an exponent) are kept as their
    JSON text: PostgreSQL's JSONB stores numbers as decimals and gives ``1e16`` back as
    ``10000000000000000``, an int of another spelling (beyond 64 bits for larger ones), so the
    row would no longer hash as it did when written.
    """
    try:
        raw = orjson.dumps(detail or {}, default=str, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        raw = orjson.dumps({"unserialisable_detail": str(exc)[:200]})
    value = orjson.loads(raw)
    if _EXPONENT.search(raw):  # rare (also matches such text inside strings: then no change)
        value = _big_floats_as_text(value)
        raw = orjson.dumps(value)
    return value, raw


_EXPONENT = re.compile(rb"[0-9]e\+")
"""A positive exponent, as orjson writes floats of magnitude 1e16 and more."""


def _big_floats_as_text(value: Any) -> Any:
    if isinstance(value, float):
        return orjson.dumps(value).decode() if abs(value) >= 1e16 else value
    if isinstance(value, dict):
        return {k: _big_floats_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_big_floats_as_text(v) for v in value]
    return value


def _prepare(event: AuditEvent, sqlite: bool) -> tuple[tuple[Any, ...], bytes]:
    """The row's values in :data:`_COLUMNS` order up to the two hashes, and the bytes its hash
    covers (:func:`_canonical`).

    The values are the row as the database will give it back, so hashing now and re-hashing
    later agree. ``detail`` goes through an orjson round trip: it fixes the JSON form
    (PostgreSQL JSONB reorders keys and the hash sorts them anyway) and turns datetimes, tuples
    and other orjson-native types into what will be read back (anything else via ``str``). The
    timestamp is cut to microseconds, the precision both backends keep. On SQLite ``ts`` and
    ``detail`` are the text SQLAlchemy's column types would bind (store/batch.py): the row goes
    straight to ``executemany``. (The JSON is orjson's compact spelling of the same value.)
    """
    ts = event.ts
    ts = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).astimezone(UTC)
    actor_key_id = cut_text(event.actor_key_id, 128)
    action = event.action[:64]
    route = cut_text(event.route, 256)
    model = cut_text(event.model, 256)
    status = _clamp(event.status)
    tokens_in = _clamp(event.tokens_in)
    tokens_out = _clamp(event.tokens_out)
    client_ip = cut_text(event.client_ip, 64)
    detail, detail_json = _json_detail(event.detail)
    canonical = _canonical(
        {
            "ts": ts,
            "actor_key_id": actor_key_id,
            "action": action,
            "route": route,
            "model": model,
            "status": status,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "client_ip": client_ip,
            "detail": detail,
        }
    )
    values: tuple[Any, ...]
    if sqlite:
        values = (
            sqlite_datetime(ts),
            actor_key_id,
            action,
            route,
            model,
            status,
            tokens_in,
            tokens_out,
            client_ip,
            detail_json.decode(),
        )
    else:
        values = (ts, actor_key_id, action, route, model, status, tokens_in, tokens_out, client_ip, detail)
    return values, canonical


async def _lock_chain(conn: AsyncConnection) -> None:
    """Serialise appenders for the rest of this transaction (released at commit/rollback)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
    elif getattr(conn, "write_locked", False):
        return  # an inline SQLite transaction (store/inline.py) begins with the write lock
    else:
        # pysqlite opens transactions lazily, at the first write; the SELECT of the last hash
        # would run unlocked and two writers could fork the chain. Take the write lock first.
        await conn.exec_driver_sql("BEGIN IMMEDIATE")


async def append(sessions: async_sessionmaker[AsyncSession], events: list[AuditEvent]) -> None:
    """Chain and insert ``events`` in one locked transaction (the only writer of ``audit_log``).

    Rows are built slice by slice inside the transaction: building is event-loop work, and
    each slice ends with a loop turn (:func:`~tokyo_ia.store.batch.slices`).
    """
    async with sessions() as session, session.begin():
        conn = await session.connection()
        sqlite = conn.dialect.name == "sqlite"
        await _lock_chain(conn)
        prev = await session.scalar(_LAST_HASH) or GENESIS_HASH
        async for part in slices(events):
            rows = []
            for event in part:
                values, canonical = _prepare(event, sqlite)
                digest = _link(prev, canonical)
                rows.append((*values, prev, digest))
                prev = digest
            if sqlite:  # the lean path (store/batch.py)
                await conn.exec_driver_sql(_SQLITE_INSERT, rows)
            else:
                await conn.execute(_INSERT_AUDIT, [dict(zip(_COLUMNS, row, strict=True)) for row in rows])


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
        await append(self.sessions, items)

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
    try:
        content_hash = row_hash(entry.prev_hash or "", _stored(entry))
    except TypeError as exc:  # a detail JSON cannot spell again, e.g. an int past 64 bits
        return f"content cannot be hashed again ({exc}): its detail is not what was written"
    if content_hash != entry.hash:
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
