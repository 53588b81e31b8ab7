"""Engine settings: the one place where every engine knob and its default is defined.

One road from config to engine: `export/llm.py` writes `EngineSettings.to_parameters()` into the
model's config.pbtxt `parameters`; the backend (and the benchmarks) read them back with
`EngineSettings.from_config(model_dir)` / `from_parameters()`; `--set key=value` overrides are parsed
by `parse_overrides()` only. A bad value raises ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

# config parameters that are not engine settings: read by serve/repository.py's pre-start check.
NON_ENGINE_KEYS = ("required_artifacts", "export_command")
ATTENTION_IMPLS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class EngineSettings:
    # Checkpoint directory (HF layout: config.json, *.safetensors, tokenizer files). A relative
    # path is resolved against the model version directory (model_repository/<name>/1/).
    checkpoint: str = "checkpoint"
    # "auto": bfloat16 on CUDA (float16 if bf16 is unsupported), float32 on CPU.
    dtype: str = "auto"
    # Sequences decoded together (the decode batch; also the largest CUDA-graph bucket).
    max_seqs: int = 64
    # Tokens per sequence (prompt + generated). 0 = the model's max_position_embeddings.
    max_context: int = 512
    # Paged KV cache: blocks of `block_size` tokens from one pool. Its size: kv_cache_budget_mb when
    # set; else on CUDA `kv_cache_memory_fraction` of the GPU's memory minus what the weights and a
    # full-size step use; else (CPU) room for max_seqs sequences of max_context tokens.
    block_size: int = 16
    kv_cache_budget_mb: float = 0.0
    kv_cache_memory_fraction: float = 0.85
    # Full KV blocks are shared between sequences with the same token prefix (content-hashed, LRU).
    prefix_caching: bool = True
    # Tokens per engine step: every running decode token plus prefill chunks up to this budget, in
    # one forward (chunked prefill mixed with decode). Tuned on the H200: docs/llm.md.
    step_token_budget: int = 2048
    # Admission: requests waiting past these are refused at once as overloaded (UNAVAILABLE;
    # clients retry later). max_waiting 0 = 4 x max_seqs; max_queue_time_s: the longest wait.
    max_waiting: int = 0
    max_queue_time_s: float = 30.0
    # Requests: max_tokens when the request omits it, and the largest max_tokens accepted.
    default_max_tokens: int = 64
    max_tokens_cap: int = 4096
    # Streaming: one response every `stream_interval` generated tokens (the first and the final
    # responses always go out at once).
    stream_interval: int = 1
    # Attention over the paged cache: "triton" (OpenAI-Triton kernel, CUDA only), "torch" (gather +
    # SDPA, the reference and the CPU path), "auto" (triton on CUDA when importable, else torch).
    attention: str = "auto"
    # GPU decode: one CUDA graph per padded batch bucket (powers of two up to max_seqs) for steps
    # that only decode; steps with prefill chunks run eagerly. `compile`: the layers those graphs
    # replay are torch.compile'd first (fused norms and activations: 8B decode step -15% at batch 1,
    # -7% at 64 on the H200; seconds per bucket cold, cached on disk: docs/llm.md). CUDA only; CPU runs eagerly.
    cuda_graphs: bool = True
    compile: bool = True
    # GPU: a step that only prefills one new prompt of up to 512 tokens (an idle server's first
    # token) replays a CUDA graph per token bucket instead of launching ~20 kernels per layer.
    prefill_graphs: bool = True
    # GPU: a step that mixes decode rows with at most 2 fresh prompt chunks that fit a prefill graph
    # replays the decode graph and each chunk's prefill graph, instead of running eagerly (about 1 ms of
    # host time per layer). 8B on the H200, 128/256 through Triton: TTFT p50 at 8 streams 90 -> 43 ms,
    # 64 streams 8,288 -> 8,947 tok/s, ITL p99 37 -> 25 ms (results/gpu/engine_v2/round5).
    mixed_prefill_graphs: bool = True
    # Launch step N+1 before reading step N's tokens on the host, so Python's per-token work
    # (detokenize, stop words, send) overlaps the device's work. Same outputs either way.
    overlap: bool = True
    # Poll request.is_cancelled() every N steps.
    cancel_check_interval: int = 1
    # Gauges/counters are flushed at most this often (histograms are observed per event).
    metrics_interval_s: float = 0.05
    # CPU only: torch intra-op threads (0 = torch's default). Small models run fastest with 1.
    cpu_threads: int = 0
    # Build all CUDA graphs at start (else lazily, on first use of a bucket).
    warmup: bool = True

    def __post_init__(self):
        def need(ok: bool, key: str, rule: str):
            if not ok:
                raise ValueError(f"engine setting {key}={getattr(self, key)!r}: {rule}")

        need(self.max_seqs >= 1, "max_seqs", "must be >= 1")
        need(self.max_context >= 0, "max_context", "must be >= 0 (0 = the model's limit)")
        need(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size", "must be a power of two")
        need(self.kv_cache_budget_mb >= 0, "kv_cache_budget_mb", "must be >= 0")
        need(0 < self.kv_cache_memory_fraction <= 1, "kv_cache_memory_fraction", "must be in (0, 1]")
        need(self.step_token_budget >= self.max_seqs, "step_token_budget", f"must be >= max_seqs ({self.max_seqs})")
        need(self.max_waiting >= 0, "max_waiting", "must be >= 0")
        need(self.max_queue_time_s > 0, "max_queue_time_s", "must be > 0")
        need(1 <= self.default_max_tokens <= self.max_tokens_cap, "default_max_tokens", "need 1 <= it <= max_tokens_cap")
        need(self.stream_interval >= 1, "stream_interval", "must be >= 1")
        need(self.cancel_check_interval >= 1, "cancel_check_interval", "must be >= 1")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto|float32|bfloat16|float16")
        need(self.attention in ATTENTION_IMPLS, "attention", "|".join(ATTENTION_IMPLS))

    @classmethod
    def from_parameters(cls, parameters: dict[str, str], **overrides) -> "EngineSettings":
        """Parse Triton config parameters ({key: string_value}); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        parameters = {k: v for k, v in parameters.items() if k not in NON_ENGINE_KEYS}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            raise ValueError(f"unknown engine parameters {unknown}; known: {sorted(known)}")
        values = {k: _parse(k, known[k].type, v) for k, v in parameters.items()}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_config(cls, model_dir: str | Path, **overrides) -> "EngineSettings":
        """The settings in model_dir/config.pbtxt (what the backend reads), with a checkpoint path
        made absolute (relative ones are relative to the version directory 1/)."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        model_dir = Path(model_dir)
        cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        s = cls.from_parameters({k: v.string_value for k, v in cfg.parameters.items()}, **overrides)
        if not Path(s.checkpoint).is_absolute():
            s = s.replace(checkpoint=str(model_dir / "1" / s.checkpoint))
        return s

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting or 4 * self.max_seqs

    def to_parameters(self) -> dict[str, str]:
        return {f.name: _format(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes) -> "EngineSettings":
        return dataclasses.replace(self, **changes)


def parse_overrides(pairs: list[str] | None) -> dict:
    """`--set key=value` pairs -> {key: typed value} (ValueError naming a bad key or value)."""
    known = {f.name: f for f in fields(EngineSettings)}
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected key=value")
        if key not in known:
            raise ValueError(f"--set {key}: unknown engine setting; known: {sorted(known)}")
        out[key] = _parse(key, known[key].type, value)
    return out


def _parse(key: str, type_name: str, text: str):
    text = str(text).strip()
    try:
        if type_name == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError as e:
        raise ValueError(f"engine setting {key}={text!r}: {e}") from None
    return text


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
