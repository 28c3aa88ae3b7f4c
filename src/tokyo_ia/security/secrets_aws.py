"""AWS Secrets Manager, through boto3 (the optional extra ``tokyo-ia[aws]``).

A secret NAME is a secret id (name or ARN), or ``id#key`` to pick one key of a secret whose
SecretString is a JSON object (the shape the AWS console writes for key/value secrets).
Credentials come from boto3's usual chain: environment, shared profile, IAM role.

boto3 is imported when the backend is built, never when this module is imported, so the
gateway stays light for everyone who does not use AWS; it is typed as ``Any`` (no stubs).
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from ..errors import ConfigError
from .secrets import SecretNotFoundError, secret_error

KIND = "aws"


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            "secrets.backend: the aws secrets backend needs boto3, which is not installed; "
            "install the extra: pip install 'tokyo-ia[aws]'"
        ) from None


class AWSSecretsManagerBackend:
    """Read SecretString values with ``get_secret_value``. Stateless: put a CachedBackend in front."""

    kind = KIND

    def __init__(
        self, *, region: str | None = None, endpoint_url: str | None = None, timeout_s: float = 5.0
    ) -> None:
        boto3 = _import("boto3")
        self._exc = _import("botocore.exceptions")
        config = _import("botocore.config").Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2, "mode": "standard"}
        )
        self.endpoint_url = endpoint_url
        try:
            self._client = boto3.session.Session().client(
                "secretsmanager", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except self._exc.NoRegionError:
            raise ConfigError(
                "secrets.aws.region: not set; set it (e.g. us-east-1) or export AWS_REGION"
            ) from None
        except self._exc.BotoCoreError as exc:
            raise ConfigError(f"secrets.aws: cannot create the Secrets Manager client ({exc})") from None
        self.region: str = self._client.meta.region_name

    def __repr__(self) -> str:
        return f"AWSSecretsManagerBackend(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    def refresh(self) -> None:
        """Nothing to do: every ``get`` asks Secrets Manager."""

    def get(self, name: str) -> str:
        secret_id, _, key = name.partition("#")
        text = self._secret_string(name, secret_id)
        return self._pick(name, secret_id, key, text) if key else text

    def _secret_string(self, name: str, secret_id: str) -> str:
        try:
            answer = self._client.get_secret_value(SecretId=secret_id)
        except self._exc.ClientError as exc:
            raise self._client_error(name, secret_id, exc.response.get("Error", {})) from None
        except self._exc.NoCredentialsError:
            raise secret_error(
                name,
                KIND,
                "no AWS credentials were found",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or attach an IAM role",
            ) from None
        except (self._exc.EndpointConnectionError, self._exc.ConnectTimeoutError, self._exc.ReadTimeoutError):
            where = self.endpoint_url or f"Secrets Manager in {self.region}"
            fix = "check the network, secrets.aws.region and secrets.aws.endpoint_url"
            raise secret_error(name, KIND, f"{where} is unreachable", fix) from None
        except self._exc.BotoCoreError as exc:
            raise secret_error(name, KIND, f"the AWS call failed ({type(exc).__name__})", str(exc)) from None
        text = answer.get("SecretString")
        if not isinstance(text, str):
            raise secret_error(
                name, KIND, f"'{secret_id}' holds a binary secret", "store the value as SecretString (text)"
            )
        return text

    def _client_error(self, name: str, secret_id: str, error: dict[str, Any]) -> ConfigError:
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))[:200]
        if code == "ResourceNotFoundException":
            return SecretNotFoundError(
                name,
                KIND,
                f"no secret '{secret_id}' in {self.region}; create it with `aws secretsmanager create-secret "
                f"--name {secret_id} --secret-string ...` or check secrets.aws.region",
            )
        if code in ("AccessDeniedException", "AccessDenied"):
            fix = f"grant secretsmanager:GetSecretValue on '{secret_id}' (and kms:Decrypt on its key)"
            return secret_error(name, KIND, f"access denied ({message})", fix)
        if code in ("UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"):
            return secret_error(
                name, KIND, f"AWS rejected the credentials ({code})", "check or renew the AWS credentials"
            )
        if code == "DecryptionFailure":
            return secret_error(name, KIND, f"KMS could not decrypt it ({message})", "allow kms:Decrypt")
        fix = "if it is scheduled for deletion, restore it with `aws secretsmanager restore-secret`"
        return secret_error(name, KIND, f"AWS answered {code} ({message})", fix)

    def _pick(self, name: str, secret_id: str, key: str, text: str) -> str:
        """One key of a JSON-object secret; errors list key names, never values."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise secret_error(
                name,
                KIND,
                f"'{secret_id}' is not a JSON object, so '#{key}' cannot pick a key from it",
                f"store a JSON object or refer to it as ${{secret:{secret_id}}}",
            )
        if key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise SecretNotFoundError(name, KIND, f"'{secret_id}' has no key '{key}' (its keys: {keys})")
        value = data[key]
        return value if isinstance(value, str) else json.dumps(value)
