"""``python -m bench``: start the upstream, the baseline and the gateway; measure; report.

One run, one machine, three targets answering the same ``POST /v1/chat/completions``:

- ``upstream``: the fake OpenAI server (bench/upstream.py), called directly: the floor;
- ``baseline``: raw ASGI + aiohttp forwarding to it (bench/baseline.py): the Python floor;
- ``gateway``: ``tokyo-ia serve --config <generated>`` as a user starts it, full pipeline:
  a virtual key made with ``tokyo-ia keys create`` (so requests go through the key cache),
  per-key RPM/TPM and a global RPM limit set too high to trigger, an ``openai`` provider
  pointed at the fake upstream, Prometheus metrics, the audit trail and spend ledger (their
  defaults), and JSON access logs at info written to a file.

Each repeat starts a fresh gateway and measures, in order: time to ready and RSS at start;
latency at one connection (all targets); first SSE event of a stream (all targets);
throughput at N connections (the upstream first, moved to the server core so it is not
sharing a core with the load generator; then the baseline and the gateway). The targets of
each measurement take turns (short windows, order alternating) so that the drift of a shared
machine reaches them alike; RSS after the
requests so far are topped up to half of ``--rss-requests``, then to all of them; then a
second gateway with ``cache: {backend: memory}`` is started for cache-hit throughput.

Pinning on a machine with two or more cores, for the throughput measurements: the gateway
and the baseline get the first core; the upstream, the load generator and this runner the
others, so the server under test has a core of its own and the load side cannot steal from
it. The one-connection measurements run unpinned (see :meth:`Bench._unpinned`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from . import report, wrk
from .client import Probe
from .measure import CHAT, MODEL, Measure, Plan, Target, check
from .procs import Service, cpu_seconds, free_port, pin

ROOT = Path(__file__).resolve().parent.parent
HIGH_RPM = 1_000_000_000
HIGH_TPM = 1_000_000_000  # the largest a key accepts


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class Bench:
    """The processes of one harness run and the measurements on them."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.dir = workdir
        self.all_cpus = set(os.sched_getaffinity(0))
        cpus = sorted(self.all_cpus)
        self.server_cpus: set[int] | None = None
        self.load_cpus: set[int] | None = None
        if plan.pin and len(cpus) >= 2:
            self.server_cpus, self.load_cpus = {cpus[0]}, set(cpus[1:])
        self.measure = Measure(plan, self.load_cpus)
        self.env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        self.env.pop("TOKYO_IA_CONFIG", None)
        self.env["TOKYO_IA_BENCH_MASTER_KEY"] = "sk-bench-master-" + secrets.token_urlsafe(24)
        exe = Path(sys.executable).parent / "tokyo-ia"
        self.tokyo = [str(exe)] if exe.exists() else [sys.executable, "-m", "tokyo_ia"]
        self.services: list[Service] = []
        self.key = ""
        self.upstream: Service | None = None
        self.load_at_start = os.getloadavg()[0]

    # -- processes ---------------------------------------------------------------------

    @property
    def pinning(self) -> str:
        if self.server_cpus is None or self.load_cpus is None:
            return "none"
        gw = "gateway" if self.plan.workers == 1 else f"gateway ({self.plan.workers} workers: all CPUs)"
        return (
            f"{gw} and baseline on CPU {_cpus(self.server_cpus)}; upstream, load generator and runner "
            f"on CPU {_cpus(self.load_cpus)}"
        )

    def _service(self, service: Service) -> Service:
        self.services.append(service)
        return service.start()

    def start_support(self) -> None:
        pin(0, self.load_cpus)  # this runner and every child it starts, unless moved
        port = free_port()
        self.upstream = self._service(
            Service(
                "upstream",
                [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                port,
                self.dir / "upstream.log",
                cwd=ROOT,
                ready_path="/v1/models",
            )
        )
        port = free_port()
        self.baseline = self._service(
            Service(
                "baseline",
                [sys.executable, "-m", "bench.baseline", "--port", str(port)],
                port,
                self.dir / "baseline.log",
                env={**os.environ, "BENCH_UPSTREAM": f"http://127.0.0.1:{self.upstream.port}"},
                cwd=ROOT,
                cpus=self.server_cpus,
            )
        )
        config = self.write_config("keys", free_port(), workers=1, cache=False)
        self._cli("db", "upgrade", "--config", str(config))
        out = self._cli(
            "keys", "create", "--config", str(config), "--name", "bench",
            "--rpm", str(HIGH_RPM), "--tpm", str(HIGH_TPM), "--json",
        )  # fmt: skip
        self.key = orjson.loads(out)["key"]

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [*self.tokyo, *args], capture_output=True, text=True, env=self.env, cwd=self.dir, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"tokyo-ia {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return out.stdout

    def write_config(self, name: str, port: int, *, workers: int, cache: bool) -> Path:
        assert self.upstream is not None
        config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port, "workers": workers},
            "store": {"url": f"sqlite+aiosqlite:///{self.dir / 'tokyo-ia.db'}"},
            "auth": {"master_key": "${env:TOKYO_IA_BENCH_MASTER_KEY}"},
            "limits": {"rpm": HIGH_RPM},
            "providers": {
                "bench": {
                    "kind": "openai",
                    "base_url": f"http://127.0.0.1:{self.upstream.port}/v1",
                    "api_key": "sk-bench-upstream",
                    "max_connections": 256,
                }
            },
            "models": {MODEL: [{"provider": "bench", "model": MODEL}]},
        }
        if cache:
            config["cache"] = {"backend": "memory"}
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_gateway(self, name: str, *, workers: int, cache: bool = False, pinned: bool = True) -> Service:
        port = free_port()
        config = self.write_config(name, port, workers=workers, cache=cache)
        cmd = [*self.tokyo, "serve", "--config", str(config), "--log-format", "json", "--log-level", "info"]
        cpus = self.server_cpus if pinned and workers == 1 and self.server_cpus else self.all_cpus
        return self._service(
            Service(name, cmd, port, self.dir / f"{name}.log", env=self.env, cwd=self.dir, cpus=cpus)
        )

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    # -- measurements ------------------------------------------------------------------

    def targets(self, gateway: Service) -> list[Target]:
        assert self.upstream is not None
        return [
            Target("upstream", self.upstream.port),
            Target("baseline", self.baseline.port),
            Target("gateway", gateway.port, {"authorization": f"Bearer {self.key}"}),
        ]

    def one_run(self, index: int) -> dict[str, Any]:
        plan = self.plan
        gateway = self.start_gateway(f"gateway-{index}", workers=plan.workers)
        run: dict[str, Any] = {"ready_s": gateway.ready_s, "rss_mb": {"start": gateway.rss_mb()}}
        say(f"run {index}: gateway ready in {gateway.ready_s:.3f} s, RSS {run['rss_mb']['start']:.1f} MiB")
        targets = self.targets(gateway)
        sent = 0
        run["latency_ms"] = {}
        run["stream_ttfb_ms"] = {}
        with self._unpinned(gateway):
            for name, (latency, n) in self.measure.latency(targets).items():
                run["latency_ms"][name] = latency
                sent += n if name == "gateway" else 0
            for name, (ttfb, n) in self.measure.first_event(targets).items():
                run["stream_ttfb_ms"][name] = ttfb
                sent += n if name == "gateway" else 0
        # The upstream alone on the server core; then the baseline and the gateway, taking turns.
        with self._upstream_on_server_core(True):
            results = self.measure.throughputs(targets[:1])
        results.update(self.measure.throughputs(targets[1:]))
        run["throughput_rps"] = {name: result.rps for name, (result, _) in results.items()}
        run["errors"] = {name: result.errors for name, (result, _) in results.items()}
        sent += results["gateway"][1]
        say(f"run {index}: {_brief(run)}")
        rate = run["throughput_rps"]["gateway"]
        sent = self.measure.top_up(targets[2], sent, plan.rss_requests // 2, rate)
        run["rss_mb"].update(mid=gateway.rss_mb(), mid_requests=sent)
        sent = self.measure.top_up(targets[2], sent, plan.rss_requests, rate)
        run["rss_mb"].update(end=gateway.rss_mb(), end_requests=sent)
        say(f"run {index}: RSS {run['rss_mb']['mid']:.1f} MiB after {run['rss_mb']['mid_requests']} requests, "
            f"{run['rss_mb']['end']:.1f} MiB after {sent}")  # fmt: skip
        gateway.stop()
        self.services.remove(gateway)
        run["cache_hit_rps"], run["cache_note"] = self.cache_hits(index)
        return run

    @contextlib.contextmanager
    def _unpinned(self, gateway: Service) -> Iterator[None]:
        """Let every process use every core while one request at a time is measured.

        On this VM a process pinned to a core of its own pays for waking that core from idle
        on every request (one connection leaves it idle between requests): p99 goes from
        ~0.4 ms to ~5 ms for the bare baseline. Under load (throughput) the server core never
        idles and pinning is what keeps the load generator off it.
        """
        assert self.upstream is not None
        processes = [0, self.upstream.pid, self.baseline.pid, *gateway.workers()]
        for pid in processes:
            pin(pid, self.all_cpus)
        try:
            yield
        finally:
            pin(0, self.load_cpus)
            pin(self.upstream.pid, self.load_cpus)
            pin(self.baseline.pid, self.server_cpus)
            if gateway.cpus != self.all_cpus:
                for pid in gateway.workers():
                    pin(pid, gateway.cpus)

    @contextlib.contextmanager
    def _upstream_on_server_core(self, move: bool) -> Iterator[None]:
        """Measure the upstream alone on the server core, not sharing one with the load."""
        if not move or self.upstream is None or self.server_cpus is None:
            yield
            return
        pin(self.upstream.pid, self.server_cpus)
        try:
            yield
        finally:
            pin(self.upstream.pid, self.load_cpus)

    def cache_hits(self, index: int) -> tuple[float | None, str]:
        try:
            gateway = self.start_gateway(f"gateway-cache-{index}", workers=self.plan.workers, cache=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[-1] if str(exc) else "failed"
            return None, f"n/a: the gateway does not start with cache: {{backend: memory}} ({first})"
        try:
            target = self.targets(gateway)[2]
            with Probe("127.0.0.1", target.port) as probe:
                for _ in range(2):
                    check(target, probe.send(target.raw(CHAT)).status, probe.reader.body())
                state = probe.reader.header(b"x-tokyo-ia-cache")
            if state != b"hit":
                return None, (
                    "n/a: the second identical request was not a cache hit (x-tokyo-ia-cache: "
                    f"{state.decode() if state else 'absent'}); the cache is not wired into the pipeline yet"
                )
            result, _ = self.measure.throughput(target)
            return result.rps, "identical requests, gateway with cache: {backend: memory}"
        finally:
            gateway.stop()
            self.services.remove(gateway)

    def scaling(self) -> dict[str, Any]:
        """Gateway throughput with 1 and 2 workers, nothing pinned (the machine has 2 cores)."""
        assert self.upstream is not None
        pin(0, self.all_cpus)
        pin(self.upstream.pid, self.all_cpus)
        rps: dict[str, float] = {}
        cpu_us: dict[str, float] = {}
        cores: dict[str, float] = {}
        try:
            for workers in (1, 2):
                values, per_request, busy = [], [], []
                for i in range(self.plan.repeat):
                    gateway = self.start_gateway(f"gateway-w{workers}-{i}", workers=workers, pinned=False)
                    cpu, wall = cpu_seconds(gateway.pid), time.perf_counter()
                    result, sent = self.measure.throughput(self.targets(gateway)[2])
                    cpu, wall = cpu_seconds(gateway.pid) - cpu, time.perf_counter() - wall
                    values.append(result.rps)
                    per_request.append(cpu / sent * 1e6)
                    busy.append(cpu / wall)
                    gateway.stop()
                    self.services.remove(gateway)
                key = str(workers)
                rps[key], cpu_us[key], cores[key] = (
                    statistics.median(v) for v in (values, per_request, busy)
                )
                say(
                    f"scaling: {workers} worker(s): {rps[key]:.0f} req/s, gateway CPU {cpu_us[key]:.0f} us "
                    f"per request, {cores[key]:.2f} cores busy"
                )
        finally:
            pin(0, self.load_cpus)
            pin(self.upstream.pid, self.load_cpus)
        return {
            "rps": rps,
            "speedup": rps["2"] / rps["1"] if rps["1"] else None,
            "cpu_us_per_request": cpu_us,
            "gateway_cores": cores,
        }


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _brief(run: dict[str, Any]) -> str:
    t, lat = run["throughput_rps"], run["latency_ms"]
    return (
        f"{t['gateway']:.0f} req/s (baseline {t['baseline']:.0f}, upstream {t['upstream']:.0f}); "
        f"p50 {lat['gateway']['p50']:.3f} ms (baseline {lat['baseline']['p50']:.3f}, "
        f"upstream {lat['upstream']['p50']:.3f})"
    )


def _meta(plan: Plan, bench: Bench) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with local changes)"
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1m": {"start": bench.load_at_start, "end": os.getloadavg()[0]},
        "commit": commit,
        "cpu": cpu,
        "cpus": len(bench.all_cpus),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "generator": wrk.version() if plan.generator == "wrk" else "python (bench/client.py)",
        "quick": plan.quick,
        "repeat": plan.repeat,
        "connections": plan.connections,
        "workers": plan.workers,
        "pinning": bench.pinning,
        "durations_s": {
            "warmup": plan.warmup_s,
            "latency": plan.latency_s,
            "throughput": plan.throughput_s,
            "cache": plan.cache_s,
        },
        "streams": plan.streams,
        "rss_requests": plan.rss_requests,
    }


def run(plan: Plan, out: Path, keep: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tokyo-ia-bench-"))
    bench = Bench(plan, workdir)
    ok = False
    try:
        if bench.load_at_start > 0.5:
            say(
                f"warning: load average {bench.load_at_start:.2f}: something else is running; numbers will be noisy"
            )
        bench.start_support()
        say(f"upstream :{bench.upstream.port if bench.upstream else 0}, baseline :{bench.baseline.port}; "
            f"pinning: {bench.pinning}; generator: {plan.generator}; logs in {workdir}")  # fmt: skip
        runs = [bench.one_run(i + 1) for i in range(plan.repeat)]
        scaling = bench.scaling() if plan.scaling else None
        summary = report.summarize(runs)
        result = {
            "schema": 1,
            "meta": _meta(plan, bench),
            "summary": summary,
            "budget": report.budget(summary),
            "scaling": scaling,
            "runs": runs,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        (out / "report.md").write_text(report.markdown(result))
        ok = True
        return result
    finally:
        bench.stop()
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"logs kept in {workdir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure the gateway against a bare passthrough baseline."
    )
    parser.add_argument("--quick", action="store_true", help="short durations and small counts (smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are quoted")
    parser.add_argument("--duration", type=float, help="seconds of each throughput measurement (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="connections for throughput (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    parser.add_argument("--scaling", action="store_true", help="also measure 1 vs 2 workers, unpinned")
    parser.add_argument(
        "--rss-requests", type=int, help="requests before the last RSS reading (default 100000)"
    )
    parser.add_argument(
        "--generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator (auto: wrk if installed)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="report directory")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan.from_args(args)
    result = run(plan, args.out, keep=args.keep)
    print(report.markdown(result))
    print(f"written: {args.out / 'report.md'}, {args.out / 'report.json'}")
    return 0
