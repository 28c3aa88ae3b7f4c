"""Typed configuration, validated once at start-up.

The YAML file follows the contract in DESIGN.md ("Configuration contract"). String values may
reference credentials instead of embedding them:

- ``${env:NAME}`` (or ``${env:NAME:-default}``): an environment variable;
- ``${file:/path}``: the content of a file (Docker/Kubernetes mounted secrets), stripped;
- ``${secret:NAME}``: a secret from the backend the ``secrets:`` section chooses
  (``security/secrets.py``): by default ``secrets.dir`` (``/run/secrets``) then the
  environment variable NAME upper-cased (``-``/``.`` → ``_``); or HashiCorp Vault, AWS
  Secrets Manager, or a chain. The ``secrets:`` section itself may use only ``${env:}``
  and ``${file:}``.

Unknown keys are rejected, and every error names the exact key and what to do about it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator

from .accounting.pricing import PriceSettings
from .errors import ConfigError
from .observability.tracing import TracingSettings
from .resilience.breaker import BreakerSettings
from .resilience.health import HealthSettings
from .security.secrets import SecretsBackend, SecretsSettings, build_backend

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
VIRTUAL_KEY_PREFIX = "sk-tia-"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorsConfig(_Strict):
    """Cross-origin access for browser clients; off unless origins are listed."""

    allow_origins: list[str] = Field(default_factory=list, description='exact origins, or ["*"]')
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allow_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "content-type", "x-api-key", "x-request-id"]
    )
    allow_credentials: bool = False
    max_age_s: int = Field(600, ge=0)

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                "server.cors: allow_credentials cannot be combined with allow_origins ['*']; "
                "list the exact origins"
            )
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES, ge=1024, description="request line + headers; more gets 431"
    )
    graceful_timeout_s: float = Field(30.0, ge=0)
    request_timeout_s: float = Field(
        600.0, gt=0, description="the longest a request may take, retries, failover and a stream included"
    )
    insecure: bool = False
    tls_cert: str | None = Field(None, description="PEM certificate (chain): serve HTTPS")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    cors: CorsConfig = Field(default_factory=CorsConfig)
    admin_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics and /admin/* only on this port"
    )
    admin_host: str | None = Field(None, description="address of admin_port (default: host)")
    metrics_token: SecretStr | None = Field(None, description="/metrics needs 'Bearer <token>'")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key go together; set both or neither")
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError("server.admin_port must differ from server.port; pick another port")
        if self.admin_host is not None and self.admin_port is None:
            raise ValueError("server.admin_host needs server.admin_port; set both or neither")
        return self


class StoreConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./tokyo-ia.db"


class RedisConfig(_Strict):
    url: str | None = None


class CacheConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    ttl_s: float = Field(3600, gt=0)
    max_bytes: int = Field(268435456, gt=0)
    coalesce: bool = True
    per_key: bool = Field(
        False, description="every key gets its own entries (else keys allowed the same model share them)"
    )


class StaticKeyConfig(_Strict):
    key: SecretStr
    name: str
    models: list[str] = Field(default_factory=lambda: ["*"])
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)


class AuthConfig(_Strict):
    master_key: SecretStr | None = None
    keys: list[StaticKeyConfig] = Field(default_factory=list)
    key_cache_ttl_s: float = Field(5.0, ge=0, description="how long a virtual key lookup is trusted")
    key_negative_ttl_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _master_is_not_a_virtual_key(self) -> AuthConfig:
        if self.master_key is not None and self.master_key.get_secret_value().startswith(VIRTUAL_KEY_PREFIX):
            raise ValueError(
                f"master_key must not start with '{VIRTUAL_KEY_PREFIX}', the prefix of virtual "
                "keys, so it is never mistaken for one; generate another, e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.master_key is not None or bool(self.keys)


class ProviderConfig(_Strict):
    """Settings every provider kind accepts. Provider modules subclass it for their extras."""

    kind: str
    api_key: SecretStr | None = None
    base_url: str | None = None
    timeout_s: float = Field(600.0, gt=0, description="total time for one upstream call")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float | None = Field(
        None, gt=0, description="longest silence between two reads (streams)"
    )
    max_connections: int = Field(100, ge=1)
    keepalive_s: float = Field(60.0, ge=0)
    rpm: int | None = Field(None, ge=1, description="client-side limit: requests per minute")
    tpm: int | None = Field(None, ge=1, description="client-side limit: tokens per minute")
    throttle_wait_s: float = Field(
        1.0, ge=0, description="wait this long for the client-side limit, else fail over at once"
    )
    max_retries: int = Field(1, ge=0, le=10, description="retries of a retryable failure")
    retry_backoff_s: float = Field(0.25, ge=0)
    retry_backoff_max_s: float = Field(4.0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)


class LimitsConfig(_Strict):
    """Global limits, shared by every key (across replicas when Redis is configured)."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)


class BatchingConfig(_Strict):
    """A background writer's batches (store/batch.py): the hot path never waits on the database."""

    enabled: bool = True
    batch_size: int = Field(200, ge=1, description="write as soon as this many rows wait")
    flush_interval_s: float = Field(1.0, gt=0, description="else write what waits this often")
    max_queue: int = Field(100_000, ge=1, description="rows waiting at most; then the oldest is dropped")

    def writer_options(self) -> dict[str, Any]:
        """The keyword arguments of a :class:`~tokyo_ia.store.batch.BatchWriter`."""
        return {
            "batch_size": self.batch_size,
            "flush_interval_s": self.flush_interval_s,
            "max_queue": self.max_queue,
        }


class AuditConfig(BatchingConfig):
    """The append-only, hash-chained audit trail (written in batches, off the hot path)."""

    trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-For is believed"
    )
    max_payload_bytes: int = Field(
        16384, ge=256, description="log_payloads keys: each of prompt and answer is cut to this size"
    )


class LedgerConfig(BatchingConfig):
    """The spend ledger: one row per model request (written in batches, off the hot path)."""


class ResilienceConfig(_Strict):
    """Circuit breakers per deployment and health checks (shared through Redis if configured)."""

    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)


class DeploymentConfig(_Strict):
    provider: str
    model: str
    weight: float = Field(1.0, gt=0)
    priority: int = 0


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    cache: CacheConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    prices: dict[str, PriceSettings] = Field(
        default_factory=dict, description="USD per million tokens, overriding the shipped table"
    )
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, list[DeploymentConfig]] = Field(default_factory=dict)
    _credentials: Credentials | None = PrivateAttr(default=None)

    @property
    def credentials(self) -> Credentials | None:
        """Provider keys to read again every ``secrets.refresh_s`` (None: nothing can change)."""
        return self._credentials

    @model_validator(mode="before")
    @classmethod
    def _typed_providers(cls, data: Any) -> Any:
        """Validate each provider section against its kind's own settings model."""
        from .providers.registry import settings_model_for

        if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
            return data
        providers = {}
        for name, section in data["providers"].items():
            if isinstance(section, dict) and "kind" in section:
                model = settings_model_for(str(section["kind"]), f"providers.{name}.kind")
                try:
                    providers[name] = model.model_validate(section)
                except ValidationError as exc:
                    raise ConfigError(_format_validation(exc, prefix=f"providers.{name}")) from None
            else:
                providers[name] = section
        return {**data, "providers": providers}

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        for public, deployments in self.models.items():
            if not deployments:
                raise ValueError(
                    f"models.{public}: lists no deployment; add at least one "
                    "{provider: NAME, model: UPSTREAM_MODEL} or remove the model"
                )
            for i, dep in enumerate(deployments):
                if dep.provider not in self.providers:
                    known = ", ".join(sorted(self.providers)) or "none"
                    raise ValueError(
                        f"models.{public}[{i}].provider: '{dep.provider}' is not a configured "
                        f"provider; add providers.{dep.provider} or use one of: {known}"
                    )
        return self


# ---------------------------------------------------------------------------------------
# Loading

_REF = re.compile(r"\$\{(env|file|secret):([^}]*)\}")


class _Resolver:
    def __init__(self, secrets: SecretsBackend | None, environ: Mapping[str, str]) -> None:
        self.secrets = secrets  # None while resolving the secrets: section itself
        self.environ = environ

    def resolve(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            return self._substitute(value, path)
        return value

    def _substitute(self, text: str, path: str) -> str:
        return _REF.sub(lambda m: self._one(m.group(1), m.group(2), path), text)

    def _one(self, kind: str, ref: str, path: str) -> str:
        if kind == "env":
            name, _, default = ref.partition(":-")
            value = self.environ.get(name)
            if value is None or value == "":
                if ":-" in ref:
                    return default
                raise ConfigError(
                    f"{path}: environment variable {name} is not set; export {name}=... "
                    f"or write ${{env:{name}:-default}} to make it optional"
                )
            return value
        if kind == "file":
            try:
                return Path(ref).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{path}: cannot read secret file {ref} ({exc.strerror}); "
                    "mount the file or change the path"
                ) from None
        if self.secrets is None:
            raise ConfigError(
                f"{path}: ${{secret:{ref}}} cannot configure the secrets backend itself; "
                "use ${env:NAME} or ${file:/path} here"
            )
        try:
            return self.secrets.get(ref)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _secrets_backend(section: Any, source: str, environ: Mapping[str, str]) -> SecretsBackend:
    """Build the secrets backend first, since the rest of the file may reference it."""
    resolved = _Resolver(None, environ).resolve(section or {}, "secrets")
    try:
        settings = SecretsSettings.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation(exc, prefix='secrets')}") from None
    try:
        return build_backend(settings, environ=environ)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _format_validation(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        key = ".".join(p for p in (prefix, loc) if p)
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; remove it or check its spelling")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing; add it")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown}" if key else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


class Credentials:
    """The providers' ``api_key`` values that may change while the gateway runs (written with
    ``${secret:NAME}`` or ``${file:/path}``), and how to read them again."""

    def __init__(self, templates: dict[str, str], resolver: _Resolver) -> None:
        self.templates = templates  # provider name -> the api_key as written in the file
        self._resolver = resolver

    def read_all(self) -> dict[str, str | ConfigError]:
        """Every such key as it is now, or why it cannot be read (blocking: call it in a worker
        thread). The secrets backend reads its cached values again first; one that fails to is
        kept by the backend (with a warning), so an outage of the secrets manager changes nothing."""
        if self._resolver.secrets is not None:
            self._resolver.secrets.refresh()
        keys: dict[str, str | ConfigError] = {}
        for name, template in self.templates.items():
            try:
                keys[name] = self._resolver.resolve(template, f"providers.{name}.api_key")
            except ConfigError as exc:
                keys[name] = exc
        return keys


def _credential_templates(data: dict[str, Any]) -> dict[str, str]:
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return {}
    templates = {}
    for name, section in providers.items():
        key = section.get("api_key") if isinstance(section, dict) else None
        if isinstance(key, str) and any(kind in ("secret", "file") for kind, _ in _REF.findall(key)):
            templates[str(name)] = key
    return templates


def parse_config(data: Any, *, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed mapping (references are resolved first)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, ...)")
    env = os.environ if environ is None else environ
    backend = _secrets_backend(data.get("secrets"), source, env)
    resolver = _Resolver(backend, env)
    resolved = resolver.resolve(data, "")
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation(exc)}") from None
    templates = _credential_templates(data)
    if templates:
        config._credentials = Credentials(templates, resolver)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p} ({exc.strerror}); check the --config path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(p))


def load_config_or_default(path: str | os.PathLike[str] | None = None) -> Config:
    """What every command runs on: ``path``, else ``$TOKYO_IA_CONFIG``, else the embedded default."""
    path = path or os.environ.get("TOKYO_IA_CONFIG")
    return load_config(path) if path else default_config()


def default_config(environ: Mapping[str, str] | None = None) -> Config:
    """The embedded default: demo provider plus each real provider whose key is set."""
    from .providers.registry import embedded_defaults

    env = os.environ if environ is None else environ
    providers: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for name, section, public_models in embedded_defaults(env):
        providers[name] = section
        for public, upstream in public_models.items():
            models.setdefault(public, []).append({"provider": name, "model": upstream})
    return parse_config({"providers": providers, "models": models}, source="embedded default", environ=env)
