"""An upstream served over HTTPS, as every hosted provider is: the gateway's own HTTP client
(providers/wire.py) verifies the certificate against the trust store that ``SSL_CERT_FILE``
names, streams and plain answers both work, and an untrusted certificate is refused with a
message that says so."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.fakes.openai import OpenAIEmulator
from tests.support import GatewayProcess, openai_provider

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello over TLS"}]}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_emu(ca: trustme.CA) -> Iterator[OpenAIEmulator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with OpenAIEmulator(ssl_context=context) as emu:
        yield emu


def _config(emu: OpenAIEmulator) -> dict[str, object]:
    return {
        "providers": {"tls": openai_provider(emu.url)},
        "models": {"m": [{"provider": "tls", "model": "gpt-4o-mini"}]},
        # No start-up probe: against the untrusted certificate it could open the circuit before
        # the test's request, which would then be refused (503) without reaching the upstream.
        "resilience": {"health": {"active": False}},
    }


def test_a_trusted_https_upstream_answers_plain_and_streamed(
    tls_emu: OpenAIEmulator, ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert tls_emu.url.startswith("https://")
    with GatewayProcess(_config(tls_emu), env={"SSL_CERT_FILE": str(bundle)}) as gw:
        plain = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"]
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
        ) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert stream.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) > 2
    calls = [r for r in tls_emu.requests if r.path == "/v1/chat/completions"]
    assert len(calls) >= 2
    assert calls[-1].headers.get("Authorization") == "Bearer test-key"  # sent inside TLS


def test_an_untrusted_certificate_is_refused_and_says_why(tls_emu: OpenAIEmulator) -> None:
    with GatewayProcess(_config(tls_emu)) as gw:  # the system trust store does not know the test CA
        r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_unreachable"
    assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
