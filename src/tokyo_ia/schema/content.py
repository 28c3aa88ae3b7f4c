"""Helpers for OpenAI content parts that several provider translations share."""

from __future__ import annotations

from typing import NamedTuple


class DataURL(NamedTuple):
    media_type: str  # "" when the URL names none
    base64: bool
    payload: str  # as written after the comma (still percent-encoded when not base64)


def parse_data_url(url: str) -> DataURL | None:
    """Split an RFC 2397 ``data:`` URL (``data:image/png;base64,...``); None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, _, payload = url[5:].partition(",")
    media_type, *params = header.split(";")
    return DataURL(media_type, "base64" in params, payload)
