"""``tokyo-ia doctor``: can this gateway reach and use each configured provider?

For each provider: resolve its host (DNS), open a TCP connection and, for https, a TLS
handshake, then run the provider's own :meth:`~tokyo_ia.providers.base.Provider.check`,
the cheapest authenticated call that spends no tokens (listing models). Each failure says
which stage failed and why.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import Config
from .providers import registry
from .providers.base import CheckResult, Provider


@dataclass(slots=True)
class ProviderReport:
    name: str
    kind: str
    endpoint: str
    result: CheckResult


async def _network(endpoint: str, stage_timeout_s: float) -> CheckResult | None:
    """DNS, then TCP (and TLS for https). None when all of them succeed."""
    url = urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), stage_timeout_s)
    except (OSError, TimeoutError) as exc:
        return CheckResult(False, "dns", f"cannot resolve {host}: {exc or 'timed out'}")
    address = str(infos[0][4][0])
    tls = ssl.create_default_context() if url.scheme == "https" else None
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=tls, server_hostname=host if tls else None),
            stage_timeout_s,
        )
    except ssl.SSLError as exc:
        return CheckResult(False, "tls", f"TLS handshake with {host}:{port} failed: {exc}")
    except (OSError, TimeoutError) as exc:
        return CheckResult(False, "connect", f"cannot connect to {host}:{port}: {exc or 'timed out'}")
    writer.close()
    return None


async def check_provider(provider: Provider, stage_timeout_s: float = 5.0) -> CheckResult:
    endpoint = provider.endpoint
    if endpoint is not None:
        failed = await _network(endpoint, stage_timeout_s)
        if failed is not None:
            return failed
    await provider.start()
    try:
        return await asyncio.wait_for(provider.check(), stage_timeout_s * 2)
    except TimeoutError:
        return CheckResult(False, "auth", "the check call timed out")
    finally:
        await provider.close()


async def run_doctor(config: Config, stage_timeout_s: float = 5.0) -> list[ProviderReport]:
    providers = {name: registry.create(name, section) for name, section in config.providers.items()}
    results = await asyncio.gather(*(check_provider(p, stage_timeout_s) for p in providers.values()))
    return [
        ProviderReport(name, p.kind, p.endpoint or "(local)", result)
        for (name, p), result in zip(providers.items(), results, strict=True)
    ]


def format_table(reports: list[ProviderReport]) -> str:
    rows = [("provider", "kind", "endpoint", "status", "stage", "detail")]
    for r in reports:
        status = "ok" if r.result.ok else "FAIL"
        rows.append((r.name, r.kind, r.endpoint, status, r.result.stage, r.result.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows
    ]
    return "\n".join(lines)
