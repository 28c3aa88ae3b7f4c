"""The ``tokyo-ia`` command."""

from __future__ import annotations

import argparse
import asyncio
import copy
import inspect
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, load_config_or_default
from .errors import ConfigError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _banner(config: Config, host: str, port: int, workers: int, source: str, *, tls: bool = False) -> str:
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    lines = [
        f"Tokyo-IA {__version__} listening on {scheme}://{shown_host}:{port} "
        f"({workers} worker{'s' if workers > 1 else ''}, config: {source})",
        "models:",
    ]
    for public, deployments in config.models.items():
        route = " -> ".join(f"{d.provider}/{d.model}" for d in deployments)
        lines.append(f"  {public:<24} {route}")
    admin_port = config.server.admin_port
    if admin_port is not None:
        admin_host = config.server.admin_host or host
        shown_admin = f"[{admin_host}]" if ":" in admin_host else admin_host
        lines.append(f"admin: /admin/* and /metrics only on {scheme}://{shown_admin}:{admin_port}")
    if not config.auth.enabled:
        lines.append(
            "auth: OFF (no master key or keys configured) - open to anyone who can reach "
            f"{shown_host}:{port}; set auth.master_key to require keys"
        )
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    config = load_config_or_default(args.config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    tls_cert = args.tls_cert or config.server.tls_cert
    tls_key = args.tls_key or config.server.tls_key
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
    insecure = args.insecure or config.server.insecure
    if not config.auth.enabled and not _is_loopback(host) and not insecure:
        raise ConfigError(
            f"refusing to listen on {host} with no authentication configured: anyone on the "
            "network could use your providers. Set auth.master_key (or auth.keys), bind "
            "127.0.0.1, or pass --insecure if this is really what you want"
        )
    source = (
        str(Path(args.config).resolve())
        if args.config
        else (os.environ.get("TOKYO_IA_CONFIG") or "embedded default")
    )
    if config.store.url.startswith("sqlite"):
        # The embedded database migrates itself, once, before any worker starts.
        from .store.db import upgrade

        asyncio.run(upgrade(config.store.url))
    print(_banner(config, host, port, workers, source, tls=tls_cert is not None), flush=True)
    from .observability.logging import configure_logging
    from .observability.metrics import setup_multiprocess_dir
    from .server.protocol import LIMIT_ENV, HttpProtocol

    os.environ[LIMIT_ENV] = str(config.server.max_header_bytes)
    os.environ["TOKYO_IA_LOG_LEVEL"] = args.log_level
    os.environ["TOKYO_IA_LOG_FORMAT"] = args.log_format
    configure_logging(args.log_level, args.log_format)
    setup_multiprocess_dir(workers)
    common = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": HttpProtocol,
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        # X-Forwarded-For is read by the app itself, against audit.trusted_proxies only.
        "proxy_headers": False,
        "log_level": args.log_level,
        "log_config": None,
        "timeout_graceful_shutdown": config.server.graceful_timeout_s,
        "ssl_certfile": tls_cert,
        "ssl_keyfile": tls_key,
    }
    app: Any
    if workers > 1:
        if args.config:
            os.environ["TOKYO_IA_CONFIG"] = str(Path(args.config).resolve())
        app, common = "tokyo_ia.server:create_app_from_env", {**common, "factory": True, "workers": workers}
    else:
        from .server import create_app

        app = create_app(config)
    if config.server.admin_port is None:
        uvicorn.run(app, **common)
        return 0
    return _serve_with_admin_port(
        uvicorn.Config(app, **common), config.server.admin_host or host, config.server.admin_port
    )


def _serve_with_admin_port(uv: Any, admin_host: str, admin_port: int) -> int:
    """``uvicorn.run``, except that every worker serves two sockets: the public and the admin port.

    Both sockets are bound here, once, and handed to the workers, which is what uvicorn itself
    does with its one socket; so it works for any number of workers, and each worker's app
    tells the ports apart by the request's ``scope["server"]`` (``server/app.py``).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    admin_config = copy.copy(uv)
    admin_config.host, admin_config.port = admin_host, admin_port
    sockets = [uv.bind_socket(), admin_config.bind_socket()]
    server = uvicorn.Server(uv)
    if uv.workers > 1:
        supervisor: Any = Multiprocess
        if "target" in inspect.signature(supervisor).parameters:  # uvicorn before the 0.3x rework
            supervisor(uv, target=server.run, sockets=sockets).run()
        else:
            supervisor(uv, sockets=sockets).run()
        return 0
    server.run(sockets=sockets)
    return 0 if server.started else 3  # uvicorn's exit status for a failed start-up


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config_or_default(args.config)
    print(f"ok: {len(config.providers)} providers, {len(config.models)} models")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_table, run_doctor

    reports = asyncio.run(run_doctor(load_config_or_default(args.config), stage_timeout_s=args.timeout))
    print(format_table(reports))
    return 0 if all(r.result.ok for r in reports) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokyo-ia", description="Self-hosted AI gateway")
    parser.add_argument("--version", action="version", version=f"tokyo-ia {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gateway")
    serve.add_argument("--config", help="YAML config file (default: $TOKYO_IA_CONFIG or embedded)")
    serve.add_argument("--host", help="address to bind (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: server.port, 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.add_argument("--insecure", action="store_true", help="allow a public bind without auth")
    serve.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (default: server.tls_cert)")
    serve.add_argument("--tls-key", help="PEM private key (default: server.tls_key)")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: console on a terminal, JSON otherwise",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", help="YAML config file (default: $TOKYO_IA_CONFIG or embedded)")
    check.set_defaults(func=cmd_check)

    doctor = sub.add_parser("doctor", help="check DNS, TCP/TLS and auth of every provider")
    doctor.add_argument("--config", help="YAML config file (default: $TOKYO_IA_CONFIG or embedded)")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per stage")
    doctor.set_defaults(func=cmd_doctor)

    from .accounting.spend_cli import add_commands as add_spend_commands
    from .cache.warm import add_commands as add_cache_commands
    from .security.audit_cli import add_commands as add_audit_commands
    from .store.cli import add_commands

    add_commands(sub)
    add_audit_commands(sub)
    add_spend_commands(sub)
    add_cache_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"tokyo-ia: error: {exc}", file=sys.stderr)
        return 2
