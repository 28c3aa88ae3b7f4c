"""HashiCorp Vault KV version 2, over Vault's HTTP API with the standard library.

``GET {addr}/v1/{mount}/data/{path}`` with ``X-Vault-Token`` (and ``X-Vault-Namespace`` for
Vault Enterprise namespaces) answers ``{"data": {"data": {FIELD: VALUE, ...}, "metadata":
{...}}}``. A secret NAME is ``path`` or ``path#field``; the field defaults to ``value``.

No client library (hvac) is needed for one GET, and config is read before the event loop
starts, so a blocking ``urllib`` call is the right tool. Proxies from the environment are
honoured, as Vault's own CLI does.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import SecretStr

from ..errors import ConfigError
from .secrets import SecretNotFoundError, secret_error

DEFAULT_FIELD = "value"


def split_name(name: str, default_field: str = DEFAULT_FIELD) -> tuple[str, str]:
    """``path#field`` → (path, field); the path loses surrounding slashes."""
    path, _, field = name.partition("#")
    return path.strip("/"), field or default_field


def _error_detail(raw: bytes) -> str:
    """Vault's ``{"errors": [...]}`` as one short line (its messages never carry secret values)."""
    try:
        errors = json.loads(raw).get("errors") or []
    except (ValueError, AttributeError):
        return ""
    text = "; ".join(re.sub(r"\s+", " ", str(e)).strip() for e in errors)
    return text[:200]


class VaultBackend:
    """Read secrets from a Vault KV v2 mount. Stateless: put a CachedBackend in front."""

    kind = "vault"

    def __init__(
        self,
        addr: str,
        token: str | SecretStr,
        *,
        mount: str = "secret",
        namespace: str | None = None,
        timeout_s: float = 5.0,
        ca_cert: str | None = None,
    ) -> None:
        if not addr.startswith(("http://", "https://")):
            raise ConfigError(f"secrets.vault.addr: '{addr}' is not a URL; write http(s)://HOST:8200")
        self.addr = addr.rstrip("/")
        self.mount = mount.strip("/")
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self._ssl = self._ssl_context(ca_cert)

    @staticmethod
    def _ssl_context(ca_cert: str | None) -> ssl.SSLContext | None:
        if ca_cert is None:
            return None
        try:
            return ssl.create_default_context(cafile=ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"secrets.vault.ca_cert: cannot load {ca_cert} ({exc}); point it at a PEM bundle"
            ) from None

    def __repr__(self) -> str:
        return f"VaultBackend(addr={self.addr!r}, mount={self.mount!r}, namespace={self.namespace!r})"

    def refresh(self) -> None:
        """Nothing to do: every ``get`` asks Vault."""

    def get(self, name: str) -> str:
        path, field = split_name(name)
        if not path:
            fix = "write ${secret:PATH} or ${secret:PATH#FIELD}"
            raise secret_error(name, self.kind, "names no path", fix)
        data = self._read(name, path)
        if field not in data:
            fields = ", ".join(sorted(data)) or "none"
            raise SecretNotFoundError(
                name,
                self.kind,
                f"the secret at {self.mount}/{path} has no field '{field}' (its fields: {fields}); "
                f"name one as {path}#FIELD or write it with "
                f"`vault kv patch -mount={self.mount} {path} {field}=...`",
            )
        value = data[field]
        return value if isinstance(value, str) else json.dumps(value)

    def _request(self, path: str) -> urllib.request.Request:
        url = f"{self.addr}/v1/{urllib.parse.quote(self.mount)}/data/{urllib.parse.quote(path)}"
        headers = {"X-Vault-Token": self._token.get_secret_value(), "Accept": "application/json"}
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        return urllib.request.Request(url, headers=headers, method="GET")

    def _read(self, name: str, path: str) -> dict[str, Any]:
        """The ``data.data`` mapping of the latest version, or a ConfigError saying what to fix."""
        try:
            with urllib.request.urlopen(self._request(path), timeout=self.timeout_s, context=self._ssl) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read()
            raise self._http_error(name, path, exc.code, body) from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URLs
            reason = getattr(exc, "reason", None) or exc
            raise secret_error(
                name,
                self.kind,
                f"Vault at {self.addr} is unreachable ({reason})",
                "check secrets.vault.addr (or VAULT_ADDR) and that Vault is running",
            ) from None
        try:
            data = json.loads(raw)["data"]["data"]
        except (ValueError, KeyError, TypeError):
            data = None
        if not isinstance(data, dict):
            raise secret_error(
                name,
                self.kind,
                f"{self.addr} answered something that is not a KV v2 secret",
                f"check that secrets.vault.mount ('{self.mount}') is a KV version 2 mount",
            )
        return data

    def _http_error(self, name: str, path: str, status: int, body: bytes) -> ConfigError:
        where = f"{self.mount}/data/{path}"
        detail = _error_detail(body)
        shown = f" ({detail})" if detail else ""
        if status == 403:
            return secret_error(
                name,
                self.kind,
                f"Vault denied reading {where}{shown}",
                "check that the token (secrets.vault.token or VAULT_TOKEN) is valid and not expired, "
                f"and that its policy grants 'read' on {where}",
            )
        if status == 404:
            if _is_deleted(body):
                fix = f"its latest version at {where} is deleted; undelete it or write a new version"
            else:
                fix = (
                    f"nothing at {where}; write it with `vault kv put -mount={self.mount} {path} value=...`"
                    f" or check that secrets.vault.mount ('{self.mount}') is a KV version 2 mount"
                )
            return SecretNotFoundError(name, self.kind, fix)
        if status == 503:
            return secret_error(
                name,
                self.kind,
                f"Vault at {self.addr} is sealed or unavailable{shown}",
                "unseal it (`vault operator unseal`) or point secrets.vault.addr at an active node",
            )
        return secret_error(
            name, self.kind, f"Vault answered HTTP {status} for {where}{shown}", "check Vault's server log"
        )


def _is_deleted(body: bytes) -> bool:
    """A 404 whose metadata has a deletion_time: the path exists but its latest version is deleted."""
    try:
        meta = json.loads(body)["data"]["metadata"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(meta, dict) and bool(meta.get("deletion_time") or meta.get("destroyed"))
