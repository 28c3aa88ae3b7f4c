"""Prometheus metrics: one :class:`Metrics` per worker process, one method per event.

Names follow the wire contract (DESIGN.md): prefix ``tokyo_ia_``, base units in the name.
Dashboards and alert rules in ``deploy/`` use exactly these names; ``tests/unit/
test_deploy_configs.py`` checks that they only reference metrics defined here.

Hot path: a request costs one dict lookup (labelled children are cached per label tuple)
and five or six value updates. Labels are bounded: model, provider, deployment and route
values come from the config; anything else is folded into ``"other"``, so a client sending
random model names cannot grow the time-series count. Key ids and prompt text never become
labels.

Several workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``tokyo-ia serve`` sets it, via
:func:`setup_multiprocess_dir`, for ``workers > 1``), prometheus_client writes every value to
per-process files there and :meth:`Metrics.render_metrics` aggregates all workers' files, so
any worker can answer ``GET /metrics`` for all of them. Gauges say how workers combine
(in-flight requests add up; a circuit's state is the worst any live worker sees); gauges of
workers that exited are dropped, counters of exited workers keep counting toward the totals.
Each worker adds to its files in batches (:class:`_BufferedValue`): an update costs an addition
in memory, and what was added reaches the file within :data:`FLUSH_AFTER_S`, or at once when
this worker answers ``/metrics`` or exits; so a scrape answered by one worker sees the others'
latest quarter of a second a little late. (Writing every update through prometheus_client's
lock and memory map cost ~16 µs per request.)
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("tokyo_ia.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"

DEFAULT_ROUTES = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/admin",  # every admin route reports as /admin: ids in paths would be unbounded
)
CACHE_RESULTS = ("hit", "miss", "bypass", "coalesced", "error")
RATE_LIMIT_SCOPES = ("key", "model", "provider", "global", "budget")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}

# LLM calls range from milliseconds (cache hits, embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Every series name a dashboard or alert may use (histograms add _bucket/_sum/_count).
METRIC_NAMES = (
    "tokyo_ia_requests_total",
    "tokyo_ia_request_duration_seconds",
    "tokyo_ia_upstream_duration_seconds",
    "tokyo_ia_time_to_first_token_seconds",
    "tokyo_ia_tokens_total",
    "tokyo_ia_cost_usd_total",
    "tokyo_ia_cache_requests_total",
    "tokyo_ia_retries_total",
    "tokyo_ia_failovers_total",
    "tokyo_ia_rate_limited_total",
    "tokyo_ia_circuit_state",
    "tokyo_ia_in_flight_requests",
    "tokyo_ia_upstream_pool_connections",
)

_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


FLUSH_AFTER_S = 0.25
"""Multiprocess mode: the longest an update waits in memory before it is in this worker's file."""


class _BufferedValue:
    """A multiprocess value (prometheus_client's memory-mapped one, ``file_value``) whose
    increments wait in memory and go to the file together (:func:`flush_buffered`).

    ``set`` (gauges set on change, not per request) writes through; ``get`` sees both.
    """

    __slots__ = ("file_value", "pending", "queued")
    _multiprocess = True
    file_class: Any = None  # the class it wraps (prometheus_client's MmapedValue)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.file_value = self.file_class(*args, **kwargs)
        self.pending = 0.0
        self.queued = False

    def inc(self, amount: float) -> None:
        self.pending += amount
        if self.queued:
            return
        if not _dirty and not _flush_later():
            self.flush()  # no event loop (a command, a test): nothing would flush later
            return
        self.queued = True
        _dirty.append(self)

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.pending = 0.0  # a value set replaces what was added before
        self.file_value.set(value, timestamp)

    def get(self) -> float:
        return float(self.file_value.get()) + self.pending

    def set_exemplar(self, exemplar: Any) -> None:
        return  # prometheus_client keeps no exemplars in multiprocess mode either

    def get_exemplar(self) -> None:
        return None

    def flush(self) -> None:
        amount, self.pending, self.queued = self.pending, 0.0, False
        if amount:
            self.file_value.inc(amount)


_dirty: list[_BufferedValue] = []


def flush_buffered() -> None:
    """Write every buffered increment of this process to its file."""
    while _dirty:
        _dirty.pop().flush()


def _flush_later() -> bool:
    """Flush in :data:`FLUSH_AFTER_S` on the running event loop; False when there is none."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    loop.call_later(FLUSH_AFTER_S, flush_buffered)
    return True


def _buffered_class(file_class: Any) -> type[_BufferedValue]:
    return type("BufferedValue", (_BufferedValue,), {"__slots__": (), "file_class": file_class})


class _Fold:
    """Keep a label value if it is known, else ``"other"`` (bounded cardinality)."""

    __slots__ = ("known",)

    def __init__(self, known: Iterable[str]) -> None:
        self.known = frozenset(known) | {"", OTHER}

    def __call__(self, value: str) -> str:
        return value if value in self.known else OTHER


class Metrics:
    """Every gateway metric. Create one per process (its values live in its own registry)."""

    def __init__(
        self,
        models: Iterable[str] = (),
        providers: Iterable[str] = (),
        deployments: Iterable[str] = (),
        routes: Iterable[str] = DEFAULT_ROUTES,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.multiprocess_dir = multiprocess_dir or os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir and values.ValueClass is values.MutexValue:
            log.warning(
                "%s is set but prometheus_client was imported before it was: this process's "
                "metrics stay in memory and /metrics shows only the other workers",
                MULTIPROC_ENV,
            )
        elif self.multiprocess_dir and not issubclass(values.ValueClass, _BufferedValue):
            values.ValueClass = _buffered_class(values.ValueClass)  # before any metric exists
        self._model = _Fold(models)
        self._provider = _Fold(providers)
        self._deployment = _Fold(deployments)
        self._route = _Fold(routes)
        self._result = _Fold(CACHE_RESULTS)
        self._scope = _Fold(RATE_LIMIT_SCOPES)
        self.registry = CollectorRegistry(auto_describe=True)
        if not self.multiprocess_dir:
            ProcessCollector(registry=self.registry)
        self._define_traffic(self.registry)
        self._define_health(self.registry)
        self._requests: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self._per_model: dict[str, tuple[Counter, Counter, Counter, Histogram]] = {}
        self._upstream: dict[tuple[str, str], Histogram] = {}
        self._by_label: dict[tuple[int, str], Counter] = {}

    @classmethod
    def from_config(cls, config: Config, multiprocess_dir: str | None = None) -> Metrics:
        """Allow-lists from the config: public and upstream model names, providers, deployments."""
        models = set(config.models)
        deployments = set()
        for entries in config.models.values():
            for d in entries:
                models.add(d.model)
                deployments.add(f"{d.provider}/{d.model}")
        return cls(models, config.providers, deployments, multiprocess_dir=multiprocess_dir)

    def _define_traffic(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "tokyo_ia_requests_total",
            "Requests answered, by route, public model, provider and HTTP status.",
            ("route", "model", "provider", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "tokyo_ia_request_duration_seconds",
            "Time from request received to last byte sent.",
            ("route", "model"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "tokyo_ia_upstream_duration_seconds",
            "Duration of one upstream attempt (until headers).",
            ("provider", "model"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tokyo_ia_time_to_first_token_seconds",
            "Streams: time from request received to first chunk.",
            ("model",),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tokyo_ia_tokens_total",
            "Tokens billed, direction=input|output.",
            ("model", "direction"),
            registry=r,
        )
        self.cost = Counter("tokyo_ia_cost_usd_total", "Cost in US dollars.", ("model",), registry=r)

    def _define_health(self, r: CollectorRegistry) -> None:
        self.cache = Counter(
            "tokyo_ia_cache_requests_total", "Response cache lookups by result.", ("result",), registry=r
        )
        self.retries = Counter("tokyo_ia_retries_total", "Upstream retries.", ("provider",), registry=r)
        self.failovers = Counter(
            "tokyo_ia_failovers_total", "Moves to the next deployment of a model.", ("model",), registry=r
        )
        self.rate_limited = Counter(
            "tokyo_ia_rate_limited_total", "Requests refused by a limit, by scope.", ("scope",), registry=r
        )
        self.circuit_state = Gauge(
            "tokyo_ia_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open (worst live worker).",
            ("deployment",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.in_flight = Gauge(
            "tokyo_ia_in_flight_requests",
            "Requests being served now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.pool_connections = Gauge(
            "tokyo_ia_upstream_pool_connections",
            "Upstream connection pool, state=active|idle|limit.",
            ("provider", "state"),
            multiprocess_mode="livesum",
            registry=r,
        )

    # -- events: the hot path ------------------------------------------------------------------

    def observe_request(
        self,
        route: str,
        model: str,
        provider: str,
        status: int,
        duration_s: float,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_usd: float = 0.0,
        ttft_s: float | None = None,
    ) -> None:
        """One finished request (call once, after the last byte). ``model`` is the public name."""
        children = self._requests.get((route, model, provider, status))
        if children is None:
            children = self._request_children(route, model, provider, status)
        children[0].inc()
        children[1].observe(duration_s)
        if tokens_in or tokens_out or cost_usd > 0 or ttft_s is not None:
            self._usage(model, tokens_in, tokens_out, cost_usd, ttft_s)

    def _usage(
        self, model: str, tokens_in: int, tokens_out: int, cost_usd: float, ttft_s: float | None
    ) -> None:
        per_model = self._per_model.get(model)
        if per_model is None:
            per_model = self._model_children(model)
        tin, tout, cost, ttft = per_model
        if tokens_in > 0:
            tin.inc(tokens_in)
        if tokens_out > 0:
            tout.inc(tokens_out)
        if cost_usd > 0:
            cost.inc(cost_usd)
        if ttft_s is not None:
            ttft.observe(ttft_s)

    def observe_upstream(self, provider: str, model: str, duration_s: float) -> None:
        """One upstream attempt; ``model`` is the upstream model name."""
        child = self._upstream.get((provider, model))
        if child is None:
            folded = (self._provider(provider), self._model(model))
            child = self.upstream_duration.labels(*folded)
            if folded == (provider, model):
                self._upstream[folded] = child
        child.observe(duration_s)

    def observe_cache(self, result: str) -> None:
        """result: hit, miss, bypass, coalesced or error."""
        self._counter(0, self.cache, self._result, result).inc()

    def observe_retry(self, provider: str) -> None:
        self._counter(1, self.retries, self._provider, provider).inc()

    def observe_failover(self, model: str) -> None:
        self._counter(2, self.failovers, self._model, model).inc()

    def observe_rate_limited(self, scope: str) -> None:
        """scope: key, model, provider, global or budget."""
        self._counter(3, self.rate_limited, self._scope, scope).inc()

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self) -> None:
        self.in_flight.dec()

    # -- state, set when it changes (not per request) --------------------------------------

    def set_circuit_state(self, deployment: str, state: str | int) -> None:
        """``deployment`` is ``provider/model``; state closed|half_open|open (or 0|1|2)."""
        value = CIRCUIT_STATES[state] if isinstance(state, str) else int(state)
        self.circuit_state.labels(self._deployment(deployment)).set(value)

    def set_pool_connections(self, provider: str, active: int, idle: int, limit: int) -> None:
        """Sample a provider's connection pool (call on a timer, e.g. every 5 s)."""
        p = self._provider(provider)
        self.pool_connections.labels(p, "active").set(active)
        self.pool_connections.labels(p, "idle").set(idle)
        self.pool_connections.labels(p, "limit").set(limit)

    # -- label caches --------------------------------------------------------------------------

    def _request_children(
        self, route: str, model: str, provider: str, status: int
    ) -> tuple[Counter, Histogram]:
        """Children for a label tuple; cached under the raw tuple only if nothing was folded."""
        folded = (self._route(route), self._model(model), self._provider(provider), status)
        children = self._requests.get(folded)
        if children is None:
            children = (
                self.requests.labels(folded[0], folded[1], folded[2], str(status)),
                self.request_duration.labels(folded[0], folded[1]),
            )
            self._requests[folded] = children
        return children

    def _model_children(self, model: str) -> tuple[Counter, Counter, Counter, Histogram]:
        m = self._model(model)
        children = self._per_model.get(m)
        if children is None:
            children = (
                self.tokens.labels(m, "input"),
                self.tokens.labels(m, "output"),
                self.cost.labels(m),
                self.ttft.labels(m),
            )
            self._per_model[m] = children
        return children

    def _counter(self, kind: int, metric: Counter, fold: _Fold, value: str) -> Counter:
        child = self._by_label.get((kind, value))
        if child is None:
            folded = fold(value)
            child = metric.labels(folded)
            if folded == value:
                self._by_label[(kind, value)] = child
        return child

    # -- exposition ----------------------------------------------------------------------------

    def render_metrics(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics`` (all workers in multiprocess mode)."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
        flush_buffered()
        reap_dead_workers(self.multiprocess_dir)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4

    def close(self) -> None:
        """On worker exit: drop this process's live gauges so they stop counting."""
        if self.multiprocess_dir:
            flush_buffered()
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


def reap_dead_workers(path: str) -> None:
    """Drop live gauges of workers that died without :meth:`Metrics.close` (crash, SIGKILL)."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.search(name)
        if match and not _alive(int(match.group(1))):
            mark_process_dead(int(match.group(1)), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_multiprocess_dir(workers: int) -> str | None:
    """For ``workers > 1``: point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory.

    Call in the parent process *before* workers start (they inherit the environment and
    must import prometheus_client after it is set). A directory the operator chose is
    emptied (stale files would add old counts); otherwise a fresh temporary one is made
    and removed at exit.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return given
    if workers <= 1:
        return None
    path = tempfile.mkdtemp(prefix="tokyo-ia-metrics-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
