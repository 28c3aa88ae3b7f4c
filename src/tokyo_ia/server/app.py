"""The ASGI application: parse, call the pipeline, write JSON or SSE.

Plain ASGI rather than a framework: the hot path builds no request or response objects it
does not need. Every exception is turned into an error response by ``render_error`` (one
place); a stream that fails after its first byte ends with an error event instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..accounting.spend import parse_params, render_csv, report_document, spend_report
from ..config import Config, default_config, load_config
from ..errors import AuthenticationError, InvalidRequestError, NotFoundError, RequestTooLargeError
from ..gateway import Gateway
from ..observability.tracing import ATTR_HTTP_METHOD, ATTR_HTTP_ROUTE, ATTR_REQUEST_ID, Tracer
from ..pipeline import ChatStream, RequestContext
from ..security.audit import client_ip
from ..security.auth import digest
from ..security.payloads import Transcript
from .admin import PREFIX as ADMIN_KEYS_PREFIX
from .admin import AdminRoutes, query_params, require_admin
from .cors import Cors
from .errors import render_error, stream_error_event
from .headers import check_headers

log = logging.getLogger("tokyo_ia.server")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


GC_YOUNG_THRESHOLD = 20_000


class RawReply:
    """A non-JSON body (the Prometheus exposition)."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body, self.content_type = status, body, content_type


Reply = tuple[int, Any] | ChatStream | RawReply
Handler = Callable[["Request", RequestContext], Awaitable[Reply]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Security headers on every response: an API never needs to be framed, sniffed or cached.
_SECURITY_HEADERS: Headers = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]
_YES = (b"1", b"true", b"yes")
_HSTS: Headers = [(b"strict-transport-security", b"max-age=31536000")]
_NONE: Headers = []
_JSON_HEADERS: Headers = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    *_SECURITY_HEADERS,
]
_SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    *_SECURITY_HEADERS,
]


class MethodNotAllowedError(InvalidRequestError):
    status = 405
    code = "method_not_allowed"


class ClientDisconnected(Exception):
    """The client went away while we were reading its request."""


class Request:
    __slots__ = ("headers", "max_body", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive, max_body: int) -> None:
        self.scope = scope
        self.receive = receive
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.max_body = max_body

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None

    def api_key(self) -> str | None:
        auth = self.headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        key = self.headers.get(b"x-api-key")
        return key.decode("latin-1").strip() if key else None

    async def body(self) -> bytes:
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self) -> Any:
        raw = await self.body()
        if not raw:
            raise InvalidRequestError(
                "the request body is empty; send a JSON object", param="body", code="invalid_json"
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"the request body is not valid JSON ({exc}); send a UTF-8 JSON object",
                param="body",
                code="invalid_json",
            ) from None

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body is larger than {self.max_body} bytes; send less "
            "(or raise server.max_body_bytes)",
            param="body",
        )


def _request_id(request: Request) -> str:
    given = request.headers.get(b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    # 128 random bits as 32 hex digits, like uuid4().hex without a system call: an id must be
    # unique, not secret (nothing is authorised by knowing one).
    return f"{random.getrandbits(128):032x}"


async def _send_json(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_stream(
    send: Send, receive: Receive, stream: ChatStream, headers: Headers, request_id: str
) -> None:
    """Write a stream as SSE; a client that goes away cancels the upstream call."""
    await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *headers]})
    transcript = Transcript() if stream.ctx.request_body is not None else None  # log_payloads keys

    async def pump() -> None:
        try:
            async with contextlib.aclosing(stream.chunks()) as chunks:
                async for chunk in chunks:
                    if transcript is not None:
                        transcript.add(chunk)
                    body = b"data: " + orjson.dumps(chunk) + b"\n\n"
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            tail = b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - any failure ends the stream with an event
            tail = stream_error_event(exc, request_id)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    pump_task = asyncio.ensure_future(pump())
    watch_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((pump_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump_task, watch_task):
            if not task.done():
                task.cancel()
        for task in (pump_task, watch_task):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if transcript is not None:
            stream.ctx.response_body = transcript.response()


class GatewayApp:
    """The ASGI callable. One per worker process."""

    def __init__(self, config: Config, *, tracer: Tracer | None = None) -> None:
        self.config = config
        self.gateway = Gateway(config, tracer=tracer)
        self.pipeline = self.gateway.pipeline
        self.tracer = self.gateway.tracer
        self.max_body = config.server.max_body_bytes
        self.max_header_bytes = config.server.max_header_bytes
        self.admin_port = config.server.admin_port
        token = config.server.metrics_token
        self.metrics_digest = digest(token.get_secret_value()) if token is not None else None
        self.admin = AdminRoutes(self.gateway.keys)
        self.cors = Cors(config.server.cors)
        self.trusted_proxies = list(config.audit.trusted_proxies)
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/models": {"GET": self.models},
            "/health/live": {"GET": self.live},
            "/health/ready": {"GET": self.ready},
            "/admin/health": {"GET": self.admin_health},
            "/admin/cache": {"GET": self.admin_cache},
            "/admin/spend": {"GET": self.admin_spend},
            "/metrics": {"GET": self.metrics},
        }
        # Routes that own every path below them (any method): they dispatch further themselves.
        self.subtrees: list[tuple[str, Handler]] = [(ADMIN_KEYS_PREFIX, self.admin_keys)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, self.max_body)
        ctx = RequestContext(_request_id(request), request.api_key())
        path = ctx.route = scope["path"]
        audited = path.startswith(("/v1/", "/admin/"))
        if audited:
            ctx.client_ip = self._client_ip(scope, request)
        extra = _HSTS if scope.get("scheme") == "https" else _NONE
        if self.cors.enabled:
            origin = request.headers.get(b"origin")
            if scope["method"] == "OPTIONS" and b"access-control-request-method" in request.headers:
                allowed = self.cors.preflight(origin)
                status = 204 if allowed is not None else 403
                await _send_json(
                    send, status, b"", [(b"x-request-id", ctx.request_id.encode()), *(allowed or [])]
                )
                return
            extra = [*extra, *self.cors.headers(origin)]
        if not audited:
            await self._respond(request, ctx, send, extra)
            return
        metrics = self.gateway.metrics
        metrics.request_started()
        try:
            if self.tracer.enabled:
                sent = await self._traced(request, ctx, send, extra)
            else:
                sent = await self._respond(request, ctx, send, extra)
        finally:
            metrics.request_finished()  # after the last byte: a stream counts until it ends
        if sent is not None:
            self.pipeline.record(ctx, sent)

    async def _respond(self, request: Request, ctx: RequestContext, send: Send, extra: Headers) -> int | None:
        """Run the route's handler and write its reply or error: the status sent, or None when
        the client left before its request was read."""
        scope, path = request.scope, ctx.route
        try:
            check_headers(scope["headers"], self.max_header_bytes)
            if self.admin_port is not None:
                self._check_port(path, scope)
            reply = await self._resolve(path, scope["method"])(request, ctx)
        except ClientDisconnected:
            return None
        except Exception as exc:  # noqa: BLE001 - mapped to an error response in one place
            status, error_headers, body = render_error(exc, ctx.request_id)
            await _send_json(send, status, body, [*ctx.response_headers(), *error_headers, *extra])
        else:
            if isinstance(reply, RawReply):
                status = reply.status
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", reply.content_type.encode()), *extra],
                    }
                )
                await send({"type": "http.response.body", "body": reply.body})
            elif isinstance(reply, ChatStream):
                status = 200
                await _send_stream(
                    send, request.receive, reply, [*ctx.response_headers(), *extra], ctx.request_id
                )
            else:
                status, payload = reply
                await _send_json(send, status, orjson.dumps(payload), [*ctx.response_headers(), *extra])
        return status

    async def _traced(self, request: Request, ctx: RequestContext, send: Send, extra: Headers) -> int | None:
        """:meth:`_respond` inside the request's SERVER span, which continues the client's trace
        (``traceparent``) and ends after the last byte: a stream's span ends with the stream."""
        method, route = request.scope["method"], self._route_name(ctx.route)
        attrs = {ATTR_REQUEST_ID: ctx.request_id, ATTR_HTTP_METHOD: method, ATTR_HTTP_ROUTE: route}
        with self.tracer.request_span(
            f"{method} {route}",
            request.header(b"traceparent"),
            attrs,
            tracestate=request.header(b"tracestate"),
        ) as span:
            status = await self._respond(request, ctx, send, extra)
            span.set_attributes(ctx.span_attributes())
            if status is not None:
                span.set_http_status(status)
            return status

    def _route_name(self, path: str) -> str:
        """The route a path belongs to (bounded: ids in admin paths never name a span)."""
        route = path.rstrip("/") or "/"
        if route in self.routes:
            return route
        for prefix, _ in self.subtrees:
            if route == prefix or route.startswith(prefix + "/"):
                return prefix
        return "other"

    def _client_ip(self, scope: Scope, request: Request) -> str | None:
        peer = scope.get("client")
        forwarded = request.headers.get(b"x-forwarded-for")
        return client_ip(
            peer[0] if peer else None,
            forwarded.decode("latin-1") if forwarded is not None else None,
            self.trusted_proxies,
        )

    def _check_port(self, path: str, scope: Scope) -> None:
        """With ``server.admin_port``: /metrics and /admin/* only there, the API only elsewhere.

        A route on the wrong port is an unknown route, so the public port does not even tell
        that an admin API exists. Health checks answer on both.
        """
        server = scope.get("server")
        on_admin_port = server is not None and server[1] == self.admin_port
        if not path.startswith("/health/") and path.startswith(("/admin/", "/metrics")) != on_admin_port:
            raise _unknown_route(path)

    def _resolve(self, path: str, method: str) -> Handler:
        methods = self.routes.get(path.rstrip("/") or "/")
        if methods is None:
            for prefix, owner in self.subtrees:
                if path == prefix or path.startswith(prefix + "/"):
                    return owner
            raise _unknown_route(path)
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowedError(
                f"{method} is not allowed on {path}; use {', '.join(methods)}", code="method_not_allowed"
            )
        return handler

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                # What start-up built (modules, config, catalog, engines) lives as long as the
                # worker: move it out of the cyclic collector's reach, so a full collection only
                # walks what requests left behind (~100k objects and ~30 ms per full collection
                # before). Here, not in Gateway.start: only a server process owns its heap.
                gc.collect()
                gc.freeze()
                # The youngest generation is collected every GC_YOUNG_THRESHOLD allocations
                # (Python's default: 700). What a collection walks is the young objects still
                # alive (requests in flight, rows queued for the writers), not the ones already
                # freed, so rarer collections do the same walk far less often: measured on the
                # cache-hit path, 258 ms of collections per 44k requests with 700, 72 with 20,000.
                gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- handlers --------------------------------------------------------------------------

    async def chat_completions(self, request: Request, ctx: RequestContext) -> Reply:
        ctx.propagate = _propagated(request)
        body = await self.pipeline.prepare_chat(ctx, await request.json(), request.headers)
        ctx.include_cost = request.headers.get(b"x-tokyo-ia-include-cost", b"").lower() in _YES
        if ctx.principal is not None and ctx.principal.log_payloads:
            ctx.request_body = body
        if body.get("stream"):
            return await self.pipeline.chat_stream(ctx, body)
        answer = await self.pipeline.chat(ctx, body)
        if ctx.request_body is not None:
            ctx.response_body = answer
        return 200, answer

    async def embeddings(self, request: Request, ctx: RequestContext) -> Reply:
        ctx.propagate = _propagated(request)
        raw = await request.json()
        try:
            return 200, await self.pipeline.embeddings(ctx, raw)
        finally:
            if ctx.principal is not None and ctx.principal.log_payloads:
                ctx.request_body = raw  # the input only: vectors are not worth keeping

    async def models(self, request: Request, ctx: RequestContext) -> Reply:
        return 200, await self.pipeline.list_models(ctx)

    async def admin_keys(self, request: Request, ctx: RequestContext) -> Reply:
        await self.pipeline.authenticate(ctx)
        return await self.admin.dispatch(request.scope["method"], request.scope["path"], request, ctx)

    async def admin_health(self, request: Request, ctx: RequestContext) -> Reply:
        """Per deployment: circuit state, success ratio, latency percentiles, last check."""
        await self.pipeline.authenticate(ctx)
        require_admin(ctx)
        return 200, await self.gateway.health.snapshot()

    async def admin_spend(self, request: Request, ctx: RequestContext) -> Reply:
        """Spend from the ledger by key, team, model or day (?by= &since= &until= &format=csv)."""
        await self.pipeline.authenticate(ctx)
        require_admin(ctx)
        query, fmt = parse_params(query_params(request))
        rows = await spend_report(self.gateway.sessions, query)
        if fmt == "csv":
            return RawReply(200, render_csv(rows, query.by).encode(), "text/csv; charset=utf-8")
        return 200, report_document(rows, query)

    async def admin_cache(self, request: Request, ctx: RequestContext) -> Reply:
        """Hits, misses, coalesced requests, bytes, evictions, tokens and dollars saved."""
        await self.pipeline.authenticate(ctx)
        require_admin(ctx)
        cache = self.gateway.cache
        if cache is None:
            return 200, {"enabled": False}
        return 200, {"enabled": True, **(await cache.stats())}

    async def metrics(self, request: Request, ctx: RequestContext) -> Reply:
        """Prometheus exposition (no secrets, bounded labels); ``server.metrics_token`` guards it."""
        if self.metrics_digest is not None and not hmac.compare_digest(
            digest(ctx.api_key or ""), self.metrics_digest
        ):
            raise AuthenticationError(
                "/metrics needs the metrics token: send 'Authorization: Bearer <server.metrics_token>'",
                code="missing_api_key" if not ctx.api_key else "invalid_api_key",
            )
        self.gateway.sample_pools()
        body, content_type = self.gateway.metrics.render_metrics()
        return RawReply(200, body, content_type)

    async def live(self, request: Request, ctx: RequestContext) -> Reply:
        return 200, {"status": "live"}

    async def ready(self, request: Request, ctx: RequestContext) -> Reply:
        if not self.gateway.ready:
            return 503, {"status": "starting"}
        return 200, {"status": "ready", "models": len(self.gateway.catalog.names())}


def _unknown_route(path: str) -> NotFoundError:
    return NotFoundError(
        f"no route {path}; the API lives under /v1 (for example POST /v1/chat/completions)",
        code="unknown_route",
    )


def _propagated(request: Request) -> dict[str, str]:
    """Headers passed on to the upstream (W3C trace context)."""
    out = {}
    for name in (b"traceparent", b"tracestate"):
        value = request.headers.get(name)
        if value is not None:
            out[name.decode()] = value.decode("latin-1")
    return out


def create_app(config: Config) -> GatewayApp:
    return GatewayApp(config)


def create_app_from_env() -> GatewayApp:
    """App factory for ``uvicorn --factory`` and worker processes: reads TOKYO_IA_CONFIG."""
    from ..observability.logging import configure_logging

    configure_logging(
        os.environ.get("TOKYO_IA_LOG_LEVEL", "info"),
        os.environ.get("TOKYO_IA_LOG_FORMAT", "auto"),  # type: ignore[arg-type]
    )
    path = os.environ.get("TOKYO_IA_CONFIG")
    return GatewayApp(load_config(path) if path else default_config())
