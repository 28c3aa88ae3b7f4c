"""``tokyo-ia spend``: the spend ledger by key, team, model or day, from a shell.

It reads the database named by ``store.url`` (``--config``, else ``$TOKYO_IA_CONFIG``, else the
embedded default), like ``tokyo-ia keys``, and never migrates it. Rows reach the ledger up to
``ledger.flush_interval_s`` after a request finishes (and all of them on shutdown).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..errors import InvalidRequestError
from ..store.cli import database_command
from .spend import (
    GROUPS,
    SpendQuery,
    check_window,
    parse_time,
    render_csv,
    render_table,
    report_document,
    spend_report,
)


async def _report(sessions: async_sessionmaker[AsyncSession], args: argparse.Namespace) -> int:
    check_window(args.since, args.until)
    query = SpendQuery(
        by=args.by, since=args.since, until=args.until, key=args.key, team=args.team, model=args.model
    )
    rows = await spend_report(sessions, query)
    if args.format == "json":
        print(orjson.dumps(report_document(rows, query), option=orjson.OPT_INDENT_2).decode())
    elif args.format == "csv":
        print(render_csv(rows, query.by), end="")
    else:
        print(render_table(rows, query.by))
    return 0


def _time(name: str, *, end: bool = False) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        try:
            return parse_time(text, name, end=end)
        except InvalidRequestError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse


def add_commands(subparsers: Any) -> None:
    """Add ``spend`` to the ``tokyo-ia`` parser (``subparsers`` from add_subparsers)."""
    spend = subparsers.add_parser("spend", help="spend by key, team, model or day (the spend ledger)")
    spend.add_argument("--config", help="YAML config file (default: $TOKYO_IA_CONFIG or embedded)")
    spend.add_argument("--by", choices=GROUPS, default="model", help="group rows by (default: model)")
    spend.add_argument("--since", type=_time("since"), help="from this UTC date/time on (YYYY-MM-DD)")
    spend.add_argument(
        "--until", type=_time("until", end=True), help="up to this UTC date, included (YYYY-MM-DD)"
    )
    spend.add_argument("--key", help="only this key id (key_..., static:NAME, master)")
    spend.add_argument("--team", help="only this team")
    spend.add_argument("--model", help="only this public model name")
    spend.add_argument("--format", choices=("table", "json", "csv"), default="table")
    spend.set_defaults(func=database_command(_report))
