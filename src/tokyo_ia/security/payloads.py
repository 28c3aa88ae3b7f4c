"""Prompts and completions in the audit trail, only for keys created with ``log_payloads``.

Nothing here runs for other keys: the HTTP layer keeps a request's body and answer on the
:class:`~tokyo_ia.pipeline.RequestContext` only when the caller's key has the flag, and the
audit record gets a ``payload`` entry only when they are there. Each side is stored as JSON
text cut to ``audit.max_payload_bytes`` (UTF-8), so one huge prompt cannot bloat the trail:

``{"request": "[{\\"role\\": \\"user\\", ...}]", "response": "[{\\"role\\": \\"assistant\\", ...}]",
"truncated": false}``

``request`` is the chat ``messages`` (embeddings: ``input``); ``response`` is the message of
each choice (for a stream, the concatenated text deltas). Embedding vectors are not stored.
"""

from __future__ import annotations

from typing import Any

import orjson

JSON = dict[str, Any]
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024


def payload_detail(request: Any, response: JSON | None, max_bytes: int) -> JSON:
    """The audit ``detail["payload"]`` entry for a request kept by a ``log_payloads`` key."""
    prompt = request.get("messages", request.get("input")) if isinstance(request, dict) else request
    out: JSON = {"truncated": False}
    out["request"] = _clip(prompt, max_bytes, out)
    choices = response.get("choices") if response is not None else None
    if isinstance(choices, list):
        messages = [c.get("message") for c in choices if isinstance(c, dict)]
        out["response"] = _clip(messages, max_bytes, out)
    return out


def _clip(value: Any, max_bytes: int, out: JSON) -> str:
    raw = orjson.dumps(value, default=str)
    if len(raw) <= max_bytes:
        return raw.decode()
    out["truncated"] = True
    return raw[:max_bytes].decode("utf-8", "ignore")


class Transcript:
    """The text of a streamed answer, gathered chunk by chunk for :func:`payload_detail`."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, chunk: JSON) -> None:
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                self.parts.append(content)

    def response(self) -> JSON:
        """The answer shaped like a non-streamed response (one assistant message)."""
        return {"choices": [{"message": {"role": "assistant", "content": "".join(self.parts)}}]}
