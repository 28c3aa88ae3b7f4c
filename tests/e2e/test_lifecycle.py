"""Start-up, configuration errors and graceful shutdown of a real ``tokyo-ia serve``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import GatewayProcess, sdk_client


def test_embedded_default_banner_and_demo_model() -> None:
    with GatewayProcess() as gw:
        c = sdk_client(gw.url, "anything")
        reply = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None
        assert "Hello" in reply.choices[0].message.content
        log = gw.log
    assert f"listening on http://127.0.0.1:{gw.port}" in log
    assert "demo" in log and "auth: OFF" in log


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokyo_ia", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  port: 8080\n  workerz: 2\n")
    result = _serve("--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "server.workerz: unknown key" in result.stderr


def test_public_bind_without_auth_is_refused(tmp_path: Path) -> None:
    result = _serve("--host", "0.0.0.0", "--port", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--insecure" in result.stderr


def test_sigterm_lets_in_flight_requests_finish() -> None:
    config = {
        "providers": {"demo": {"kind": "demo", "latency_ms": 1500}},
        "models": {"slow-demo": [{"provider": "demo", "model": "demo"}]},
    }
    gw = GatewayProcess(config).start()
    result: dict[str, Any] = {}

    def call() -> None:
        body = json.dumps({"model": "slow-demo", "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(
            gw.url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result["status"] = resp.status
            result["body"] = json.loads(resp.read())

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the request is in flight inside the gateway
    code = gw.stop(signal.SIGTERM)
    worker.join(10)
    assert result.get("status") == 200, gw.log
    assert result["body"]["choices"][0]["message"]["content"] == "You said: hi"
    # uvicorn re-raises the signal once shutdown is complete, the conventional exit for SIGTERM
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gw.log
