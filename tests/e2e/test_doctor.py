"""``tokyo-ia doctor`` against emulators: one healthy provider, one with a bad key, one down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.fakes.anthropic import AnthropicEmulator
from tests.fakes.base import free_port
from tests.fakes.openai import OpenAIEmulator


def test_doctor_reports_each_provider(openai_emu: OpenAIEmulator, tmp_path: Path) -> None:
    with AnthropicEmulator() as anthropic:
        config = {
            "providers": {
                "good": {"kind": "openai", "base_url": openai_emu.url + "/v1", "api_key": "test-key"},
                "badkey": {"kind": "anthropic", "base_url": anthropic.url, "api_key": "wrong"},
                "down": {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
                "demo": {"kind": "demo"},
            }
        }
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "tokyo_ia", "doctor", "--config", str(path), "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert result.returncode == 1, result.stdout + result.stderr
    assert " ok " in lines["good"]
    assert " ok " in lines["demo"]
    assert "FAIL" in lines["badkey"] and "auth" in lines["badkey"]
    assert "FAIL" in lines["down"] and "connect" in lines["down"]
    assert "wrong" not in result.stdout
