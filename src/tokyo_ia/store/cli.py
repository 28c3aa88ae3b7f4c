"""``tokyo-ia db ...`` and ``tokyo-ia keys ...``: the database and keys from a shell.

They work on the database named by ``store.url`` in the config (``--config``, else
``$TOKYO_IA_CONFIG``, else the embedded default ``./tokyo-ia.db``), so an operator can issue
the first admin key before any server runs. ``keys`` commands never migrate on their own: on
a database that is not at this version's schema they stop and print the ``db upgrade`` command,
because silently changing a shared production schema is not a side effect to hide in a list.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..config import load_config_or_default
from ..errors import ConfigError, GatewayError, InvalidRequestError
from ..security.keys import KeyRecord, KeyService
from .db import check_schema, create_engine, current_revision, head_revision, redact, session_factory, upgrade

Action = Callable[[KeyService, argparse.Namespace], Awaitable[Any]]
DatabaseAction = Callable[[async_sessionmaker[AsyncSession], argparse.Namespace], Awaitable[Any]]


def _database_error(url: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"cannot use the database {redact(url)} ({type(exc).__name__}: {exc}); check store.url "
        "and that the database server is running"
    )


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]], url: str) -> int:
    """Run one command; expected failures become one line on stderr, not a traceback."""
    try:
        return asyncio.run(coro_factory())
    except GatewayError as exc:
        print(f"tokyo-ia: error: {exc.message}", file=sys.stderr)
        return 1
    except (DBAPIError, OSError) as exc:
        raise _database_error(url, exc) from None


# -- db ---------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    url = load_config_or_default(args.config).store.url

    async def go() -> int:
        await upgrade(url)
        print(f"database {redact(url)} is at revision {head_revision()}")
        return 0

    return _run(go, url)


def cmd_db_current(args: argparse.Namespace) -> int:
    url = load_config_or_default(args.config).store.url

    async def go() -> int:
        engine = create_engine(url)
        try:
            current = await current_revision(engine)
        finally:
            await engine.dispose()
        head = head_revision()
        state = "up to date" if current == head else f"needs 'tokyo-ia db upgrade' to reach {head}"
        print(f"database {redact(url)}: revision {current or 'none'} ({state})")
        return 0 if current == head else 1

    return _run(go, url)


# -- keys -------------------------------------------------------------------------------


def database_command(action: DatabaseAction) -> Callable[[argparse.Namespace], int]:
    """A command that runs ``action`` on the config's database, refusing an unmigrated one.

    ``args.redis_url`` is set to the config's ``redis.url`` too (key commands announce changes).
    """

    def command(args: argparse.Namespace) -> int:
        config = load_config_or_default(args.config)
        url = config.store.url
        args.redis_url = config.redis.url

        async def go() -> int:
            engine = create_engine(url)
            try:
                await check_schema(engine)
                result = await action(session_factory(engine), args)
            finally:
                await engine.dispose()
            return int(result or 0)

        return _run(go, url)

    return command


def _keys_command(action: Action) -> Callable[[argparse.Namespace], int]:
    """Wrap an action so it gets a KeyService on the config's (migrated) database.

    With ``redis.url`` configured, revocations and rotations are announced to the running
    gateways (``security/keysync.py``), which then stop honouring the old key at once.
    """

    async def run(sessions: async_sessionmaker[AsyncSession], args: argparse.Namespace) -> Any:
        service = KeyService(sessions)
        if args.redis_url is None:
            return await action(service, args)
        from ..redis_client import connect
        from ..security.keysync import announcer

        redis = connect(args.redis_url)
        service.on_change(announcer(redis))
        try:
            return await action(service, args)
        finally:
            await redis.aclose()

    return database_command(run)


def _metadata(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequestError(f"--meta {pair!r}: write KEY=VALUE", param="metadata")
        out[key] = value
    return out


async def _create(service: KeyService, args: argparse.Namespace) -> int:
    plaintext, record = await service.create(
        args.name,
        owner=args.owner,
        team=args.team,
        models=args.model or ["*"],
        expires_at=args.expires_at,
        rpm=args.rpm,
        tpm=args.tpm,
        max_parallel=args.max_parallel,
        metadata=_metadata(args.meta),
        admin=args.admin,
        log_payloads=args.log_payloads,
    )
    _show_secret(plaintext, record, args.json)
    return 0


async def _list(service: KeyService, args: argparse.Namespace) -> int:
    records = await service.list(
        owner=args.owner, team=args.team, include_revoked=args.all, limit=args.limit, offset=args.offset
    )
    if args.json:
        print(orjson.dumps([r.to_dict() for r in records], option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(records))
    return 0


async def _get(service: KeyService, args: argparse.Namespace) -> int:
    _show(await service.get(args.id), args.json)
    return 0


async def _revoke(service: KeyService, args: argparse.Namespace) -> int:
    _show(await service.revoke(args.id), args.json)
    return 0


async def _rotate(service: KeyService, args: argparse.Namespace) -> int:
    plaintext, record = await service.rotate(args.id)
    _show_secret(plaintext, record, args.json)
    return 0


def _show(record: KeyRecord, as_json: bool) -> None:
    print(
        orjson.dumps(record.to_dict(), option=orjson.OPT_INDENT_2).decode()
        if as_json
        else render_table([record])
    )


def _show_secret(plaintext: str, record: KeyRecord, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps({**record.to_dict(), "key": plaintext}, option=orjson.OPT_INDENT_2).decode())
        return
    print(f"key: {plaintext}")
    print("     store it now: it is shown only once and cannot be recovered")
    print(render_table([record]))


_COLUMNS = ("ID", "NAME", "STATUS", "KEY", "OWNER", "TEAM", "MODELS", "RPM", "TPM", "PARALLEL", "EXPIRES")


def _row(r: KeyRecord) -> tuple[str, ...]:
    def opt(value: object) -> str:
        return "-" if value is None else str(value)

    expires = r.expires_at.strftime("%Y-%m-%d %H:%M") if r.expires_at else "-"
    name = r.name + (" (admin)" if r.admin else "")
    return (
        r.id,
        name,
        r.status(),
        r.display,
        opt(r.owner),
        opt(r.team),
        ",".join(r.models),
        opt(r.rpm),
        opt(r.tpm),
        opt(r.max_parallel),
        expires,
    )


def format_table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], empty: str) -> str:
    """``rows`` under ``columns`` in left-aligned columns for a terminal; ``empty`` if no rows."""
    if not rows:
        return empty
    table = [columns, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def render_table(records: Sequence[KeyRecord]) -> str:
    """Aligned columns for a terminal (names cannot hold control characters: see keys.py)."""
    return format_table(_COLUMNS, [_row(r) for r in records], "no keys")


# -- parser -----------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, json_option: bool = True) -> None:
    parser.add_argument("--config", help="YAML config file (default: $TOKYO_IA_CONFIG or embedded)")
    if json_option:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_db(subparsers: Any) -> None:
    db = subparsers.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate the database to this version's schema")
    _common(up, json_option=False)
    up.set_defaults(func=cmd_db_upgrade)
    current = db_sub.add_parser("current", help="show the database's schema revision")
    _common(current, json_option=False)
    current.set_defaults(func=cmd_db_current)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _add_create(keys_sub: Any) -> None:
    create = keys_sub.add_parser("create", help="issue a key (printed once)")
    _common(create)
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--owner")
    create.add_argument("--team")
    create.add_argument("--model", action="append", help="allowed model glob; repeat (default: *)")
    create.add_argument("--expires-at", help="ISO 8601 time, e.g. 2030-01-31T00:00:00Z")
    create.add_argument("--rpm", type=_int, help="requests per minute")
    create.add_argument("--tpm", type=_int, help="tokens per minute")
    create.add_argument("--max-parallel", type=_int, help="concurrent requests")
    create.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata; repeat")
    create.add_argument("--admin", action="store_true", help="may use the admin API")
    create.add_argument("--log-payloads", action="store_true", help="log request/response bodies")
    create.set_defaults(func=_keys_command(_create))


def _add_keys(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="virtual API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    _add_create(keys_sub)

    listing = keys_sub.add_parser("list", help="list keys")
    _common(listing)
    listing.add_argument("--owner")
    listing.add_argument("--team")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--limit", type=_int, default=100)
    listing.add_argument("--offset", type=_int, default=0)
    listing.set_defaults(func=_keys_command(_list))

    for name, action, text in (
        ("get", _get, "show one key"),
        ("revoke", _revoke, "revoke a key for good"),
        ("rotate", _rotate, "revoke a key and issue its replacement (printed once)"),
    ):
        sub = keys_sub.add_parser(name, help=text)
        _common(sub)
        sub.add_argument("id", help="key id (key_...)")
        sub.set_defaults(func=_keys_command(action))


def add_commands(subparsers: Any) -> None:
    """Add ``db`` and ``keys`` to the ``tokyo-ia`` parser (``subparsers`` from add_subparsers)."""
    _add_db(subparsers)
    _add_keys(subparsers)
