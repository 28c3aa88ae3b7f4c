"""Drive a target with ``wrk`` (Debian package ``wrk``): C, one thread, keep-alive connections.

The request (method, body, headers) is set in a generated Lua script; its ``done`` hook prints
one JSON line with the counts and latency percentiles, so nothing is scraped from wrk's text.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import orjson

from .client import LoadResult

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    """``wrk debian/4.1.0-3+b2`` (its banner without the copyright line)."""
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip()
    return text.split("[", 1)[0].strip() if text else "wrk"


def _lua_string(text: str) -> str:
    level = "=" * 4
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def script(body: bytes | None, headers: dict[str, str]) -> str:
    lines = []
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n" + _DONE


def load(
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
) -> LoadResult:
    """Run wrk for ``seconds`` and return its counts (latencies are not kept per request)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as f:
        f.write(script(body, headers))
        f.flush()
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            f.name,
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    data = orjson.loads(line)
    errors = data["status"] + data["connect"] + data["read"] + data["write"] + data["timeout"]
    return LoadResult(
        data["requests"], errors, data["duration_us"] / 1e6, data["p50_us"] / 1e6, data["p99_us"] / 1e6
    )
