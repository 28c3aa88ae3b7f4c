"""The one exception tree of Tokyo-IA.

Every error the gateway raises on purpose is a :class:`TokyoIAError`. Errors that reach a
client are :class:`GatewayError` subclasses: each knows its HTTP status and the OpenAI error
``type``/``code`` it is rendered with, so the HTTP layer maps them in exactly one place
(``server/errors.py``). Third-party exceptions (aiohttp, pydantic, YAML) are converted where
they enter the code base, never classified by their message.

::

    TokyoIAError
     ├── ConfigError                      bad configuration, found at start-up
     └── GatewayError                     rendered as {"error": {...}} with .status
          ├── InvalidRequestError         400  the request must change
          │    └── UnsupportedError       400  the chosen model/provider lacks a feature
          ├── AuthenticationError         401  missing or unknown API key
          ├── PermissionDeniedError       403  key may not do this
          ├── NotFoundError               404  unknown route or model
          ├── RequestTooLargeError        413  body over the limit
          │    └── HeadersTooLargeError   431  request headers over the limit
          ├── RateLimitError              429  rate limited or over budget (.retry_after)
          ├── UpstreamError               502  a provider failed (.retryable, .failover, .provider)
          │    ├── UpstreamBadRequestError 400 the provider rejected the request itself
          │    ├── UpstreamTimeoutError   504  a provider did not answer in time
          │    └── UpstreamRateLimitError 429  a provider throttled us (.retry_after)
          └── NoHealthyDeploymentError    503  nothing left to try
"""

from __future__ import annotations

from typing import Any


class TokyoIAError(Exception):
    """Base of every error raised on purpose by Tokyo-IA."""


class ConfigError(TokyoIAError):
    """The configuration is invalid; the message names the key and the fix."""


class GatewayError(TokyoIAError):
    """An error that is returned to the client as an OpenAI-style error body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-compatible error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedError(InvalidRequestError):
    code = "unsupported"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLargeError(RequestTooLargeError):
    status = 431
    code = "headers_too_large"


class RateLimitError(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers.setdefault("retry-after", str(max(1, round(retry_after))))


class UpstreamError(GatewayError):
    """A provider call failed. ``retryable``: asking the same deployment again may succeed;
    ``failover``: another deployment may succeed where this one failed (true of every failure
    but the request itself being refused, :class:`UpstreamBadRequestError`)."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    failover = True

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        upstream_status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.provider = provider
        self.upstream_status = upstream_status
        self.retryable = retryable
        self.retry_after = retry_after


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("retryable", True)
        super().__init__(message, **kw)


class UpstreamRateLimitError(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("retryable", True)
        super().__init__(message, **kw)
        if self.retry_after is not None:
            self.headers.setdefault("retry-after", str(max(1, round(self.retry_after))))


class UpstreamBadRequestError(UpstreamError):
    """The provider rejected the request itself: the caller must change it (400)."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_bad_request"
    failover = False  # the same request would be refused by any deployment


class NoHealthyDeploymentError(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_deployment"
