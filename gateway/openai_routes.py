"""The OpenAI API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Generations run over one gRPC stream each (gateway/triton.py); the number in flight is capped
(429 + Retry-After past it), each has a deadline (504, or a final error event when streaming), and a
client that goes away cancels its generation.
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.body import parse_json, read_body
from gateway.errors import APIError, bad_request, overloaded
from gateway.openai_schema import ChatRequest, CompletionRequest, EmbeddingRequest, validate
from gateway.settings import GatewaySettings
from gateway.streaming import SSEResponse, until_disconnect
from gateway.triton import Chunk, LLMModel, Triton

DONE = b"data: [DONE]\n\n"


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status, headers=headers,
                    media_type="application/json")


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class Admission:
    """Work in flight, capped: past the cap a request is refused at once, never queued here. `what` names
    the unit (generations; embedding texts, where a request weighs its number of texts and one request
    alone is always admitted)."""

    def __init__(self, limit: int, retry_after_s: int, what: str = "concurrent generations"):
        self.limit, self.retry_after_s, self.what, self.active = limit, retry_after_s, what, 0

    def acquire(self, weight: int = 1):
        """A release callable (idempotent), or APIError 429."""
        if self.active and self.active + weight > self.limit:
            raise overloaded(f"too many {self.what} ({self.limit}); retry later", self.retry_after_s)
        self.active += weight
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.active -= weight
        return release


class _Kind:
    """What differs between chat and text completions: ids, object names, where text goes."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT, COMPLETION = _Kind(True), _Kind(False)


def usage(last: Chunk) -> dict:
    p, c = last.prompt_tokens or 0, last.completion_tokens or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_prompt(model: LLMModel, req: ChatRequest) -> str:
    if model.chat_tokenizer is None:
        raise bad_request(model.chat_problem, "model")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        return model.chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template refused these messages (e.g. role order)
        raise bad_request(f"messages: the chat template of {model.name!r} refused them: {e}", "messages") from None


class OpenAIRoutes:
    def __init__(self, s: GatewaySettings, triton: Triton):
        self.s, self.triton = s, triton
        self.admission = Admission(s.max_concurrent_generations, s.retry_after_s)
        self.embedding_admission = Admission(s.max_embedding_texts_in_flight, s.retry_after_s, "embedding texts in flight")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def _body(self, request: Request, model_cls):
        body = parse_json(await read_body(request, self.s), self.s)
        req = validate(model_cls, body)
        request.state.model = req.model
        if self.s.log_prompts:  # opt-in: prompts are user data
            request.state.prompt = str(body.get("messages") or body.get("prompt") or body.get("input"))[:2000]
        return req

    # ---- models --------------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "triton"}

    async def models(self, request: Request) -> Response:
        self.triton.require_ready()
        names = sorted({*self.triton.llms, *self.triton.embedders})
        return json_response({"object": "list", "data": [self._model_card(n) for n in names]})

    async def model(self, request: Request) -> Response:
        self.triton.require_ready()
        name = request.path_params["model"]
        if name not in self.triton.llms and name not in self.triton.embedders:
            raise APIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return json_response(self._model_card(name))

    # ---- generations ---------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = await self._body(request, ChatRequest)
        model = self.triton.llm(req.model)
        return await self._generate(request, req, model, chat_prompt(model, req), CHAT)

    async def completions(self, request: Request) -> Response:
        req = await self._body(request, CompletionRequest)
        model = self.triton.llm(req.model)
        return await self._generate(request, req, model, req.prompt_text, COMPLETION)

    async def _generate(self, request: Request, req, model: LLMModel, prompt: str, kind: _Kind) -> Response:
        release = self.admission.acquire()
        chunks = self._released(self.triton.generate(model, prompt, req.engine_params(), stream=req.stream,
                                                     timeout_s=self.s.request_timeout_s), release)
        try:
            # The first response is awaited before answering, so that a refused request (a prompt too
            # long, a bad parameter) gets its 4xx status instead of a 200 stream holding an error.
            first = await until_disconnect(request.receive, chunks.__anext__())
        except BaseException:
            await chunks.aclose()
            raise
        rid, created = kind.prefix + uuid.uuid4().hex, int(time.time())
        if req.stream:
            return SSEResponse(self._events(first, chunks, req, kind, rid, created), on_close=chunks.aclose)
        try:
            parts, last = [first.text], first
            if first.finish_reason is None:
                async def rest():
                    nonlocal last
                    async for c in chunks:
                        parts.append(c.text)
                        last = c
                await until_disconnect(request.receive, rest())
        finally:
            await chunks.aclose()
        return json_response({"id": rid, "object": kind.object, "created": created, "model": req.model,
                              "choices": [kind.choice("".join(parts), last.finish_reason)], "usage": usage(last)})

    async def _released(self, chunks: AsyncIterator[Chunk], release) -> AsyncIterator[Chunk]:
        """The chunks; closing it cancels the generation and gives its admission back (release)."""
        try:
            async for c in chunks:
                yield c
        finally:
            try:
                await chunks.aclose()
            finally:
                release()

    async def _events(self, first: Chunk, chunks: AsyncIterator[Chunk], req, kind: _Kind, rid: str,
                      created: int) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": kind.chunk_object, "created": created, "model": req.model}
        extra = {"usage": None} if req.include_usage else {}
        def events(c: Chunk) -> list[bytes]:
            out = [sse({**head, "choices": [kind.delta(c.text, None)], **extra})] if c.text else []
            if c.finish_reason is not None:
                out.append(sse({**head, "choices": [kind.delta(None, c.finish_reason)], **extra}))
            return out

        try:
            if kind.chat:
                yield sse({**head, "choices": [kind.delta(None, None, first=True)], **extra})
            last = first
            for e in events(first):
                yield e
            async for c in chunks:
                last = c
                for e in events(c):
                    yield e
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": usage(last)})
        except APIError as e:
            yield sse(e.body())
        finally:
            await chunks.aclose()
        yield DONE

    # ---- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        req = await self._body(request, EmbeddingRequest)
        model = self.triton.embedder(req.model)
        texts, hidden = req.texts, model.spec.encoder.hidden_size
        if len(texts) > self.s.max_embedding_inputs:
            raise bad_request(f"input holds {len(texts)} texts; at most {self.s.max_embedding_inputs} per request", "input")
        if req.dimensions is not None and req.dimensions != hidden:
            raise bad_request(f"dimensions: {req.model!r} makes {hidden}-dimensional embeddings only", "dimensions")
        release = self.embedding_admission.acquire(len(texts))
        try:
            vectors = await asyncio.wait_for(until_disconnect(request.receive, self.triton.embed(model, texts)),
                                             timeout=self.s.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"embedding did not finish within {self.s.request_timeout_s:g} s") from None
        finally:
            release()
        if req.encoding_format == "base64":
            items = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            items = list(vectors)
        tokens = self.triton.count_tokens(model, texts)
        return json_response({"object": "list", "model": req.model,
                              "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

