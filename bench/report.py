"""Turn the runs into a report: medians across repeats, the budget check, markdown and JSON.

Every ratio or difference is computed inside one repeat (gateway and baseline measured minutes
apart on the same machine) and only then summarised by the median, so slow drift of a noisy
machine cancels out instead of leaking into the comparison.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

Run = dict[str, Any]

# (name, key into the summary, comparison, target, unit) from DESIGN.md "Performance budget".
BUDGET: list[tuple[str, str, str, float, str]] = [
    ("throughput at 64 connections", "throughput_rps.gateway", ">=", 2500, "req/s"),
    ("throughput / baseline", "throughput_rps.gateway_to_baseline", ">=", 0.6, "x"),
    ("added latency p50 (1 connection)", "added_latency_ms.gateway.p50", "<=", 0.5, "ms"),
    ("added latency p99 (1 connection)", "added_latency_ms.gateway.p99", "<=", 2.0, "ms"),
    ("streaming TTFB added p50", "added_stream_ttfb_ms.gateway", "<=", 1.0, "ms"),
    ("cache hits", "cache_hit_rps", ">=", 5000, "req/s"),
    ("RSS after the last request", "rss_mb.end", "<=", 150, "MiB"),
    ("RSS growth between the two readings", "rss_mb.growth_pct", "<=", 5.0, "%"),
    ("time to ready", "ready_s", "<=", 2.0, "s"),
]


def lookup(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _median(runs: list[Run], get: Callable[[Run], float | None]) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _growth_pct(run: Run) -> float | None:
    mid, end = lookup(run, "rss_mb.mid"), lookup(run, "rss_mb.end")
    return (end - mid) / mid * 100 if mid and end is not None else None


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Medians of every measurement; ratios and differences taken per run first."""

    def med(path: str) -> float | None:
        return _median(runs, lambda r: lookup(r, path))

    def med_diff(a: str, b: str) -> float | None:
        return _median(runs, lambda r: _sub(lookup(r, a), lookup(r, b)))

    def med_ratio(a: str, b: str) -> float | None:
        def ratio(r: Run) -> float | None:
            x, y = lookup(r, a), lookup(r, b)
            return x / y if x is not None and y else None

        return _median(runs, ratio)

    targets = ("upstream", "baseline", "gateway")
    latency = {t: {q: med(f"latency_ms.{t}.{q}") for q in ("p50", "p99")} for t in targets}
    rss_mid, rss_end = med("rss_mb.mid"), med("rss_mb.end")
    return {
        "throughput_rps": {
            **{t: med(f"throughput_rps.{t}") for t in targets},
            "gateway_to_baseline": med_ratio("throughput_rps.gateway", "throughput_rps.baseline"),
        },
        "latency_ms": latency,
        "added_latency_ms": {
            t: {q: med_diff(f"latency_ms.{t}.{q}", f"latency_ms.upstream.{q}") for q in ("p50", "p99")}
            for t in ("baseline", "gateway")
        },
        "stream_ttfb_ms": {t: med(f"stream_ttfb_ms.{t}") for t in targets},
        "added_stream_ttfb_ms": {
            t: med_diff(f"stream_ttfb_ms.{t}", "stream_ttfb_ms.upstream") for t in ("baseline", "gateway")
        },
        "cache_hit_rps": med("cache_hit_rps"),
        "cache_note": next((r["cache_note"] for r in runs if r.get("cache_note")), ""),
        "rss_mb": {
            "start": med("rss_mb.start"),
            "mid": rss_mid,
            "end": rss_end,
            "mid_requests": med("rss_mb.mid_requests"),
            "end_requests": med("rss_mb.end_requests"),
            "growth_mb": med_diff("rss_mb.end", "rss_mb.mid"),
            "growth_pct": _median(runs, _growth_pct),
        },
        "ready_s": med("ready_s"),
    }


def budget(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, path, op, target, unit in BUDGET:
        value = lookup(summary, path)
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        target_text = f"{op} {target:g} {unit}"
        rows.append(
            {"name": name, "key": path, "target": target_text, "unit": unit, "value": value, "ok": ok}
        )
    return rows


_DIGITS = {"req/s": 0, "x": 2, "ms": 3, "MiB": 1, "%": 1, "s": 3}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _scaling_rows(scaling: dict[str, Any]) -> list[str]:
    """req/s per worker count, with the gateway's CPU per request and the cores it kept busy
    (all its processes): what tells a machine limit from a gateway that does not scale."""
    cpu, cores = scaling.get("cpu_us_per_request") or {}, scaling.get("gateway_cores") or {}
    rows = [
        "| workers | req/s | gateway CPU per request (us) | gateway cores busy |",
        "|---:|---:|---:|---:|",
        *(
            f"| {w} | {_fmt(v, 0)} | {_fmt(cpu.get(w), 0)} | {_fmt(cores.get(w))} |"
            for w, v in scaling["rps"].items()
        ),
    ]
    ratio = cpu["2"] / cpu["1"] if cpu.get("1") and cpu.get("2") else None
    rows.append(f"| 2 / 1 | {_fmt(scaling['speedup'])} | {_fmt(ratio)} | |")
    return rows


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    meta = report["meta"]
    t, lat, add = s["throughput_rps"], s["latency_ms"], s["added_latency_ms"]
    ttfb, add_ttfb, rss = s["stream_ttfb_ms"], s["added_stream_ttfb_ms"], s["rss_mb"]
    lines = [
        "# Tokyo-IA benchmark report",
        "",
        f"{meta['date']} · commit {meta['commit']} · {meta['cpu']} ({meta['cpus']} cores) · "
        f"Python {meta['python']} · load generator: {meta['generator']} · "
        f"{meta['repeat']} repeat(s), medians{' · QUICK RUN (not comparable)' if meta['quick'] else ''}",
        "",
        f"Pinning: {meta['pinning']}. Gateway workers: {meta['workers']}. Load average (1 min) "
        f"at start / end: {meta['load_average_1m']['start']:.2f} / {meta['load_average_1m']['end']:.2f}.",
        "",
        "| measurement | gateway | baseline | upstream (direct) |",
        "|---|---:|---:|---:|",
        f"| throughput, {meta['connections']} connections (req/s) | {_fmt(t['gateway'], 0)} | "
        f"{_fmt(t['baseline'], 0)} | {_fmt(t['upstream'], 0)} |",
        f"| gateway / baseline throughput | {_fmt(t['gateway_to_baseline'])} | 1.00 | |",
        f"| latency p50, 1 connection (ms) | {_fmt(lat['gateway']['p50'], 3)} | "
        f"{_fmt(lat['baseline']['p50'], 3)} | {_fmt(lat['upstream']['p50'], 3)} |",
        f"| latency p99, 1 connection (ms) | {_fmt(lat['gateway']['p99'], 3)} | "
        f"{_fmt(lat['baseline']['p99'], 3)} | {_fmt(lat['upstream']['p99'], 3)} |",
        f"| **added** latency p50 (ms) | {_fmt(add['gateway']['p50'], 3)} | {_fmt(add['baseline']['p50'], 3)} | |",
        f"| **added** latency p99 (ms) | {_fmt(add['gateway']['p99'], 3)} | {_fmt(add['baseline']['p99'], 3)} | |",
        f"| stream first event p50 (ms) | {_fmt(ttfb['gateway'], 3)} | {_fmt(ttfb['baseline'], 3)} | "
        f"{_fmt(ttfb['upstream'], 3)} |",
        f"| **added** stream first event p50 (ms) | {_fmt(add_ttfb['gateway'], 3)} | "
        f"{_fmt(add_ttfb['baseline'], 3)} | |",
        f"| cache hits, {meta['connections']} connections (req/s) | {_fmt(s['cache_hit_rps'], 0)} | | |",
        f"| RSS at start (MiB) | {_fmt(rss['start'], 1)} | | |",
        f"| RSS after {_fmt(rss['mid_requests'], 0)} requests (MiB) | {_fmt(rss['mid'], 1)} | | |",
        f"| RSS after {_fmt(rss['end_requests'], 0)} requests (MiB) | {_fmt(rss['end'], 1)} | | |",
        f"| time to ready (s) | {_fmt(s['ready_s'], 3)} | | |",
    ]
    if s.get("cache_note"):
        lines += ["", f"Cache: {s['cache_note']}"]
    scaling = report.get("scaling")
    if scaling:
        lines += [
            "",
            "## Workers (no pinning: gateway, upstream and load generator share both cores)",
            "",
            *_scaling_rows(scaling),
        ]
    lines += ["", "## Budget (DESIGN.md)", "", "| target | value | budget | ok |", "|---|---:|---|---|"]
    for row in report["budget"]:
        ok = "n/a" if row["ok"] is None else ("yes" if row["ok"] else "**no**")
        digits = _DIGITS.get(row["unit"], 2)
        lines.append(
            f"| {row['name']} | {_fmt(row['value'], digits)} {row['unit']} | {row['target']} | {ok} |"
        )
    return "\n".join(lines) + "\n"
