"""``tokyo-ia audit verify`` and ``tokyo-ia audit tail``: the audit trail from a shell.

They read the database named by ``store.url`` (``--config``, else ``$TOKYO_IA_CONFIG``, else
the embedded default), like ``tokyo-ia keys``, and never migrate it. ``verify`` exits 1 when
the chain is broken, so a cron job or a CI step can alert on it.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..store.cli import database_command, format_table
from ..store.models import AuditEntry
from .audit import verify


async def _verify(sessions: async_sessionmaker[AsyncSession], args: argparse.Namespace) -> int:
    report = await verify(sessions)
    if report.ok:
        print(f"ok: {report.count} records, chain intact")
        if report.count:
            print(f"last record {report.last_id}, hash {report.last_hash}")
        return 0
    print(f"TAMPERED: record {report.broken_id}: {report.reason}")
    print(f"({report.count} records before it verified)")
    return 1


def _as_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "ts": entry.ts.isoformat(timespec="microseconds"),
        "actor_key_id": entry.actor_key_id,
        "action": entry.action,
        "route": entry.route,
        "model": entry.model,
        "status": entry.status,
        "tokens_in": entry.tokens_in,
        "tokens_out": entry.tokens_out,
        "client_ip": entry.client_ip,
        "detail": entry.detail,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


_COLUMNS = ("ID", "TIME (UTC)", "ACTOR", "ACTION", "ROUTE", "MODEL", "STATUS", "IN", "OUT", "CLIENT")


def _cells(e: AuditEntry) -> tuple[str, ...]:
    def opt(value: object) -> str:
        # Control characters could rewrite the terminal; a log line is data, not markup.
        return "-" if value is None else "".join(c if c.isprintable() else "?" for c in str(value))

    ts = e.ts.strftime("%Y-%m-%d %H:%M:%S")
    values = (e.actor_key_id, e.action, e.route, e.model, e.status, e.tokens_in, e.tokens_out, e.client_ip)
    return (str(e.id), ts, *(opt(v) for v in values))


def render_table(entries: list[AuditEntry]) -> str:
    return format_table(_COLUMNS, [_cells(e) for e in entries], "no audit records")


async def _tail(sessions: async_sessionmaker[AsyncSession], args: argparse.Namespace) -> int:
    async with sessions() as session:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(args.n)
        entries = list(reversed(list(await session.scalars(query))))
    if args.json:
        print(orjson.dumps([_as_dict(e) for e in entries], option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(entries))
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("-n must be at least 1")
    return value


def add_commands(subparsers: Any) -> None:
    """Add ``audit`` to the ``tokyo-ia`` parser (``subparsers`` from add_subparsers)."""
    audit = subparsers.add_parser("audit", help="the tamper-evident audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    config_help = "YAML config file (default: $TOKYO_IA_CONFIG or embedded)"

    check = audit_sub.add_parser("verify", help="recompute the hash chain; exit 1 if tampered")
    check.add_argument("--config", help=config_help)
    check.set_defaults(func=database_command(_verify))

    tail = audit_sub.add_parser("tail", help="show the newest records")
    tail.add_argument("--config", help=config_help)
    tail.add_argument("-n", type=_count, default=20, help="how many records (default: 20)")
    tail.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tail.set_defaults(func=database_command(_tail))
