"""OpenTelemetry tracing behind a four-method facade, off by default.

Off (the default) means free: :func:`build_tracer` returns a :class:`Tracer` whose methods
return shared no-op objects, and nothing imports ``opentelemetry`` (an optional extra,
``pip install tokyo-ia[otel]``). On, each request is one SERVER span, continuing the client's
trace when it sent a W3C ``traceparent``, with children for routing, the cache and every
upstream attempt (CLIENT spans), and :meth:`Tracer.inject` hands the upstream a
``traceparent`` naming the attempt span. Spans go to an OTLP/HTTP collector in batches.

The facade exists so the pipeline never touches the OpenTelemetry API: a future exporter or
a different tracing library changes this file only.

Span tree for one request with one failover::

    POST /v1/chat/completions        (SERVER; the client's trace if it sent traceparent)
    ├── route
    ├── cache
    ├── upstream openai/gpt-4o-mini  (CLIENT, attempt 1, error)
    └── upstream anthropic/claude…   (CLIENT, attempt 2)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan

AttrValue = str | bool | int | float
Attrs = Mapping[str, AttrValue]

# Attribute names: OpenTelemetry GenAI and HTTP semantic conventions where they exist.
ATTR_REQUEST_ID = "tokyo_ia.request_id"
ATTR_ATTEMPT = "tokyo_ia.attempt"  # on an upstream span: which attempt of the request (1, 2...)
ATTR_ATTEMPTS = "tokyo_ia.attempts"  # on the request span: how many were made
ATTR_CANDIDATES = "tokyo_ia.route.candidates"  # on the route span: deployments in the order to try
ATTR_TTFT = "tokyo_ia.time_to_first_token_s"
ATTR_CACHE_RESULT = "tokyo_ia.cache.result"
ATTR_COST_USD = "tokyo_ia.cost_usd"
ATTR_MODEL = "gen_ai.request.model"
ATTR_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_PROVIDER = "gen_ai.provider.name"
ATTR_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_HTTP_STATUS = "http.response.status_code"
ATTR_HTTP_METHOD = "http.request.method"
ATTR_HTTP_ROUTE = "http.route"
ATTR_ERROR_TYPE = "error.type"

_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRACES_PATH = "/v1/traces"


class TracingSettings(BaseModel):
    """The ``tracing:`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    service_name: str = "tokyo-ia"
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (http://collector:4318); "
        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318",
    )
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of new traces kept")
    headers: dict[str, str] = Field(default_factory=dict, description="sent to the collector")


class Span:
    """What a stage may do with its span. This base class is the no-op used when tracing is off."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttrValue) -> None:
        return None

    def set_attributes(self, attrs: Attrs) -> None:
        return None

    def record_error(self, exc: BaseException) -> None:
        """Mark the span failed (for errors handled, not raised, inside the span)."""
        return None

    def set_http_status(self, status: int) -> None:
        """Record the response status; 5xx marks the span as an error."""
        return None

    @property
    def trace_id(self) -> str:
        """32 hex digits, for log correlation; empty when tracing is off."""
        return ""


NOOP_SPAN = Span()
_NOOP = contextlib.nullcontext(NOOP_SPAN)  # re-entrant: one object serves every call


class Tracer:
    """The tracing facade. This base class is the no-op one: every call returns shared objects."""

    enabled = False

    def request_span(
        self,
        name: str,
        traceparent: str | None = None,
        attrs: Attrs | None = None,
        *,
        tracestate: str | None = None,
    ) -> AbstractContextManager[Span]:
        """The root span of one request; ``traceparent``/``tracestate`` are the client's headers."""
        return _NOOP

    def child(
        self, name: str, attrs: Attrs | None = None, *, client: bool = False
    ) -> AbstractContextManager[Span]:
        """A child of the current span; ``client=True`` for calls that leave the process."""
        return _NOOP

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add ``traceparent`` (and ``tracestate``) for the current span to outgoing headers."""
        return None

    def shutdown(self) -> None:
        """Flush and stop the exporter (worker shutdown)."""
        return None


class _LiveSpan(Span):
    __slots__ = ("span",)

    def __init__(self, span: OtelSpan) -> None:
        self.span = span

    def set_attribute(self, key: str, value: AttrValue) -> None:
        self.span.set_attribute(key, value)

    def set_attributes(self, attrs: Attrs) -> None:
        self.span.set_attributes(attrs)

    def record_error(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.record_exception(exc)
        self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def set_http_status(self, status: int) -> None:
        self.span.set_attribute(ATTR_HTTP_STATUS, status)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR))

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")


class OtelTracer(Tracer):
    """Tracing on: an SDK ``TracerProvider`` owned by this object (the global one is untouched)."""

    enabled = True

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        from opentelemetry import context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if exporter is None:
            self._provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
        else:  # an explicit exporter is for tests and debugging: export each span at once
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("tokyo_ia")
        self._propagator = TraceContextTextMapPropagator()
        self._empty = context.Context
        self._server, self._client, self._internal = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL

    @contextlib.contextmanager
    def request_span(
        self,
        name: str,
        traceparent: str | None = None,
        attrs: Attrs | None = None,
        *,
        tracestate: str | None = None,
    ) -> Iterator[Span]:
        carrier = {}
        if traceparent:
            carrier["traceparent"] = traceparent
            if tracestate:
                carrier["tracestate"] = tracestate
        # An invalid traceparent extracts to an empty context: a new trace, as W3C requires.
        parent = self._propagator.extract(carrier) if carrier else self._empty()
        with self._tracer.start_as_current_span(name, parent, self._server, attrs) as span:
            yield _LiveSpan(span)

    @contextlib.contextmanager
    def child(self, name: str, attrs: Attrs | None = None, *, client: bool = False) -> Iterator[Span]:
        kind = self._client if client else self._internal
        with self._tracer.start_as_current_span(name, kind=kind, attributes=attrs) as span:
            yield _LiveSpan(span)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        self._propagator.inject(headers)

    def shutdown(self) -> None:
        self._provider.shutdown()


def traces_endpoint(settings: TracingSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The full OTLP/HTTP traces URL, or ``None`` to let the exporter read its environment."""
    env = os.environ if environ is None else environ
    base = settings.endpoint or env.get(_ENDPOINT_ENV)
    if not base:
        return None
    base = base.rstrip("/")
    return base if base.endswith(_TRACES_PATH) else base + _TRACES_PATH


def _otlp_exporter(settings: TracingSettings) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # the SDK is installed but not the exporter
        raise ImportError("tracing.enabled needs the OTLP exporter: pip install 'tokyo-ia[otel]'") from exc
    return OTLPSpanExporter(endpoint=traces_endpoint(settings), headers=settings.headers or None)


def build_tracer(settings: TracingSettings | None, exporter: SpanExporter | None = None) -> Tracer:
    """The tracer for this process: a no-op unless ``settings.enabled``.

    Raises :class:`~tokyo_ia.errors.ConfigError` when tracing is on but the ``otel`` extra
    is missing, so start-up fails with the fix instead of silently dropping traces.
    """
    if settings is None or not settings.enabled:
        return Tracer()
    try:
        return OtelTracer(settings, exporter)
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(
            f"tracing.enabled is true but OpenTelemetry is not installed ({exc}); "
            "pip install 'tokyo-ia[otel]' or set tracing.enabled: false"
        ) from None
