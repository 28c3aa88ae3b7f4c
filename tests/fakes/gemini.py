"""An emulator of Google's Gemini API (generativelanguage.googleapis.com, ``v1beta``).

Written from Google's public REST reference:

- ``POST /v1beta/models/{model}:generateContent`` → ``GenerateContentResponse``
  (``candidates[].content.parts``, ``finishReason``, ``safetyRatings``, ``usageMetadata``,
  ``modelVersion``, ``responseId``; ``promptFeedback.blockReason`` and no candidates when the
  prompt is blocked);
- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` → SSE, one whole
  ``GenerateContentResponse`` per ``data:`` event, no terminator; the last event carries the
  ``finishReason`` and the full ``usageMetadata``;
- ``POST ...:embedContent`` → ``{"embedding": {"values"}}``; ``POST ...:batchEmbedContents``
  (each request names its model as ``models/{model}``) → ``{"embeddings": [{"values"}]}``;
- ``GET /v1beta/models`` and ``GET /v1beta/models/{model}``;
- errors as ``{"error": {"code", "message", "status", "details"}}``: no key → 403
  ``PERMISSION_DENIED``; a wrong key → 400 ``INVALID_ARGUMENT`` with an ``ErrorInfo`` detail,
  reason ``API_KEY_INVALID``; 429 ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` detail; unknown
  request fields → 400 ``Invalid JSON payload received. Unknown name ...``.

The key is read from ``x-goog-api-key`` or ``?key=``. The model name picks the behaviour
(conventions of tests/cases.py):

- ``error-<status>``  that status with a Google error body
- ``flaky-<n>``       503 the first n times (per model), then answer
- ``slow-<ms>``       wait before answering (or before the first event)
- ``drop``            stream one event, then cut the connection
- ``blocked``         the prompt is blocked: ``promptFeedback.blockReason`` ``SAFETY``
- ``unsafe``          a candidate stopped with ``finishReason`` ``SAFETY`` and no content
- ``thinker``         adds a thought part and ``thoughtsTokenCount``
- ``tools``           a function call of the first declared function
- tools declared and ``toolConfig`` mode ``ANY`` → a call of the first allowed function, args
  ``{"location": "Paris"}``; every function call carries a ``thoughtSignature``
- the last turn ends with function responses → "The tool returned: ..."
- anything else (``chat``)  echo the last user text; ``maxOutputTokens`` cuts it (``MAX_TOKENS``)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from typing import Any

from aiohttp import web

from .base import Emulator

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

REQUEST_FIELDS = {
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
}
GENERATION_FIELDS = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "responseModalities",
}
PART_DATA = {
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
}
PART_META = {"thought", "thoughtSignature", "videoMetadata"}

SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        err["details"] = details
    return {"error": err}


def tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


class BadRequest(Exception):
    """Raised by request validation; answered as 400 INVALID_ARGUMENT."""


class GeminiEmulator(Emulator):
    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1beta/models", self.list_models)
        app.router.add_get("/v1beta/models/{target}", self.get_model)
        app.router.add_post("/v1beta/models/{target}", self.dispatch)
        return app

    # -- helpers ----------------------------------------------------------------------------

    def _error(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
        if status == 429 and details is None:
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"},
            ]
        return web.json_response(error_body(status, message, details), status=status)

    def _auth(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return self._error(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if key != self.api_key:
            info = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
            return self._error(400, "API key not valid. Please pass a valid API key.", [info])
        return None

    @staticmethod
    def _model_info(name: str) -> dict[str, Any]:
        methods = (
            ["embedContent", "batchEmbedContents"]
            if "embedding" in name
            else ["generateContent", "countTokens"]
        )
        return {
            "name": f"models/{name}",
            "version": "001",
            "displayName": name,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": methods,
        }

    async def list_models(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        models = [self._model_info(n) for n in ("chat", "gemini-2.5-flash", "gemini-embedding-001")]
        size = int(request.query.get("pageSize", "50"))
        body: dict[str, Any] = {"models": models[:size]}
        if size < len(models):
            body["nextPageToken"] = "page-2"
        return web.json_response(body)

    async def get_model(self, request: web.Request) -> web.Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        return web.json_response(self._model_info(request.match_info["target"]))

    # -- dispatch -------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        denied = self._auth(request)
        if denied is not None:
            return denied
        model, _, method = request.match_info["target"].rpartition(":")
        handlers = {
            "generateContent": self.generate,
            "streamGenerateContent": self.generate,
            "embedContent": self.embed,
            "batchEmbedContents": self.batch_embed,
        }
        if not model or method not in handlers:
            return self._error(404, f"Method not found: {method!r}.")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "Invalid JSON payload received. Unexpected token.")
        if model.startswith("error-"):
            status = int(model.split("-", 1)[1])
            return self._error(status, f"emulated error {status} for model {model}")
        if model.startswith("flaky-") and self.state.bump(model) <= int(model.split("-", 1)[1]):
            return self._error(503, "The model is overloaded. Please try again later.")
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.split("-", 1)[1]) / 1000)
        try:
            return await handlers[method](request, model, body)
        except BadRequest as exc:
            return self._error(400, str(exc))

    # -- generateContent --------------------------------------------------------------------

    @staticmethod
    def _validate(body: dict[str, Any]) -> None:
        unknown = set(body) - REQUEST_FIELDS
        if unknown:
            raise BadRequest(
                f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}": Cannot find field.'
            )
        unknown = set(body.get("generationConfig") or {}) - GENERATION_FIELDS
        if unknown:
            raise BadRequest(
                f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}" at '
                "'generation_config': Cannot find field."
            )
        contents = body.get("contents")
        if not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        for i, content in enumerate(contents):
            if content.get("role") not in ("user", "model"):
                raise BadRequest(f"Please use a valid role: user, model. (contents[{i}])")
            if not content.get("parts"):
                raise BadRequest(
                    f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
                )
            for part in content["parts"]:
                data = set(part) & PART_DATA
                if len(data) != 1 or set(part) - PART_DATA - PART_META:
                    raise BadRequest(f"* GenerateContentRequest.contents[{i}].parts: invalid part {part}")
        for tool in body.get("tools") or []:
            for decl in tool.get("functionDeclarations") or []:
                if not decl.get("name") or ("parameters" in decl and "parametersJsonSchema" in decl):
                    raise BadRequest("* GenerateContentRequest.tools[0].function_declarations: invalid")

    def _reply_parts(self, body: dict[str, Any], model: str) -> list[dict[str, Any]]:
        """The parts of the model's answer: a function call, a tool echo or a text echo."""
        declared = [d["name"] for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
        calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        if declared and (model == "tools" or calling.get("mode") == "ANY"):
            name = (calling.get("allowedFunctionNames") or declared)[0]
            signature = "c2lnLSIgKyBuYW1l"  # opaque to clients; must come back with the call
            return [
                {"functionCall": {"name": name, "args": {"location": "Paris"}}, "thoughtSignature": signature}
            ]
        last = body["contents"][-1]
        results = [p["functionResponse"] for p in last["parts"] if "functionResponse" in p]
        if results and "text" not in last["parts"][-1]:
            return [{"text": "The tool returned: " + json.dumps(results[0]["response"])}]
        text = " ".join(p["text"] for p in last["parts"] if "text" in p)
        return [{"text": f"echo: {text}"}]

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        return tokens(json.dumps(body.get("contents"))) + tokens(
            json.dumps(body.get("systemInstruction") or "")
        )

    def _candidates(self, body: dict[str, Any], model: str) -> tuple[list[dict[str, Any]], int, int]:
        """(candidates, candidatesTokenCount, thoughtsTokenCount) of a full answer."""
        config = body.get("generationConfig") or {}
        parts = self._reply_parts(body, model)
        finish = "STOP"
        limit = config.get("maxOutputTokens")
        if limit and "text" in parts[0] and tokens(parts[0]["text"]) > limit:
            parts = [{"text": parts[0]["text"][: limit * 4]}]
            finish = "MAX_TOKENS"
        thoughts = 0
        if model == "thinker":
            parts = [{"text": "Let me think about this.", "thought": True}, *parts]
            thoughts = 12
        out_tokens = sum(tokens(json.dumps(p)) for p in parts if not p.get("thought"))
        candidates = []
        for i in range(int(config.get("candidateCount") or 1)):
            candidate: dict[str, Any] = {
                "content": {"parts": parts, "role": "model"},
                "finishReason": finish,
                "safetyRatings": SAFETY_RATINGS,
                "index": i,
            }
            if model == "unsafe":
                candidate = {
                    "finishReason": "SAFETY",
                    "index": i,
                    "safetyRatings": [
                        {
                            "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                            "probability": "HIGH",
                            "blocked": True,
                        }
                    ],
                }
            candidates.append(candidate)
        return candidates, out_tokens * len(candidates), thoughts

    def _response_id(self) -> str:
        return hashlib.sha256(str(len(self.requests)).encode()).hexdigest()[:22]

    async def generate(self, request: web.Request, model: str, body: dict[str, Any]) -> web.StreamResponse:
        self._validate(body)
        stream = request.match_info["target"].endswith(":streamGenerateContent")
        if stream and request.query.get("alt") != "sse":
            raise BadRequest("this emulator streams only with ?alt=sse")
        prompt = self._prompt_tokens(body)
        meta = {"modelVersion": model, "responseId": self._response_id()}
        if model == "blocked":
            blocked = {
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": SAFETY_RATINGS},
                "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt},
                **meta,
            }
            return await self.sse(request, [json.dumps(blocked)]) if stream else web.json_response(blocked)
        candidates, out, thoughts = self._candidates(body, model)
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": out,
            "totalTokenCount": prompt + out + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if not stream:
            return web.json_response({"candidates": candidates, "usageMetadata": usage, **meta})
        return await self.sse(request, self._events(request, candidates, usage, meta, model))

    async def _events(
        self,
        request: web.Request,
        candidates: list[dict[str, Any]],
        usage: dict[str, Any],
        meta: dict[str, Any],
        model: str,
    ) -> Any:
        """Text split into word events; function calls whole; finish and full usage last."""
        partial = {
            "promptTokenCount": usage["promptTokenCount"],
            "totalTokenCount": usage["promptTokenCount"],
        }
        first = candidates[0]
        parts = (first.get("content") or {}).get("parts") or []
        pieces: list[dict[str, Any]] = []
        for part in parts:
            if "text" in part and not part.get("thought"):
                words = part["text"].split(" ")
                pieces.extend({"text": w + (" " if i < len(words) - 1 else "")} for i, w in enumerate(words))
            else:
                pieces.append(part)
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1
            candidate: dict[str, Any] = {"content": {"parts": [piece], "role": "model"}, "index": 0}
            if last:
                candidate.update(finishReason=first["finishReason"], safetyRatings=SAFETY_RATINGS)
            yield json.dumps({"candidates": [candidate], "usageMetadata": usage if last else partial, **meta})
            if model == "drop":
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError("emulated drop")
        if not pieces:
            yield json.dumps({"candidates": candidates, "usageMetadata": usage, **meta})

    # -- embeddings -----------------------------------------------------------------------

    @staticmethod
    def _vector(content: dict[str, Any], dims: int | None) -> dict[str, Any]:
        text = " ".join(p.get("text", "") for p in content.get("parts") or [])
        digest = hashlib.sha256(text.encode()).digest()
        values = [round((b - 127.5) / 127.5, 6) for b in digest]
        return {"values": values[: dims or 8]}

    async def embed(self, request: web.Request, model: str, body: dict[str, Any]) -> web.Response:
        if "content" not in body:
            raise BadRequest("* EmbedContentRequest.content: content is not specified")
        return web.json_response(
            {"embedding": self._vector(body["content"], body.get("outputDimensionality"))}
        )

    async def batch_embed(self, request: web.Request, model: str, body: dict[str, Any]) -> web.Response:
        requests = body.get("requests") or []
        if not requests:
            raise BadRequest("* BatchEmbedContentsRequest.requests: requests is not specified")
        for i, item in enumerate(requests):
            if item.get("model") != f"models/{model}":
                raise BadRequest(
                    f"* BatchEmbedContentsRequest.requests[{i}].model: the model of each "
                    "request must match the batch model"
                )
        vectors = [self._vector(r.get("content") or {}, r.get("outputDimensionality")) for r in requests]
        return web.json_response({"embeddings": vectors})
