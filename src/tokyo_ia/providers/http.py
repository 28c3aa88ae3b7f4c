"""Upstream HTTP transport shared by the HTTP providers.

One connection pool (:class:`.wire.Pool`) per provider per process, with its limit,
keep-alive and timeouts from the provider's config. The client's exceptions are converted
into the gateway's exception tree here, where they enter, so no other module knows them.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from pydantic import SecretStr

from ..config import ProviderConfig
from ..errors import (
    ConfigError,
    UpstreamBadRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from .base import JSON, Call, CheckResult, PoolStats, Provider
from .wire import ConnectError, Pool, Response, WireError, encode_headers

# Statuses after which another attempt (or another deployment) may succeed.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


@dataclass(slots=True)
class SSEEvent:
    event: str
    data: str


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def error_for_status(
    provider: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
) -> UpstreamError:
    """Map an upstream error status to the gateway's exception tree.

    The caller's own mistakes (400, 413, 422) come back as 400 with the upstream's message;
    the gateway's credentials or catalog being wrong (401, 403, 404) is the operator's
    problem, so the client sees 502 with a message saying what to fix in the config.
    """
    text = f"provider '{provider}' returned {status}: {message}"
    if status in (400, 413, 422):
        return UpstreamBadRequestError(
            text, provider=provider, upstream_status=status, code=code or "upstream_bad_request"
        )
    if status == 429:
        return UpstreamRateLimitError(
            text, provider=provider, upstream_status=status, retry_after=retry_after, code=code
        )
    if status in (401, 403):
        return auth_error(provider, status, message)
    if status == 404:
        return UpstreamError(
            f"{text} (check the model name of this deployment in the models section)",
            provider=provider,
            upstream_status=status,
            code="upstream_not_found",
        )
    if status in (408, 504):
        return UpstreamTimeoutError(text, provider=provider, upstream_status=status, code=code)
    return UpstreamError(
        text,
        provider=provider,
        upstream_status=status,
        retryable=status in RETRYABLE_STATUSES,
        retry_after=retry_after,
        code=code or "upstream_error",
    )


def auth_error(provider: str, status: int, message: str) -> UpstreamError:
    """The upstream refused the gateway's own credentials: the operator's problem, not the caller's."""
    return UpstreamError(
        f"provider '{provider}' returned {status}: {message} (the gateway's credentials for "
        f"'{provider}' were refused; check providers.{provider}.api_key)",
        provider=provider,
        upstream_status=status,
        code="upstream_auth_failed",
    )


class HTTPTransport:
    """The connection pool of one provider, and the conversion of transport failures into the
    gateway's errors (:mod:`.wire` is the client; no other module sees its exceptions)."""

    def __init__(self, provider: str, config: ProviderConfig, base_url: str) -> None:
        self.provider = provider
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._pool: Pool | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        cfg = self.config
        self._pool = Pool(
            self.base_url,
            limit=cfg.max_connections,
            keepalive_s=cfg.keepalive_s,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def pool(self) -> PoolStats | None:
        """Connections in use and idle, and the pool's size."""
        return self._pool.stats() if self._pool is not None else None

    @property
    def connections(self) -> Pool:
        if self._pool is None:
            raise RuntimeError(f"provider '{self.provider}' was used before start()")
        return self._pool

    def _timeout(self, remaining: float | None) -> float:
        """The provider's total timeout, capped by what is left of the request's deadline."""
        timeout = self.config.timeout_s
        return timeout if remaining is None else max(0.001, min(timeout, remaining))

    def _convert(self, exc: BaseException) -> UpstreamError:
        where = f"provider '{self.provider}' at {self.base_url}"
        if isinstance(exc, TimeoutError):
            return UpstreamTimeoutError(
                f"{where} did not answer in time ({exc}); raise providers.{self.provider}.timeout_s "
                "(or server.request_timeout_s, the limit for the whole request) or try again",
                provider=self.provider,
            )
        if isinstance(exc, ConnectError):
            return UpstreamError(
                f"cannot connect to {where}: {exc.os_error or exc}; check that it is running "
                f"and that providers.{self.provider}.base_url is right",
                provider=self.provider,
                retryable=True,
                code="upstream_unreachable",
            )
        return UpstreamError(
            f"connection to {where} failed: {exc}",
            provider=self.provider,
            retryable=True,
            code="upstream_connection_error",
        )

    async def check(
        self,
        path: str,
        headers: bytes,
        to_error: Callable[[int, Mapping[str, str], bytes], UpstreamError],
    ) -> CheckResult:
        """GET a listing endpoint: proves reachability and credentials, spends no tokens."""
        started = time.monotonic()
        try:
            status, resp_headers, body = await self.request_json(
                "GET", path, headers=headers, remaining=self.config.connect_timeout_s * 2
            )
        except UpstreamError as exc:
            return CheckResult(False, "connect", exc.message, time.monotonic() - started)
        elapsed = time.monotonic() - started
        if status >= 400:
            error = to_error(status, resp_headers, body)
            auth = status in (401, 403) or error.code == "upstream_auth_failed"
            return CheckResult(False, "auth" if auth else "http", error.message, elapsed)
        return CheckResult(True, "ok", "listed models", elapsed)

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        payload: Any = None,
        headers: bytes = b"",
        remaining: float | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send a request and read the whole body. Raises only UpstreamError subclasses.

        ``headers``: :func:`~.wire.encode_headers` lines.
        """
        data = orjson.dumps(payload) if payload is not None else None
        try:
            resp = await self.connections.request(
                method, path, headers, data, within_s=self._timeout(remaining)
            )
            try:
                body = await resp.read()
            except BaseException:
                resp.close()
                raise
            resp.release()
            return resp.status, resp.headers, body
        except WireError as exc:
            raise self._convert(exc) from exc

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        path: str,
        *,
        payload: Any,
        headers: bytes = b"",
        remaining: float | None = None,
    ) -> AsyncIterator[Response]:
        """POST and hand back the open response; leaving the block releases the connection.

        If the block is left early (client gone, error), the connection is closed rather
        than returned to the pool, so an abandoned upstream stream stops at once.
        """
        try:
            resp = await self.connections.request(
                "POST", path, headers, orjson.dumps(payload), within_s=self._timeout(remaining)
            )
        except WireError as exc:
            raise self._convert(exc) from exc
        finished = False
        try:
            yield resp
            finished = True
        finally:
            if finished:
                resp.release()
            else:
                resp.close()

    async def read(self, resp: Response) -> bytes:
        """The rest of an open response's body (an error answer's, say)."""
        try:
            return await resp.read()
        except WireError as exc:
            raise self._convert(exc) from exc

    async def sse_events(self, resp: Response) -> AsyncIterator[SSEEvent]:
        """Parse a ``text/event-stream`` body into events (per the WHATWG SSE rules)."""
        event = ""
        data: list[str] = []
        try:
            async for raw in resp.iter_lines():
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield SSEEvent(event or "message", "\n".join(data))
                    event, data = "", []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
            if data:
                yield SSEEvent(event or "message", "\n".join(data))
        except WireError as exc:
            raise self._convert(exc) from exc


class HTTPProvider(Provider):
    """A provider that speaks HTTP: one pooled transport and a fixed set of request headers.

    Subclasses give their auth headers, how to read their error bodies (:meth:`_error`) and the
    listing path that :meth:`check` calls; posting, decoding, opening an SSE stream, start-up
    and shutdown are the same for every HTTP API and live here.
    """

    default_base_url: ClassVar[str] = ""
    check_path: ClassVar[str] = "/models"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.http = HTTPTransport(name, config, self._base_url(config))
        self._set_headers(config)

    def rotate_api_key(self, api_key: SecretStr) -> None:
        config = self.config.model_copy(update={"api_key": api_key})
        self._set_headers(config)  # a value that cannot be a header raises before anything changes
        self.config = config

    def _set_headers(self, config: ProviderConfig) -> None:
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "accept-encoding": "identity",
        }
        headers.update(self._auth_headers(config))
        headers.update({k.lower(): v for k, v in config.headers.items()})
        try:  # encoded once: a call only adds its own few (trace context)
            head = encode_headers(headers)
            sse_head = encode_headers({**headers, "accept": "text/event-stream"})
        except ValueError as exc:
            raise ConfigError(f"providers.{self.name}.headers: {exc}") from None
        self._headers, self._head, self._sse_head = headers, head, sse_head

    def _base_url(self, config: ProviderConfig) -> str:
        return config.base_url or self.default_base_url

    def _auth_headers(self, config: ProviderConfig) -> dict[str, str]:
        """Headers that authenticate every call (the API key's header, version pins...)."""
        return {}

    @abstractmethod
    def _error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        """The gateway error for an upstream error response (reads the provider's error body)."""

    @property
    def endpoint(self) -> str | None:
        return self.http.base_url

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    def pool(self) -> PoolStats | None:
        return self.http.pool()

    def _head_for(self, extra: Mapping[str, str], *, sse: bool = False) -> bytes:
        """The request's header lines: the fixed ones plus the call's (which win a clash)."""
        head = self._sse_head if sse else self._head
        if not extra:
            return head
        if self._headers.keys() & extra.keys():
            merged = {**self._headers, **extra}
            if sse:
                merged["accept"] = "text/event-stream"
            return encode_headers(merged)
        return head + encode_headers(extra)

    def _decode(self, body: bytes) -> JSON:
        """A response body that must be a JSON object; anything else is the upstream's fault."""
        try:
            value: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise UpstreamError(
                f"provider '{self.name}' sent a body that is not a JSON object: {body[:200]!r}",
                provider=self.name,
                code="upstream_bad_response",
            )
        return value

    async def _post(self, path: str, payload: JSON, call: Call) -> JSON:
        """POST within the call's deadline; an error status raises, a success is decoded."""
        status, headers, body = await self.http.request_json(
            "POST", path, payload=payload, headers=self._head_for(call.headers), remaining=call.remaining()
        )
        if status >= 400:
            raise self._error(status, headers, body)
        return self._decode(body)

    @contextlib.asynccontextmanager
    async def _sse(self, path: str, payload: JSON, call: Call) -> AsyncIterator[AsyncIterator[SSEEvent]]:
        """Open a streamed POST and hand back its events; an error status raises first."""
        headers = self._head_for(call.headers, sse=True)
        async with self.http.open_stream(
            path, payload=payload, headers=headers, remaining=call.remaining()
        ) as resp:
            if resp.status >= 400:
                raise self._error(resp.status, resp.headers, await self.http.read(resp))
            yield self.http.sse_events(resp)

    def _check_path(self) -> str:
        return self.check_path

    async def check(self) -> CheckResult:
        """List models: proves reachability and credentials, spends no tokens."""
        return await self.http.check(self._check_path(), self._head, self._error)
