"""The HTTP layer: a thin ASGI application over the pipeline."""

from .app import GatewayApp, create_app, create_app_from_env

__all__ = ["GatewayApp", "create_app", "create_app_from_env"]
