"""CORS for browser clients: off unless ``server.cors.allow_origins`` lists origins."""

from __future__ import annotations

from ..config import CorsConfig

Headers = list[tuple[bytes, bytes]]


class Cors:
    def __init__(self, config: CorsConfig) -> None:
        self.enabled = bool(config.allow_origins)
        self.any_origin = "*" in config.allow_origins
        self.origins = {o.encode() for o in config.allow_origins}
        self.credentials = config.allow_credentials
        self.methods = ", ".join(config.allow_methods).encode()
        self.allowed_headers = ", ".join(h.lower() for h in config.allow_headers).encode()
        self.max_age = str(config.max_age_s).encode()

    def _allow_origin(self, origin: bytes | None) -> bytes | None:
        if origin is None:
            return None
        if self.any_origin and not self.credentials:
            return b"*"
        return origin if origin in self.origins else None

    def headers(self, origin: bytes | None) -> Headers:
        """Headers for an ordinary response to a cross-origin request."""
        allowed = self._allow_origin(origin)
        if allowed is None:
            return []
        out = [(b"access-control-allow-origin", allowed), (b"vary", b"origin")]
        out.append((b"access-control-expose-headers", b"x-request-id, x-tokyo-ia-provider, x-tokyo-ia-model"))
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    def preflight(self, origin: bytes | None) -> Headers | None:
        """Headers for an OPTIONS preflight, or None if this origin is not allowed."""
        base = self.headers(origin)
        if not base:
            return None
        return [
            *base,
            (b"access-control-allow-methods", self.methods),
            (b"access-control-allow-headers", self.allowed_headers),
            (b"access-control-max-age", self.max_age),
        ]
