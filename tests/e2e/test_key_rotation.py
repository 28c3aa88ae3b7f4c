"""A provider key rotated in the secrets store reaches a running gateway (secrets.refresh_s)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_rotated_provider_key_is_used_without_a_restart(tmp_path: Path) -> None:
    (tmp_path / "openai-key").write_text("sk-before\n")
    with OpenAIEmulator() as emu:
        emu.api_key = "sk-before"
        config = {
            "secrets": {"backend": "file", "dir": str(tmp_path), "refresh_s": 0.2},
            "providers": {"o": {**openai_provider(emu.url), "api_key": "${secret:openai-key}"}},
            "models": {"m": [{"provider": "o", "model": "gpt-4o-mini"}]},
            "resilience": {"health": {"active": False}},
        }
        with GatewayProcess(config) as gw:
            assert httpx.post(gw.url + "/v1/chat/completions", json=BODY).status_code == 200
            # The provider rotates its key: the old one stops working at once...
            emu.api_key = "sk-after"
            refused = httpx.post(gw.url + "/v1/chat/completions", json=BODY)
            assert refused.json()["error"]["code"] == "upstream_auth_failed"
            # ...and the secrets store gets the new one: within a few refresh_s, calls use it.
            (tmp_path / "openai-key").write_text("sk-after\n")
            deadline = time.monotonic() + 10
            while True:
                r = httpx.post(gw.url + "/v1/chat/completions", json=BODY)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert "sk-after" not in gw.log and "sk-before" not in gw.log
            assert "providers.o.api_key changed" in gw.log
