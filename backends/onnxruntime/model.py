"""A Python-based Triton backend named `onnxruntime` for pip-only hosts.

The tritonserver of the nvidia-pytriton wheel ships only the Python backend; Triton serves every model
whose config says `backend: "onnxruntime"` with this file when it finds `<backend-dir>/onnxruntime/model.py`
instead of the C++ `libtriton_onnxruntime.so`. The same config.pbtxt therefore loads unchanged here and
in the NGC container (which has the C++ backend).

What it does:
- initialize: reads the config once, finds the ONNX file, creates one InferenceSession (CUDA execution
  provider for KIND_GPU instances when onnxruntime-gpu is installed) and checks the ONNX inputs/outputs
  (names, dtypes, rank, fixed dims) against the config; a mismatch fails the load with a clear message.
- execute: validates each request on its own (a bad request gets its own error response), pads the
  dynamic non-batch axes of all good requests to the longest one, concatenates them on the batch axis,
  runs ONNX Runtime once, and splits the outputs back, cutting padded positions off each request.
  Triton's dynamic batcher puts only equal-shape requests into one execute unless an input sets
  `allow_ragged_batch: true` (then requests of any length arrive together and the padding is what makes
  them one ORT run; a Python-backend-only setting, the C++ backend would hand the model a flat ragged
  buffer). Padding is exact for attention-masked encoders: padded keys are masked out, padded query
  rows are cut off (tests/test_onnxruntime_backend.py checks both against ORT).

The file is self-contained (Triton copies only model.py into the backend directory) and the helpers
below `# ---- pure helpers` do not touch pb_utils so tests can call them directly.

Config parameters (all optional; the first two are the C++ onnxruntime backend's own names):
  intra_op_thread_count   ORT intra-op threads per instance (default: CPU cores / CPU instances)
  inter_op_thread_count   ORT inter-op threads (default 1)
  allow_spinning          "0"/"1": ORT intra-op threads spin-wait between runs (default 0: see below)
  pad_value.<input>       value used to pad <input> along dynamic axes (default 0: pad token id,
                          attention mask 0 and token type 0 for BERT-style encoders)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
import triton_python_backend_utils as pb_utils

# ONNX Runtime type strings -> Triton config type names (only the types the checks need to compare).
ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}
DEFAULT_PAD_VALUE = 0
DEFAULT_INTER_OP_THREADS = 1
# Off, unlike ORT's default: a spinning intra-op worker starves Triton's dynamic-batcher thread on a
# few cores (measured on 2 cores, 1 instance x 2 threads, sequential requests: 34.5 ms/request with
# spinning, 4.3 ms without).
DEFAULT_ALLOW_SPINNING = "0"


class RequestError(ValueError):
    """A problem with one request's data: answered with INVALID_ARGUMENT for that request only."""


@dataclass(frozen=True)
class IOSpec:
    """One config input/output as this backend uses it."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # full dims including the batch axis (-1) when max_batch_size > 0
    axis_keys: tuple[str | None, ...]  # per dim: key of a dynamic axis shared across tensors, None if fixed
    pad_value: int | float = DEFAULT_PAD_VALUE


# ---- pure helpers (no pb_utils) ----------------------------------------------------------------------


def axis_key(onnx_dim, position: int) -> str:
    """Key identifying a dynamic axis across tensors: the ONNX symbolic name ('sequence') when the
    export named it, else the position (so unnamed exports still pair input/output axes by index)."""
    return onnx_dim if isinstance(onnx_dim, str) and onnx_dim else f"axis{position}"


def config_params(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def check_io(config: dict, ort_inputs, ort_outputs) -> tuple[list[IOSpec], list[IOSpec]]:
    """Compare the config's inputs/outputs with the ONNX graph's (ORT NodeArg lists: .name .type .shape).

    Raises ValueError listing every mismatch. Returns IOSpecs whose dynamic non-batch axes carry the
    ONNX axis keys used for padding (inputs) and un-padding (outputs)."""
    batched = config.get("max_batch_size", 0) > 0
    params = config_params(config)
    problems: list[str] = []

    def one(kind: str, cfg: dict, onnx_by_name: dict) -> IOSpec | None:
        name = cfg["name"]
        node = onnx_by_name.get(name)
        if node is None:
            problems.append(f"{kind} '{name}' is in config.pbtxt but not in the ONNX model "
                            f"(ONNX has {sorted(onnx_by_name)})")
            return None
        cfg_type = cfg["data_type"]
        onnx_type = ORT_TO_TRITON.get(node.type, node.type)
        if cfg_type != onnx_type:
            problems.append(f"{kind} '{name}': config data_type {cfg_type} != ONNX {onnx_type}")
        if cfg.get("reshape"):
            problems.append(f"{kind} '{name}': reshape is not supported by this backend")
        dims = [int(d) for d in cfg["dims"]]
        full = ([-1] if batched else []) + dims
        onnx_shape = list(node.shape)
        if len(full) != len(onnx_shape):
            problems.append(f"{kind} '{name}': rank {len(full)} (config dims {dims}"
                            f"{' + batch' if batched else ''}) != ONNX rank {len(onnx_shape)} {onnx_shape}")
            return None
        keys: list[str | None] = []
        for i, (c, o) in enumerate(zip(full, onnx_shape)):
            fixed_onnx = isinstance(o, int) and o > 0
            if fixed_onnx and c != o:
                problems.append(f"{kind} '{name}': dim {i} is {c} in config but fixed {o} in ONNX {onnx_shape}")
            keys.append(axis_key(o, i) if (c == -1 and not (batched and i == 0)) else None)
        pad = params.get(f"pad_value.{name}")
        pad_value = float(pad) if pad and "." in pad else int(pad) if pad else DEFAULT_PAD_VALUE
        return IOSpec(name, np.dtype(pb_utils.triton_string_to_numpy(cfg_type)), tuple(full), tuple(keys), pad_value)

    onnx_in = {n.name: n for n in ort_inputs}
    onnx_out = {n.name: n for n in ort_outputs}
    inputs = [one("input", c, onnx_in) for c in config.get("input", [])]
    outputs = [one("output", c, onnx_out) for c in config.get("output", [])]
    missing = sorted(set(onnx_in) - {c["name"] for c in config.get("input", [])})
    if missing:
        problems.append(f"ONNX inputs {missing} are not in config.pbtxt (every graph input must be fed)")
    if problems:
        raise ValueError("config.pbtxt does not match the ONNX model:\n  " + "\n  ".join(problems))
    in_keys = {k for s in inputs for k in s.axis_keys if k}
    for s in outputs:
        unknown = [k for k in s.axis_keys if k and k not in in_keys]
        # An output axis that no input carries cannot be un-padded per request: refuse instead of guessing.
        if unknown and batched:
            raise ValueError(f"output '{s.name}': dynamic axes {unknown} do not appear in any input "
                             f"(input axes {sorted(in_keys)}); cannot split the batch back per request")
    return inputs, outputs


def request_lengths(specs: list[IOSpec], arrays: dict[str, np.ndarray], batched: bool) -> tuple[int, dict[str, int]]:
    """Validate one request's arrays; return (batch size, {axis key: length}). Raises RequestError."""
    batch = None
    lengths: dict[str, int] = {}
    for s in specs:
        a = arrays[s.name]
        if a.dtype != s.dtype:
            raise RequestError(f"input '{s.name}' has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.dims):
            raise RequestError(f"input '{s.name}' has shape {list(a.shape)}, expected rank {len(s.dims)} {list(s.dims)}")
        for i, (n, d) in enumerate(zip(a.shape, s.dims)):
            if d != -1 and n != d:
                raise RequestError(f"input '{s.name}' has shape {list(a.shape)}, dim {i} must be {d}")
        if batched:
            if batch is not None and a.shape[0] != batch:
                raise RequestError(f"inputs disagree on the batch size: '{s.name}' has {a.shape[0]}, others {batch}")
            batch = a.shape[0]
        for i, k in enumerate(s.axis_keys):
            if k is None:
                continue
            if a.shape[i] == 0:
                raise RequestError(f"input '{s.name}' has an empty axis {i} ('{k}'): shape {list(a.shape)}")
            if k in lengths and lengths[k] != a.shape[i]:
                raise RequestError(f"inputs disagree on axis '{k}': '{s.name}' has {a.shape[i]}, others {lengths[k]}")
            lengths[k] = a.shape[i]
    return (batch if batched else 1), lengths


def pad_to(a: np.ndarray, keys: tuple[str | None, ...], target: dict[str, int], value) -> np.ndarray:
    """Pad `a` at the end of every keyed axis up to target[key] with `value`."""
    widths = [(0, target[k] - a.shape[i]) if k else (0, 0) for i, k in enumerate(keys)]
    if not any(w for _, w in widths):
        return a
    return np.pad(a, widths, mode="constant", constant_values=value)


def stack_requests(specs: list[IOSpec], reqs: list[dict[str, np.ndarray]], lengths: list[dict[str, int]]) -> dict[str, np.ndarray]:
    """Pad every request to the longest per axis key and concatenate on the batch axis."""
    target: dict[str, int] = {}
    for ln in lengths:
        for k, n in ln.items():
            target[k] = max(target.get(k, 0), n)
    return {s.name: np.concatenate([pad_to(r[s.name], s.axis_keys, target, s.pad_value) for r in reqs], axis=0)
            for s in specs}


def split_outputs(specs: list[IOSpec], outs: dict[str, np.ndarray], sizes: list[int], lengths: list[dict[str, int]]) -> list[dict[str, np.ndarray]]:
    """Inverse of stack_requests for the outputs: rows per request, keyed axes cut to its own lengths."""
    result, start = [], 0
    for b, ln in zip(sizes, lengths):
        one = {}
        for s in specs:
            a = outs[s.name][start:start + b]
            cut = tuple(slice(0, ln[k]) if k in ln else slice(None) for k in s.axis_keys)
            one[s.name] = np.ascontiguousarray(a[cut])
        result.append(one)
        start += b
    return result


def default_intra_threads(config: dict) -> int:
    """Share the cores among the CPU instances so instances do not oversubscribe each other."""
    instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])
                    if g.get("kind", "KIND_CPU") == "KIND_CPU") or 1
    return max(1, (os.cpu_count() or 1) // instances)


# ---- the Triton model ---------------------------------------------------------------------------------


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.batched = self.config.get("max_batch_size", 0) > 0
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.name}: ONNX file {path} not found (run `make export`)")

        params = config_params(self.config)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count") or default_intra_threads(self.config))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count") or DEFAULT_INTER_OP_THREADS)
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      params.get("allow_spinning") or DEFAULT_ALLOW_SPINNING)
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device = int(args.get("model_instance_device_id", 0))
                providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
            else:
                pb_utils.Logger.log_warn(f"{self.name}: KIND_GPU instance but onnxruntime has no "
                                         f"CUDAExecutionProvider (install onnxruntime-gpu); running on CPU")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.inputs, self.outputs = check_io(self.config, self.session.get_inputs(), self.session.get_outputs())
        self.output_names = [s.name for s in self.outputs]
        pb_utils.Logger.log_info(f"{self.name}: {path} on {self.session.get_providers()}, "
                                 f"intra_op_threads={opts.intra_op_num_threads}")

    def _read(self, request) -> dict[str, np.ndarray]:
        arrays = {}
        for s in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, s.name)
            if t is None:
                raise RequestError(f"missing input '{s.name}'")
            arrays[s.name] = t.as_numpy()
        return arrays

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def _respond(self, outs: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(s.name, outs[s.name].astype(s.dtype, copy=False)) for s in self.outputs])

    @staticmethod
    def _error(msg: str, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, code))

    def execute(self, requests):
        responses = [None] * len(requests)
        good: list[tuple[int, dict, int, dict]] = []  # (index, arrays, batch size, axis lengths)
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
                b, ln = request_lengths(self.inputs, arrays, self.batched)
                good.append((i, arrays, b, ln))
            except RequestError as e:
                responses[i] = self._error(f"{self.name}: {e}", pb_utils.TritonError.INVALID_ARG)

        if self.batched and len(good) > 1:
            try:
                feeds = stack_requests(self.inputs, [g[1] for g in good], [g[3] for g in good])
                split = split_outputs(self.outputs, self._run(feeds), [g[2] for g in good], [g[3] for g in good])
                for (i, *_), outs in zip(good, split):
                    responses[i] = self._respond(outs)
                return responses
            except Exception as e:  # noqa: BLE001 -- isolate the request that broke the batch below
                pb_utils.Logger.log_warn(f"{self.name}: batched run of {len(good)} requests failed ({e}); "
                                         f"retrying one by one")

        failed = []
        for i, arrays, _, _ in good:
            try:
                responses[i] = self._respond(self._run(arrays))
            except Exception as e:  # noqa: BLE001 -- ORT errors become this request's error
                failed.append((i, e))
        for i, e in failed:
            # ORT says INVALID_ARGUMENT for bad data (e.g. a token id out of the vocabulary); when the other
            # requests of this call succeed the failing request's data is the cause as well.
            bad_data = isinstance(e, InvalidArgument) or len(failed) < len(good)
            code = pb_utils.TritonError.INVALID_ARG if bad_data else pb_utils.TritonError.INTERNAL
            responses[i] = self._error(f"{self.name}: onnxruntime failed on this request: {e}", code)
        return responses

    def finalize(self):
        self.session = None
