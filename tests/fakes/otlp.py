"""A minimal OpenTelemetry collector: OTLP/HTTP ``POST /v1/traces`` (protobuf), spans kept.

Written from the OTLP/HTTP specification: the body is an ``ExportTraceServiceRequest``
(optionally gzip-encoded), the answer an empty ``ExportTraceServiceResponse`` with status 200.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .base import Emulator


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    kind: int  # opentelemetry.proto Span.SpanKind: 2 server, 3 client
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    service: str


class OTLPCollector(Emulator):
    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.spans: list[ExportedSpan] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    @property
    def exports(self) -> int:
        """How many export requests arrived."""
        return sum(1 for r in self.requests if r.path == "/v1/traces")

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ExportedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            service=resource.get("service.name", ""),
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


def _value(value: Any) -> object:
    """An OTLP ``AnyValue`` as a Python scalar."""
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None
