"""HTTPS with a certificate made in the test, CORS and security headers."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
import trustme

from tests.support import GatewayProcess

USER = [{"role": "user", "content": "ping over tls"}]


def test_openai_sdk_over_https_with_the_test_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    gw = GatewayProcess(args=["--tls-cert", str(cert_path), "--tls-key", str(key_path)])
    gw.scheme = "https"
    gw.verify = str(ca_path)
    with gw:
        with openai.OpenAI(
            base_url=gw.url + "/v1",
            api_key="x",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca_path))),
        ) as client:
            reply = client.chat.completions.create(model="demo", messages=USER)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "You said: ping over tls"
        r = httpx.get(gw.url + "/health/live", verify=ssl.create_default_context(cafile=str(ca_path)))
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert "https://127.0.0.1" in gw.log


def test_cors_preflight_and_headers() -> None:
    config = {
        "server": {"cors": {"allow_origins": ["https://app.example"]}},
        "providers": {"demo": {"kind": "demo"}},
        "models": {"demo": [{"provider": "demo", "model": "demo"}]},
    }
    with GatewayProcess(config) as gw:
        pre = httpx.options(
            gw.url + "/v1/chat/completions",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        denied = httpx.options(
            gw.url + "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert denied.status_code == 403
        assert "access-control-allow-origin" not in denied.headers
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"origin": "https://app.example"},
            json={"model": "demo", "messages": USER},
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        other = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"origin": "https://evil.example"},
            json={"model": "demo", "messages": USER},
        )
        assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default() -> None:
    with GatewayProcess() as gw:
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"origin": "https://app.example"},
            json={"model": "demo", "messages": USER},
        )
        assert "access-control-allow-origin" not in r.headers
