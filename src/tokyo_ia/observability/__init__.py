"""Metrics (Prometheus), structured logs (structlog) and traces (OpenTelemetry, optional).

Importing this package never imports ``opentelemetry``: tracing loads it only when enabled.
"""

from .logging import access_log, bind_request, configure_logging, redact
from .metrics import METRIC_NAMES, Metrics, reap_dead_workers, setup_multiprocess_dir
from .tracing import NOOP_SPAN, Span, Tracer, TracingSettings, build_tracer

__all__ = [
    "METRIC_NAMES",
    "NOOP_SPAN",
    "Metrics",
    "Span",
    "Tracer",
    "TracingSettings",
    "access_log",
    "bind_request",
    "build_tracer",
    "configure_logging",
    "reap_dead_workers",
    "redact",
    "setup_multiprocess_dir",
]
