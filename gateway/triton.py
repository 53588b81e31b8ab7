"""The Triton server behind the gateway, over gRPC (tritonclient's asyncio client).

Discovers the models once Triton answers (LLMs: decoupled models with the LLM contract of
export/specs.py LLM_IO; embedding models: the text pipelines of export/specs.py PIPELINES), loads the
tokenizers the gateway needs (chat templates; embedding token counts) from the local repository, polls
readiness, and runs generations (one gRPC stream per request, cancelled when the caller goes away) and
embedding calls. Triton's errors become APIErrors with the status that fits.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from clients.common import make_inputs, make_outputs
from clients.llm_stream import finish_stream, request_arrays
from export.pipeline import tokenizer_dir
from export.specs import LLM_IO, PIPELINES, TextPipelineSpec
from gateway.errors import APIError, overloaded, retryable
from gateway.settings import GatewaySettings
from llm.settings import EngineSettings
from serve.launcher import ADMIN_GRPC_HEADER, default_admin_token

log = logging.getLogger("gateway")
LLM_INPUTS = {t.name for t in LLM_IO.inputs}
TEXT_INPUT = LLM_IO.inputs[0].name
TEXT_OUTPUT, FINISH_REASON, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS = (t.name for t in LLM_IO.outputs)
# The gRPC channel to Triton: tritonclient's message limits (its keepalive defaults are gRPC's), and
# reconnecting within a second to a Triton the launcher restarted (gRPC's backoff grows to 120 s).
CHANNEL_ARGS = [("grpc.max_send_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", grpcaio.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000)]
# Config data types whose KServe datatype name differs (TYPE_STRING is BYTES on the wire).
DATATYPES = {"TYPE_STRING": "BYTES"}
# gRPC status -> HTTP status for errors that carry one (unary calls).
GRPC_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
               "RESOURCE_EXHAUSTED": 429, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
# Triton's dynamic-batcher queue policy (max_queue_size, default_timeout_microseconds) refuses with
# UNAVAILABLE and one of these: overload, to retry later (the encoder's queue, reached through the pipeline).
QUEUE_REFUSALS = ("Exceeds maximum queue size", "Request timeout expired")


@dataclass
class LLMModel:
    name: str
    inputs: frozenset[str]
    settings: EngineSettings
    chat_tokenizer: object | None = None  # transformers tokenizer with a chat template, if available
    chat_problem: str = ""  # why there is none


@dataclass
class EmbeddingModel:
    name: str
    spec: TextPipelineSpec
    counter: object | None = None  # tokenizers.Tokenizer for usage counts


@dataclass
class Chunk:
    """One response of a generation: new text (or all of it), and on the last one the totals."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def _param_values(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _version_dir(repo: Path, name: str) -> Path | None:
    versions = sorted((int(p.name) for p in (repo / name).glob("[0-9]*") if p.name.isdigit()), reverse=True)
    return repo / name / str(versions[0]) if versions else None


def model_error(message: str, retry_after_s: int = 1) -> APIError:
    """A generation's error message (gRPC streams carry no status code) -> APIError. The engine's
    request errors name the contract input first ("max_tokens must be ...", "text_input: ...")."""
    first = message.replace(":", " ").split(" ", 1)[0]
    if first in LLM_INPUTS:
        if first == TEXT_INPUT:  # the OpenAI routes call it prompt (or messages)
            return APIError(400, message.removeprefix(TEXT_INPUT).lstrip(": "), param="prompt")
        return APIError(400, message, param=first)
    if message.startswith("overloaded") or any(q in message for q in QUEUE_REFUSALS):  # bounded queues: retry later
        return overloaded(f"model overloaded: {message}", retry_after_s, status=503)
    if "is not healthy" in message or "not ready" in message or "unavailable" in message.lower():
        return APIError(503, f"model unavailable: {message}")
    return APIError(500, f"model error: {message}")


def grpc_error(e: InferenceServerException, retry_after_s: int = 1) -> APIError:
    status = str(e.status() or "").removeprefix("StatusCode.")
    code = GRPC_STATUS.get(status)
    if code is None or any(q in e.message() for q in QUEUE_REFUSALS):
        return model_error(e.message(), retry_after_s)
    if code == 503:
        return retryable(503, e.message(), retry_after_s)
    return APIError(code, e.message())


class Triton:
    def __init__(self, s: GatewaySettings):
        self.s = s
        self.admin = {ADMIN_GRPC_HEADER: s.admin_token or default_admin_token()}
        self.client: grpcaio.InferenceServerClient | None = None
        self.ready = False
        self.discovered = False
        self.llms: dict[str, LLMModel] = {}
        self.embedders: dict[str, EmbeddingModel] = {}
        self.input_types: dict[str, dict[str, str]] = {}  # model -> input name -> datatype (no TYPE_)
        self.steps: dict[str, list[str]] = {}  # ensemble -> the models it calls
        self.dependents: dict[str, set[str]] = {}  # model -> the ensembles that call it
        self.down: dict[str, str] = {}  # model -> why it does not serve now (the supervisor sets it)
        self._inflight: dict[str, dict[int, object]] = {}  # model -> {id: gRPC call or task} of requests in flight
        self._failed: dict[int, tuple[str, str]] = {}  # id of a request failed on purpose -> (reason, code)
        self.progress: dict[str, float] = {}  # model -> monotonic time of its last response through the gateway
        self.outages = 0  # times Triton became unreachable after serving (e.g. restarted by the launcher)
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        self.client = grpcaio.InferenceServerClient(self.s.triton_grpc_url, channel_args=CHANNEL_ARGS)
        await self.refresh()
        self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        if self.client:
            await self.client.close()

    async def refresh(self) -> None:
        """Ready = Triton is live and its models were discovered once it first said ready. While it
        serves, Triton's own readiness is not used: with strict readiness it goes false while the
        supervisor reloads one model, and per-model health is `down` (the supervisor's view). After an
        outage (Triton unreachable: it died and the launcher restarts it) ready again only once Triton
        says ready, i.e. every model loaded again."""
        was, error = self.ready, None
        try:
            if not self.discovered:
                if await self.client.is_server_ready():
                    await self.discover()
                self.ready = self.discovered and await self.client.is_server_live()
            elif was:
                self.ready = await self.client.is_server_live()
            elif await self.client.is_server_ready():
                self.ready = True
                log.warning("triton ready again after outage %d", self.outages)
        except Exception as e:  # noqa: BLE001 - Triton not up (yet): not ready
            self.ready, error = False, e
        if was and not self.ready:
            self.outages += 1
            log.warning("triton not serving (outage %d): %s", self.outages, error or "not live")

    async def reachable(self) -> bool:
        """Triton answers (live) now; the gateway's `ready` follows it at the next poll."""
        try:
            return await self.client.is_server_live()
        except Exception:  # noqa: BLE001 - gone or restarting
            return False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.s.ready_poll_s)
            await self.refresh()

    async def discover(self) -> None:
        index = await self.client.get_model_repository_index(headers=self.admin, as_json=True)
        llms, embedders, input_types, steps = {}, {}, {}, {}
        for m in index.get("models", []):
            name = m["name"]
            config = (await self.client.get_model_config(name, as_json=True))["config"]
            input_types[name] = {i["name"]: DATATYPES.get(i["data_type"], i["data_type"].removeprefix("TYPE_"))
                                 for i in config.get("input", [])}
            inputs = {i["name"] for i in config.get("input", [])}
            outputs = {o["name"] for o in config.get("output", [])}
            decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
            if config.get("ensemble_scheduling"):
                steps[name] = [st["model_name"] for st in config["ensemble_scheduling"].get("step", [])]
            if decoupled and TEXT_INPUT in inputs and TEXT_OUTPUT in outputs:
                params = _param_values(config)
                settings = EngineSettings.from_parameters({k: v for k, v in params.items() if k in EngineSettings.__dataclass_fields__})
                llms[name] = LLMModel(name, frozenset(inputs), settings)
            elif name in PIPELINES and PIPELINES[name].text.name in inputs:
                embedders[name] = EmbeddingModel(name, PIPELINES[name])
        await asyncio.to_thread(self._load_tokenizers, llms, embedders)
        self.dependents = {}
        for ensemble, used in steps.items():
            for m in used:
                self.dependents.setdefault(m, set()).add(ensemble)
        self.llms, self.embedders, self.input_types, self.steps = llms, embedders, input_types, steps
        self.discovered = True
        log.info("models: LLM %s, embedding %s", sorted(llms), sorted(embedders))

    def _load_tokenizers(self, llms: dict[str, LLMModel], embedders: dict[str, EmbeddingModel]) -> None:
        repo = Path(self.s.model_repository)
        for m in llms.values():
            version = _version_dir(repo, m.name)
            ckpt = Path(m.settings.checkpoint)
            ckpt = ckpt if ckpt.is_absolute() or version is None else version / ckpt
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(ckpt)
                if tok.chat_template:
                    m.chat_tokenizer = tok
                else:
                    m.chat_problem = f"the tokenizer of {m.name!r} has no chat template; use /v1/completions"
            except Exception as e:  # noqa: BLE001 - chat unavailable for this model, completions still work
                m.chat_problem = f"no tokenizer for {m.name!r} at {ckpt} ({type(e).__name__}); use /v1/completions"
        for m in embedders.values():
            d = tokenizer_dir(repo, m.spec)
            if d is not None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
                tok.enable_truncation(m.spec.encoder.max_seq_len)
                tok.no_padding()  # count real tokens only
                m.counter = tok

    # ---- lookups -------------------------------------------------------------------------------

    def require_ready(self, model: str | None = None) -> None:
        if not self.ready or not self.discovered:
            raise retryable(503, "the inference server is not ready", self.s.retry_after_s)
        if model in self.down:
            raise retryable(503, self.down[model], self.s.retry_after_s, code="model_restarting")

    # ---- health, as the supervisor sees it -----------------------------------------------------

    def mark_down(self, model: str, reason: str) -> None:
        """`model` and the ensembles using it stop serving now; their requests in flight fail with `reason`."""
        for m in (model, *self.dependents.get(model, ())):
            self.down[m] = reason
            self._fail(self._inflight.get(m, {}), reason, "model_restarting")

    def fail_in_flight(self, reason: str, code: str) -> int:
        """Every request in flight through the gateway ends now with a retryable 503 (or, streamed, a final
        error event) saying `reason` (the gateway's shutdown). Returns how many."""
        return sum(self._fail(calls, reason, code) for calls in list(self._inflight.values()))

    def _fail(self, calls: dict[int, object], reason: str, code: str) -> int:
        for key, call in list(calls.items()):
            self._failed[key] = (reason, code)
            call.cancel()
        return len(calls)

    def mark_up(self, model: str) -> None:
        self.down.pop(model, None)
        for ensemble in self.dependents.get(model, ()):
            if not any(m in self.down for m in self.steps.get(ensemble, ())):
                self.down.pop(ensemble, None)

    @property
    def all_ready(self) -> bool:
        return self.ready and self.discovered and not self.down

    async def reload(self, model: str) -> None:
        """Unload + load over Triton's model control (a load of a loaded model is a no-op in 2.51)."""
        await self.client.unload_model(model, headers=self.admin)
        await self.client.load_model(model, headers=self.admin)
        if not await self.client.is_model_ready(model):
            raise RuntimeError(f"{model} not ready after loading")

    async def canary(self, model: str) -> None:
        """A smallest real request (LLM: 1 token; embedding: 1 text; other models: readiness)."""
        if model in self.llms:
            async for _ in self.generate(self.llms[model], "canary", {"max_tokens": 1, "temperature": 0.0},
                                         stream=False, check_down=False):
                pass
        elif model in self.embedders:
            await self._embed_one(self.embedders[model], ["canary"], check_down=False)
        elif not await self.client.is_model_ready(model):
            raise RuntimeError(f"{model} is not ready")

    def _track(self, model: str, key: int, call) -> None:
        self._inflight.setdefault(model, {})[key] = call

    def _untrack(self, model: str, key: int) -> None:
        self._inflight.get(model, {}).pop(key, None)
        self._failed.pop(key, None)

    def _raise_if_failed(self, key: int) -> None:
        """A request cancelled by mark_down() or fail_in_flight() ends in a retryable 503 that says why."""
        failed = self._failed.get(key)
        if failed is not None:
            reason, code = failed
            raise retryable(503, f"{reason}; this request was failed", self.s.retry_after_s, code=code) from None

    def llm(self, name: str) -> LLMModel:
        return self._lookup(self.llms, name, "a text generation model")

    def embedder(self, name: str) -> EmbeddingModel:
        return self._lookup(self.embedders, name, "an embedding model")

    def _lookup(self, models: dict, name: str, kind: str):
        """models[name] once the server and that model serve; else 503, or 404 naming what exists."""
        self.require_ready(name)
        if name not in models:
            raise APIError(404, f"model {name!r} does not exist or is not {kind}; available: {sorted(models)}",
                           param="model", code="model_not_found")
        return models[name]

    # ---- calls ---------------------------------------------------------------------------------

    async def generate(self, model: LLMModel, prompt: str, params: dict, stream: bool,
                       timeout_s: float | None = None, check_down: bool = True) -> AsyncIterator[Chunk]:
        """The responses of one generation; leaving the loop early (or being cancelled) cancels it.
        After the final response the stream is read to its end first (finish_stream: a stream cancelled
        once complete could keep the model referenced in Triton 2.51 at a stop soon after).
        timeout_s: the gRPC deadline of the whole generation (-> APIError 504; Triton cancels it)."""
        missing = sorted(set(params) - model.inputs)
        if missing:
            raise APIError(400, f"model {model.name!r} does not accept {missing}", param=missing[0])
        cap = model.settings.max_tokens_cap
        if params.get("max_tokens", 1) > cap:
            raise APIError(400, f"max_tokens must be <= {cap} for model {model.name!r}", param="max_tokens")
        inputs = make_inputs("grpc", request_arrays(prompt, stream=stream, **params))
        request = {"model_name": model.name, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async def one():
            yield request

        if check_down:
            self.require_ready(model.name)
        responses = self.client.stream_infer(one(), stream_timeout=timeout_s)
        key = id(responses)
        self._track(model.name, key, responses)
        try:
            async for result, error in responses:
                if error is not None:
                    raise model_error(error.message(), self.s.retry_after_s)
                chunk = _chunk(result.get_response())
                self.progress[model.name] = time.monotonic()
                if chunk.finish_reason is not None:
                    await finish_stream(responses)  # before the last yield: the caller may not resume us
                    yield chunk
                    return
                yield chunk
            raise APIError(502, "the inference server closed the stream before the final response")
        except InferenceServerException as e:
            raise grpc_error(e, self.s.retry_after_s) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise APIError(504, f"generation did not finish within {timeout_s:g} s (request_timeout_s); "
                                    "it was cancelled") from None
            raise APIError(GRPC_STATUS.get(e.code().name, 500), f"inference server: {e.details()}") from None
        except asyncio.CancelledError:
            self._raise_if_failed(key)
            raise  # our caller was cancelled (the client went away)
        finally:
            self._untrack(model.name, key)
            responses.cancel()  # no-op once complete; otherwise Triton cancels the request

    async def embed(self, model: EmbeddingModel, texts: list[str]) -> np.ndarray:
        """[len(texts), hidden] float32, in as many Triton requests (run concurrently) as needed."""
        n = model.spec.max_texts
        parts = await asyncio.gather(*(self._embed_one(model, texts[i:i + n]) for i in range(0, len(texts), n)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    async def _embed_one(self, model: EmbeddingModel, texts: list[str], check_down: bool = True) -> np.ndarray:
        spec = model.spec
        if check_down:
            self.require_ready(model.name)
        arrays = {spec.text.name: np.array([t.encode("utf-8") for t in texts], dtype=np.object_)}
        task = asyncio.ensure_future(self.client.infer(model.name, make_inputs("grpc", arrays),
                                                       outputs=make_outputs("grpc", [spec.embedding.name])))
        key = id(task)
        self._track(model.name, key, task)
        try:
            result = await task
            self.progress[model.name] = time.monotonic()
        except InferenceServerException as e:
            raise grpc_error(e, self.s.retry_after_s) from None
        except asyncio.CancelledError:
            self._raise_if_failed(key)
            raise  # our caller was cancelled (the client went away)
        finally:
            self._untrack(model.name, key)
        return result.as_numpy(spec.embedding.name)

    def count_tokens(self, model: EmbeddingModel, texts: list[str]) -> int:
        if model.counter is None:
            return 0
        return sum(len(e.ids) for e in model.counter.encode_batch(texts))


def _chunk(response) -> Chunk:
    """A ModelInferResponse of the LLM contract -> Chunk. Read straight from the protobuf (one BYTES or
    INT32 element per output): this runs once per streamed token."""
    values = {}
    for out, raw in zip(response.outputs, response.raw_output_contents):
        if out.datatype == "BYTES":
            values[out.name] = raw[4:4 + int.from_bytes(raw[:4], "little")].decode("utf-8", errors="replace")
        elif out.datatype == "INT32":
            values[out.name] = int.from_bytes(raw[:4], "little", signed=True)
    return Chunk(text=values.get(TEXT_OUTPUT, ""), finish_reason=values.get(FINISH_REASON),
                 prompt_tokens=values.get(NUM_INPUT_TOKENS), completion_tokens=values.get(NUM_OUTPUT_TOKENS))
