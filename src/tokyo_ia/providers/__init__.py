"""Providers: one module per upstream API behind one interface (``base.Provider``)."""

from .base import ChatCall, CheckResult, EmbedCall, Provider
from .registry import create, kinds, register

__all__ = ["ChatCall", "CheckResult", "EmbedCall", "Provider", "create", "kinds", "register"]
