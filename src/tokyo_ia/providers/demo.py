"""``demo``: a deterministic, offline model. The embedded default and the suite's test double.

What it answers, in order:

1. the last message is a tool result → "The tool returned: ...";
2. tools are offered and either ``tool_choice`` forces a call or the user's text mentions a
   tool's name (or a script rule with ``tool: true`` matches) → a tool call whose arguments
   fill the tool's required parameters deterministically;
3. a script rule whose ``match`` is in the user's text → its ``reply``;
4. otherwise an echo: "You said: ...".

Upstream model names pick behaviour: ``demo-fail`` always fails with a retryable 503-like
error (to exercise failover without a network). ``latency_ms`` delays the first byte and
``chunk_delay_ms`` paces streamed chunks. Tokens are counted as ceil(characters / 4).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from ..config import ProviderConfig
from ..errors import UpstreamError
from .base import JSON, ChatCall, EmbedCall, Provider


class DemoRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str
    reply: str = ""
    tool: bool = False


BUILTIN_SCRIPT = (
    DemoRule(match="hello", reply="Hello! I am the Tokyo-IA demo model. Ask me anything."),
    DemoRule(match="weather", tool=True, reply="It is sunny in Tokyo, 22°C."),
    DemoRule(match="tokyo-ia", reply="Tokyo-IA is a self-hosted AI gateway."),
)


class DemoConfig(ProviderConfig):
    latency_ms: float = Field(0.0, ge=0)
    chunk_delay_ms: float = Field(0.0, ge=0)
    script: list[DemoRule] = Field(default_factory=lambda: list(BUILTIN_SCRIPT))
    embedding_dimensions: int = Field(16, ge=1, le=4096)


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _prompt_tokens(body: JSON) -> int:
    return sum(count_tokens(_text(m.get("content"))) + 4 for m in body.get("messages") or [])


def _fill_arguments(schema: Any, text: str) -> JSON:
    props = schema.get("properties", {}) if isinstance(schema, dict) else {}
    required = schema.get("required", list(props)) if isinstance(schema, dict) else []
    args: JSON = {}
    for name in required:
        kind = props.get(name, {}).get("type", "string") if isinstance(props.get(name), dict) else "string"
        enum = props.get(name, {}).get("enum") if isinstance(props.get(name), dict) else None
        if enum:
            args[name] = enum[0]
        elif kind in ("integer", "number"):
            args[name] = 1
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = "Tokyo" if "location" in name or "city" in name else text
    return args


class DemoProvider(Provider):
    kind = "demo"
    settings_model = DemoConfig

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        assert isinstance(config, DemoConfig)
        self.cfg = config

    # -- answer selection -------------------------------------------------------------

    def _tool_call(self, body: JSON, text: str, rule: DemoRule | None) -> JSON | None:
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("function")]
        choice = body.get("tool_choice", "auto")
        if not tools or choice == "none":
            return None
        chosen = None
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            chosen = next((t for t in tools if t["function"].get("name") == wanted), None)
        elif choice == "required" or (rule is not None and rule.tool):
            chosen = tools[0]
        else:
            lowered = text.lower()
            chosen = next((t for t in tools if str(t["function"].get("name", "")).lower() in lowered), None)
        if chosen is None:
            return None
        fn = chosen["function"]
        args = _fill_arguments(fn.get("parameters"), text)
        digest = hashlib.sha256(orjson.dumps([fn.get("name"), args])).hexdigest()[:24]
        return {
            "id": f"call_{digest}",
            "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": orjson.dumps(args).decode()},
        }

    def answer(self, body: JSON) -> tuple[str | None, JSON | None, str]:
        """(content, tool_call, finish_reason) for a request: the whole behaviour."""
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        if last.get("role") == "tool":
            return f"The tool returned: {_text(last.get('content'))}", None, "stop"
        text = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        rule = next((r for r in self.cfg.script if r.match.lower() in text.lower()), None)
        call = self._tool_call(body, text, rule)
        if call is not None:
            return None, call, "tool_calls"
        reply = rule.reply if rule is not None and rule.reply else f"You said: {text}"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0 and count_tokens(reply) > limit:
            return reply[: limit * 4], None, "length"
        return reply, None, "stop"

    def _check_model(self, model: str) -> None:
        if model.endswith("-fail"):
            raise UpstreamError(
                f"provider '{self.name}': model '{model}' always fails (demo failure mode)",
                provider=self.name,
                upstream_status=503,
                retryable=True,
                code="demo_failure",
            )

    async def _delay(self, ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    # -- API ------------------------------------------------------------------------------

    async def chat(self, call: ChatCall) -> JSON:
        await self._delay(self.cfg.latency_ms)
        self._check_model(call.model)
        content, tool_call, finish = self.answer(call.body)
        message: JSON = {"role": "assistant", "content": content, "refusal": None}
        if tool_call is not None:
            message["tool_calls"] = [tool_call]
        completion = count_tokens(content or "") + (
            count_tokens(tool_call["function"]["arguments"]) + 8 if tool_call else 0
        )
        prompt = _prompt_tokens(call.body)
        return {
            "id": f"chatcmpl-{call.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "system_fingerprint": "tokyo-ia-demo",
        }

    async def stream(self, call: ChatCall) -> AsyncIterator[JSON]:
        response = await self.chat(call)
        base = {k: response[k] for k in ("id", "created", "model", "system_fingerprint")}
        base["object"] = "chat.completion.chunk"
        message = response["choices"][0]["message"]

        def chunk(delta: JSON, finish: str | None = None) -> JSON:
            return {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        yield chunk({"role": "assistant", "content": "" if message["content"] is not None else None})
        for piece in _pieces(message["content"] or ""):
            await self._delay(self.cfg.chunk_delay_ms)
            yield chunk({"content": piece})
        for i, tc in enumerate(message.get("tool_calls") or []):
            head = {
                "index": i,
                "id": tc["id"],
                "type": "function",
                "function": {"name": tc["function"]["name"], "arguments": ""},
            }
            yield chunk({"tool_calls": [head]})
            for piece in _pieces(tc["function"]["arguments"], size=8):
                await self._delay(self.cfg.chunk_delay_ms)
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield chunk({}, response["choices"][0]["finish_reason"])
        yield {**base, "choices": [], "usage": response["usage"]}

    async def embed(self, call: EmbedCall) -> JSON:
        await self._delay(self.cfg.latency_ms)
        self._check_model(call.model)
        raw = call.body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        dims = call.body.get("dimensions") or self.cfg.embedding_dimensions
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            tokens += count_tokens(text)
            data.append({"object": "embedding", "index": i, "embedding": _vector(text, int(dims))})
        return {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @classmethod
    def embedded_default(cls, env: Mapping[str, str]) -> tuple[JSON, dict[str, str]] | None:
        return {}, {"demo": "demo", "demo-embedding": "demo-embedding"}


def _pieces(text: str, size: int = 0) -> list[str]:
    """Split text into stream pieces: words (keeping spaces) or fixed-size slices."""
    if size:
        return [text[i : i + size] for i in range(0, len(text), size)]
    pieces, start = [], 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            pieces.append(text[start:i])
            start = i
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from the text's hash."""
    values: list[float] = []
    counter = 0
    while len(values) < dims:
        block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    values = values[:dims]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]
