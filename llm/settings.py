"""Engine settings: the one place where every engine knob and its default is defined.

In Triton they arrive as config.pbtxt `parameters` (string values, written by `export/llm.py`
from `EngineSettings.to_parameters()`); in-process they are passed as keyword arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields


# config parameters that are not engine settings: read by serve/repository.py's pre-start check
# (REQUIRED_ARTIFACTS_KEY, EXPORT_COMMAND_KEY there; this file is copied into model directories and
# cannot import serve/).
NON_ENGINE_KEYS = ("required_artifacts", "export_command")


@dataclass(frozen=True)
class EngineSettings:
    # Checkpoint directory (HF layout: config.json, *.safetensors, tokenizer files). A relative
    # path is resolved against the model version directory (model_repository/<name>/1/).
    checkpoint: str = "checkpoint"
    # "auto": bfloat16 on CUDA (float16 if bf16 is unsupported), float32 on CPU.
    dtype: str = "auto"
    # Concurrent sequences (KV-cache slots) and tokens per slot (prompt + generated). 0 = the
    # model's max_position_embeddings. The cache is preallocated at start as
    # slots x max_context, and slots are reduced to fit kv_cache_budget_mb when that is set.
    max_slots: int = 32
    max_context: int = 512
    kv_cache_budget_mb: float = 0.0  # 0 = no budget check beyond max_slots x max_context
    # Prefill: at most this many prompt tokens per engine step (long prompts are chunked), and at
    # most this many prompts prefilled together in one padded batch.
    prefill_chunk: int = 512
    max_prefill_batch: int = 8
    # Admission: requests waiting for a KV slot past these are refused at once as overloaded
    # (UNAVAILABLE; clients retry later) instead of queueing without bound. max_waiting 0 = 4 x the
    # slots; max_queue_time_s: the longest a request may wait for a slot.
    max_waiting: int = 0
    max_queue_time_s: float = 30.0
    # Requests: max_tokens when the request omits it, and the largest max_tokens accepted.
    default_max_tokens: int = 64
    max_tokens_cap: int = 4096
    # Streaming: send one response every `stream_interval` generated tokens (1 = per token); the
    # final response (with TRITONSERVER_RESPONSE_COMPLETE_FINAL) is always sent.
    stream_interval: int = 1
    # GPU decode: CUDA graphs captured per (batch bucket, KV-length bucket); batch buckets are the
    # powers of two up to max_slots, KV-length buckets the powers of two from kv_len_min up to
    # max_context. torch.compile of the decode step is optional (slow start, faster steps).
    cuda_graphs: bool = True
    kv_len_min: int = 256
    compile: bool = False
    # Launch decode step N+1 before reading step N's tokens on the host, so that Python's per-token
    # work (detokenize, stop words, send) overlaps the device's work. Same outputs either way.
    overlap: bool = True
    # Poll request.is_cancelled() every N steps (each poll is an IPC round trip in Triton).
    cancel_check_interval: int = 1
    # Gauges/counters are flushed at most this often (histograms are observed per event).
    metrics_interval_s: float = 0.05
    # CPU only: torch intra-op threads (0 = torch's default). Small models run fastest with 1:
    # OpenMP threads on a busy host cost more than the matmuls they split.
    cpu_threads: int = 0
    # Build all CUDA graphs at start (else lazily, on first use of a bucket).
    warmup: bool = True

    def __post_init__(self):
        assert self.max_slots >= 1, f"max_slots must be >= 1, got {self.max_slots}"
        assert self.max_context >= 0, f"max_context must be >= 0, got {self.max_context}"
        assert self.prefill_chunk >= 1, f"prefill_chunk must be >= 1, got {self.prefill_chunk}"
        assert self.max_prefill_batch >= 1, f"max_prefill_batch must be >= 1, got {self.max_prefill_batch}"
        assert 1 <= self.default_max_tokens <= self.max_tokens_cap, "need 1 <= default_max_tokens <= max_tokens_cap"
        assert self.stream_interval >= 1, f"stream_interval must be >= 1, got {self.stream_interval}"
        assert self.cancel_check_interval >= 1, "cancel_check_interval must be >= 1"
        assert self.max_waiting >= 0, f"max_waiting must be >= 0, got {self.max_waiting}"
        assert self.max_queue_time_s > 0, f"max_queue_time_s must be > 0, got {self.max_queue_time_s}"
        assert self.dtype in ("auto", "float32", "bfloat16", "float16"), f"bad dtype {self.dtype!r}"

    @classmethod
    def from_parameters(cls, parameters: dict[str, str], **overrides) -> "EngineSettings":
        """Parse Triton config parameters ({key: string_value}); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        parameters = {k: v for k, v in parameters.items() if k not in NON_ENGINE_KEYS}
        unknown = sorted(set(parameters) - set(known))
        assert not unknown, f"unknown engine parameters {unknown}; known: {sorted(known)}"
        values = {k: _parse(known[k].type, v) for k, v in parameters.items()}
        values.update(overrides)
        return cls(**values)

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting or 4 * self.max_slots

    def to_parameters(self) -> dict[str, str]:
        return {f.name: _format(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes) -> "EngineSettings":
        return dataclasses.replace(self, **changes)


def _parse(type_name: str, text: str):
    text = str(text).strip()
    if type_name == "bool":
        assert text.lower() in ("true", "false", "1", "0"), f"expected a bool, got {text!r}"
        return text.lower() in ("true", "1")
    if type_name == "int":
        return int(text)
    if type_name == "float":
        return float(text)
    return text


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
