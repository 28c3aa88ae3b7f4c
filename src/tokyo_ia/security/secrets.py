"""Secrets backends: where ``${secret:NAME}`` in the configuration comes from.

The config is resolved once at start-up, before any event loop runs, so the interface is
synchronous: ``get(name) -> str`` and ``refresh()``. Backends:

- :class:`EnvBackend`        NAME upper-cased, ``-`` and ``.`` turned into ``_``;
- :class:`FileBackend`       one file per secret in a directory (Docker/Kubernetes mounts);
- ``VaultBackend``           HashiCorp Vault KV v2 (``secrets_vault.py``), NAME ``path#field``;
- ``AWSSecretsManagerBackend`` (``secrets_aws.py``, extra ``tokyo-ia[aws]``), NAME ``id#json-key``;
- :class:`ChainBackend`      several of them, in order;
- :class:`CachedBackend`     a TTL cache in front of any of them, so rotated secrets can be
  re-read by :meth:`CachedBackend.refresh` (or :func:`refresh_periodically`).

Every failure is a :class:`~tokyo_ia.errors.ConfigError` naming the secret, the backend and
the fix. A secret that is simply absent is a :class:`SecretNotFoundError`, so a chain moves
on to its next backend, while a denied token, a sealed Vault or an unreachable service stops
the chain: silently falling back to another source would hide an outage or a policy mistake.
No message, log line or ``repr()`` ever contains a secret value or a credential.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..errors import ConfigError

log = logging.getLogger("tokyo_ia.secrets")

DEFAULT_SECRETS_DIR = "/run/secrets"


@runtime_checkable
class SecretsBackend(Protocol):
    """Where secret values come from. ``get`` raises ConfigError (SecretNotFoundError if absent)."""

    def get(self, name: str) -> str: ...

    def refresh(self) -> None: ...


class SecretNotFoundError(ConfigError):
    """The backend answered, and it has no such secret: the next backend in a chain may."""

    def __init__(self, name: str, backend: str, fix: str) -> None:
        super().__init__(f"secret '{name}' not found in the {backend} secrets backend; {fix}")
        self.secret_name = name
        self.backend = backend
        self.fix = fix


def secret_error(name: str, backend: str, problem: str, fix: str) -> ConfigError:
    """The one shape of every other secrets error: which secret, which backend, what, the fix."""
    return ConfigError(f"secret '{name}' ({backend} secrets backend): {problem}; {fix}")


# ---------------------------------------------------------------------------------------
# Environment and files


def env_name(name: str) -> str:
    """The environment variable a secret NAME maps to (``openai-key`` → ``OPENAI_KEY``)."""
    return name.upper().replace("-", "_").replace(".", "_")


class EnvBackend:
    """Secrets from environment variables. An empty variable counts as unset."""

    kind = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def get(self, name: str) -> str:
        var = env_name(name)
        value = (os.environ if self._environ is None else self._environ).get(var)
        if not value:
            raise SecretNotFoundError(name, self.kind, f"set the environment variable {var}")
        return value

    def refresh(self) -> None:
        """Nothing to do: every ``get`` reads the environment."""

    def __repr__(self) -> str:
        return "EnvBackend()"


class FileBackend:
    """Secrets mounted as files, one per secret: ``{directory}/{name}``, surrounding whitespace stripped.

    This is how Docker (``/run/secrets``) and Kubernetes secret volumes expose secrets. NAME may
    contain sub-directories but never leaves ``directory``.
    """

    kind = "file"

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_SECRETS_DIR) -> None:
        self.directory = Path(directory)

    def _path(self, name: str) -> Path:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or name.startswith(("/", "\\")) or any(p in (".", "..") for p in parts):
            raise secret_error(
                name, self.kind, "is not a valid file name", "use a plain name such as 'openai-key'"
            )
        return self.directory.joinpath(*parts)

    def get(self, name: str) -> str:
        path = self._path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            raise SecretNotFoundError(name, self.kind, f"put it in the file {path}") from None
        except UnicodeDecodeError:
            raise secret_error(name, self.kind, f"{path} is not UTF-8 text", "store it as text") from None
        except OSError as exc:
            raise secret_error(
                name, self.kind, f"cannot read {path} ({exc.strerror})", "fix the file's permissions"
            ) from None
        value = text.strip()
        if not value:
            raise SecretNotFoundError(name, self.kind, f"the file {path} is empty; write the secret into it")
        return value

    def refresh(self) -> None:
        """Nothing to do: every ``get`` reads the file (mounted secrets are updated in place)."""

    def __repr__(self) -> str:
        return f"FileBackend({str(self.directory)!r})"


# ---------------------------------------------------------------------------------------
# Composition


class ChainBackend:
    """Try several backends in order; the first that has the secret wins.

    Only :class:`SecretNotFoundError` moves on to the next backend. Any other error (denied,
    sealed, unreachable) is raised at once, because falling back would hide it.
    """

    def __init__(self, backends: Sequence[SecretsBackend]) -> None:
        if not backends:
            raise ConfigError("secrets.chain: lists no backend; name at least one of file, env, vault, aws")
        self.backends = tuple(backends)

    def get(self, name: str) -> str:
        missing: list[SecretNotFoundError] = []
        for backend in self.backends:
            try:
                return backend.get(name)
            except SecretNotFoundError as exc:
                missing.append(exc)
        kinds = ", ".join(m.backend for m in missing)
        fixes = "; or ".join(m.fix for m in missing)
        raise SecretNotFoundError(name, f"chain ({kinds})", fixes)

    def refresh(self) -> None:
        for backend in self.backends:
            backend.refresh()

    def __repr__(self) -> str:
        return f"ChainBackend({list(self.backends)!r})"


class CachedBackend:
    """A TTL cache in front of a backend, so a secret is fetched once and re-read when it may have rotated.

    A value older than ``ttl_s`` is re-read on the next ``get``; ``ttl_s=0`` keeps values until
    :meth:`refresh`. When a re-read fails but an older value is known, the older value is kept
    and a warning names the secret (never the value): an outage of the secrets manager must
    not take down a gateway that already holds working credentials. Thread-safe, because
    :func:`refresh_periodically` runs ``refresh`` in a worker thread.
    """

    def __init__(
        self, inner: SecretsBackend, ttl_s: float = 300.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[SecretStr, float]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> str:
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None and (self.ttl_s <= 0 or self._clock() - entry[1] < self.ttl_s):
            return entry[0].get_secret_value()
        return self._fetch(name, stale=entry[0] if entry else None)

    def _fetch(self, name: str, stale: SecretStr | None) -> str:
        try:
            value = self.inner.get(name)
        except ConfigError as exc:
            if stale is None:
                raise
            log.warning("secrets: keeping the previous value of '%s': %s", name, exc)
            return stale.get_secret_value()
        with self._lock:
            self._entries[name] = (SecretStr(value), self._clock())
        return value

    def refresh(self) -> None:
        """Re-read every secret read so far, keeping the previous value of any that fails."""
        self.inner.refresh()
        with self._lock:
            known = dict(self._entries)
        for name, (value, _) in known.items():
            self._fetch(name, stale=value)

    @property
    def names(self) -> list[str]:
        """The names cached so far (never their values)."""
        with self._lock:
            return sorted(self._entries)

    def __repr__(self) -> str:
        return f"CachedBackend({self.inner!r}, ttl_s={self.ttl_s}, cached={len(self._entries)})"


async def refresh_periodically(backend: SecretsBackend, interval_s: float) -> None:
    """Call ``backend.refresh()`` every ``interval_s`` seconds until cancelled.

    Backends are synchronous (they run at start-up, before the loop), so each refresh runs in
    a worker thread and never blocks the event loop. Failures are logged, never raised: a
    transient outage must not end the refresh task.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(backend.refresh)
        except ConfigError as exc:
            log.warning("secrets: periodic refresh failed: %s", exc)


# ---------------------------------------------------------------------------------------
# Settings (the `secrets:` section) and the factory

BackendKind = Literal["file", "env", "vault", "aws"]
_DEFAULT_CHAIN: tuple[BackendKind, ...] = ("file", "env")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VaultSettings(_Strict):
    """HashiCorp Vault KV v2. Unset values fall back to Vault's own variables (VAULT_ADDR, ...)."""

    addr: str | None = Field(None, description="e.g. https://vault.internal:8200; default $VAULT_ADDR")
    token: SecretStr | None = Field(None, description="default $VAULT_TOKEN; use ${file:...} for a file")
    mount: str = Field("secret", min_length=1, description="path of the KV v2 mount")
    namespace: str | None = Field(None, description="Vault Enterprise namespace; default $VAULT_NAMESPACE")
    timeout_s: float = Field(5.0, gt=0)
    ca_cert: str | None = Field(None, description="PEM bundle to verify Vault's TLS; default $VAULT_CACERT")


class AWSSettings(_Strict):
    """AWS Secrets Manager. Credentials come from boto3's usual chain (env, profile, IAM role)."""

    region: str | None = Field(None, description="default $AWS_REGION / $AWS_DEFAULT_REGION")
    endpoint_url: str | None = Field(None, description="a VPC endpoint, LocalStack or moto")
    timeout_s: float = Field(5.0, gt=0)


class SecretsSettings(_Strict):
    """The ``secrets:`` section. The default chain (file, then env) is the embedded default's."""

    backend: Literal["file", "env", "vault", "aws", "chain"] = "chain"
    chain: list[BackendKind] = Field(default_factory=lambda: list(_DEFAULT_CHAIN))
    dir: str = DEFAULT_SECRETS_DIR
    vault: VaultSettings = Field(default_factory=VaultSettings)
    aws: AWSSettings = Field(default_factory=AWSSettings)
    refresh_s: float = Field(300.0, ge=0, description="how long a value is trusted; 0 = until restart")

    @model_validator(mode="after")
    def _chain_not_empty(self) -> SecretsSettings:
        if self.backend == "chain" and not self.chain:
            raise ValueError("chain: lists no backend; name at least one of file, env, vault, aws")
        return self


def _env_or(value: str | None, var: str, environ: Mapping[str, str]) -> str | None:
    return value if value else (environ.get(var) or None)


def _build_vault(settings: VaultSettings, environ: Mapping[str, str]) -> SecretsBackend:
    from .secrets_vault import VaultBackend

    addr = _env_or(settings.addr, "VAULT_ADDR", environ)
    if not addr:
        raise ConfigError("secrets.vault.addr: not set; set it (https://HOST:8200) or export VAULT_ADDR")
    token = settings.token.get_secret_value() if settings.token else environ.get("VAULT_TOKEN")
    if not token:
        raise ConfigError(
            "secrets.vault.token: not set; export VAULT_TOKEN or write token: ${file:/path/to/token}"
        )
    return VaultBackend(
        addr,
        token,
        mount=settings.mount,
        namespace=_env_or(settings.namespace, "VAULT_NAMESPACE", environ),
        timeout_s=settings.timeout_s,
        ca_cert=_env_or(settings.ca_cert, "VAULT_CACERT", environ),
    )


def _build_one(
    kind: BackendKind, settings: SecretsSettings, environ: Mapping[str, str] | None
) -> SecretsBackend:
    if kind == "env":
        return EnvBackend(environ)
    if kind == "file":
        return FileBackend(settings.dir)
    if kind == "vault":
        return _build_vault(settings.vault, os.environ if environ is None else environ)
    from .secrets_aws import AWSSecretsManagerBackend

    aws = settings.aws
    return AWSSecretsManagerBackend(region=aws.region, endpoint_url=aws.endpoint_url, timeout_s=aws.timeout_s)


def build_backend(settings: SecretsSettings, *, environ: Mapping[str, str] | None = None) -> CachedBackend:
    """The backend the ``secrets:`` section describes, behind a cache of ``refresh_s`` seconds.

    Construction never contacts a secrets manager; it only checks that the settings are
    complete (address, token, boto3 installed), so a mistake is reported at start-up.
    ``environ`` (default: the live ``os.environ``) feeds the env backend and VAULT_* defaults.
    """
    kinds: list[BackendKind] = list(settings.chain) if settings.backend == "chain" else [settings.backend]
    backends = [_build_one(kind, settings, environ) for kind in kinds]
    inner = backends[0] if len(backends) == 1 else ChainBackend(backends)
    return CachedBackend(inner, settings.refresh_s)
