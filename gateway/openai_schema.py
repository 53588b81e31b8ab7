"""OpenAI request bodies as pydantic models, and validation that names the offending field.

Only what the engine can honour is accepted: parameters it cannot (n > 1, logprobs, tools, penalties,
logit_bias, JSON response formats) are refused with a 400 naming them rather than silently ignored.
Unknown fields are ignored, as OpenAI-compatible servers commonly do (tools send vendor extras).
Vendor extensions also understood: top_k, min_tokens, ignore_eos (vLLM's names, sent by AIPerf).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import APIError, bad_request

NonNegInt = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]


class _Sampling(_Request):
    """What chat and completions share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: Union[str, list[str], None] = None
    n: Literal[1] = 1
    # Refused unless at their neutral value (the engine does not implement them).
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict | None = None
    logprobs: Union[Literal[False], None, NonNegInt] = None
    # Vendor extensions (vLLM names).
    top_k: NonNegInt | None = None
    min_tokens: NonNegInt | None = None
    ignore_eos: bool | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        words = [v] if isinstance(v, str) else v or []
        if len(words) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(w == "" for w in words):
            raise ValueError("stop sequences must not be empty")
        return words

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    def engine_params(self) -> dict:
        """The LLM contract's inputs (export/specs.py LLM_IO) for this request."""
        p = dict(temperature=self.temperature, top_p=self.top_p, return_num_input_tokens=True,
                 return_num_output_tokens=True)
        for k in ("max_tokens", "seed", "top_k", "min_tokens", "ignore_eos"):
            if getattr(self, k) is not None:
                p[k] = getattr(self, k)
        if self.stop:
            p["stop_words"] = list(self.stop)
        return p

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list, Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    top_logprobs: Literal[0] | None = None
    logprobs: Literal[False] | None = None

    def engine_params(self) -> dict:
        p = super().engine_params()
        if self.max_completion_tokens is not None:
            p["max_tokens"] = self.max_completion_tokens
        return p


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    echo: bool = False
    logprobs: Literal[0] | None = None
    best_of: Literal[1] | None = None
    suffix: Literal[""] | None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def engine_params(self) -> dict:
        p = super().engine_params()
        if self.echo:
            p["exclude_input_in_output"] = False
        return p


class EmbeddingRequest(_Request):
    model: str
    input: Union[str, Annotated[list[str], Field(min_length=1)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# Fields that take one of several shapes: pydantic would report only the first shape it tried.
SHAPES = {
    "prompt": "prompt must be a string or a list of exactly one string (token ids and batches are not supported)",
    "input": "input must be a string or a non-empty list of strings (token ids are not supported)",
    "content": "content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "stop": "stop must be a string or a list of at most 4 strings",
}

# What a refused parameter's message says, when pydantic's own words would mislead.
UNSUPPORTED = {
    "n": "only n=1 is supported",
    "presence_penalty": "presence_penalty is not supported (only 0)",
    "frequency_penalty": "frequency_penalty is not supported (only 0)",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "top_logprobs are not supported",
    "tools": "tools are not supported by this server",
    "tool_choice": "tool_choice is not supported (only \"none\")",
    "response_format": "response_format: only {\"type\": \"text\"} is supported",
    "best_of": "only best_of=1 is supported",
    "suffix": "suffix is not supported",
}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a Union it tried in `loc` ("str", "list[str]", ...): not a field."""
    return "[" in part or part in _TYPE_TAGS or part.startswith(("constrained-", "function-"))


def validate(model_cls: type[BaseModel], body: dict):
    """body -> model_cls, or APIError(400) naming the first offending field (dotted path)."""
    try:
        return model_cls.model_validate(body, strict=True)  # JSON types as sent: "yes" is no boolean
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not _is_union_tag(str(x))]
        param = ".".join(loc) if loc else None
        top = loc[0] if loc else None
        if top in UNSUPPORTED and err["type"] != "missing":
            raise bad_request(UNSUPPORTED[top], param) from None
        msg = err["msg"].removeprefix("Value error, ")
        shape = SHAPES.get(loc[-1] if loc else "")
        if shape and err["type"] not in ("missing", "value_error"):
            raise bad_request(shape, param) from None
        if err["type"] == "missing":
            msg = "field required"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None
