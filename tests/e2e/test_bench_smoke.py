"""The benchmark harness still runs end to end and writes a well-formed report.

A very short run (``--quick --repeat 1``, the pure-Python load generator so wrk is not needed)
of the real thing: fake upstream, baseline and ``tokyo-ia serve`` processes. Nothing here
asserts a timing (DESIGN.md: timing belongs in bench/); only that every measurement is
present and is a positive number, so the harness does not rot between full runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("upstream", "baseline", "gateway")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_a_quick_run_writes_a_complete_report(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "--quick", "--repeat", "1", "--generator", "python"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"schema", "meta", "summary", "budget", "runs"}
    assert report["meta"]["quick"] is True
    assert len(report["runs"]) == 1
    s = report["summary"]
    for target in TARGETS:
        assert _positive(s["throughput_rps"][target]), target
        assert _positive(s["latency_ms"][target]["p50"]), target
        assert _positive(s["latency_ms"][target]["p99"]), target
        assert _positive(s["stream_ttfb_ms"][target]), target
    assert _positive(s["throughput_rps"]["gateway_to_baseline"])
    for target in ("baseline", "gateway"):
        assert _number(s["added_latency_ms"][target]["p50"])
        assert _number(s["added_latency_ms"][target]["p99"])
        assert _number(s["added_stream_ttfb_ms"][target])
    # The cache measurement may be n/a (reported with a reason), never silently missing.
    assert s["cache_hit_rps"] is None or _positive(s["cache_hit_rps"])
    assert s["cache_note"]
    for key in ("start", "mid", "end", "mid_requests", "end_requests"):
        assert _positive(s["rss_mb"][key]), key
    assert _positive(s["ready_s"])
    assert report["budget"]
    for row in report["budget"]:
        assert set(row) == {"name", "key", "target", "unit", "value", "ok"}
        assert row["value"] is None or _number(row["value"])

    markdown = (tmp_path / "report.md").read_text()
    assert "| measurement | gateway | baseline | upstream (direct) |" in markdown
    assert "## Budget" in markdown
    assert "n/a" not in markdown.split("## Budget")[0].split("| cache hits")[0]
