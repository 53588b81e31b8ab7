"""The Python-based `onnxruntime` backend (backends/onnxruntime/model.py).

Pure helpers (I/O check, padding, splitting) are tested directly; padding invariance against ONNX
Runtime itself; batching, per-request errors and golden replay against a real server."""
from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients.common import infer, make_client
from export import golden, pbtxt
from export.specs import MINILM
from serve.paths import MODEL_REPOSITORY, PROJECT_BACKENDS, pytriton_root
from tests.server_fixtures import start_server

GOLDEN_DIR = Path(__file__).parent / "golden"
ENCODER_DIR = MODEL_REPOSITORY / MINILM.name
ONNX = ENCODER_DIR / "1" / "model.onnx"
IN_NAMES = [t.name for t in MINILM.inputs]
(OUT,) = MINILM.outputs



def load_backend():
    """Import model.py as Triton would (triton_python_backend_utils.py lives in the Python backend dir)."""
    sys.path.insert(0, str(pytriton_root() / "backends" / "python"))
    spec = importlib.util.spec_from_file_location("ort_backend", PROJECT_BACKENDS / "onnxruntime" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


B = load_backend()


def node(name, type_, shape):
    return SimpleNamespace(name=name, type=type_, shape=shape)


def encoder_config(**over) -> dict:
    cfg = {"max_batch_size": 64,
           "input": [{"name": n, "data_type": "TYPE_INT64", "dims": ["-1"]} for n in IN_NAMES],
           "output": [{"name": OUT.name, "data_type": "TYPE_FP32", "dims": ["-1", "384"]}],
           "parameters": {}}
    cfg.update(over)
    return cfg


ONNX_INPUTS = [node(n, "tensor(int64)", ["batch", "sequence"]) for n in IN_NAMES]
ONNX_OUTPUTS = [node(OUT.name, "tensor(float)", ["batch", "sequence", 384])]


# ---- I/O check at load -------------------------------------------------------------------------------


def test_check_io_accepts_matching_config():
    ins, outs = B.check_io(encoder_config(), ONNX_INPUTS, ONNX_OUTPUTS)
    assert [s.axis_keys for s in ins] == [(None, "sequence")] * 3
    assert outs[0].axis_keys == (None, "sequence", None)
    assert [s.pad_value for s in ins] == [0, 0, 0]


@pytest.mark.parametrize("change, message", [
    (lambda c: c["input"][0].update(data_type="TYPE_INT32"), "input 'input_ids': config data_type TYPE_INT32 != ONNX TYPE_INT64"),
    (lambda c: c["input"][1].update(name="mask"), "input 'mask' is in config.pbtxt but not in the ONNX model"),
    (lambda c: c["input"][1].update(name="mask"), "ONNX inputs ['attention_mask'] are not in config.pbtxt"),
    (lambda c: c["input"][2].update(dims=["-1", "-1"]), "input 'token_type_ids': rank 3"),
    (lambda c: c["output"][0].update(dims=["-1", "512"]), "output 'last_hidden_state': dim 2 is 512 in config but fixed 384"),
    (lambda c: c["output"][0].update(data_type="TYPE_FP16"), "config data_type TYPE_FP16 != ONNX TYPE_FP32"),
])
def test_check_io_rejects_mismatch(change, message):
    cfg = encoder_config()
    change(cfg)
    with pytest.raises(ValueError, match="config.pbtxt does not match the ONNX model") as e:
        B.check_io(cfg, ONNX_INPUTS, ONNX_OUTPUTS)
    assert message in str(e.value)


def test_check_io_pad_value_parameter():
    cfg = encoder_config(parameters={"pad_value.input_ids": {"string_value": "7"}})
    ins, _ = B.check_io(cfg, ONNX_INPUTS, ONNX_OUTPUTS)
    assert [s.pad_value for s in ins] == [7, 0, 0]


def test_check_io_unnamed_axes_pair_by_position():
    ins_nodes = [node(n, "tensor(int64)", [None, None]) for n in IN_NAMES]
    ins, outs = B.check_io(encoder_config(), ins_nodes, [node(OUT.name, "tensor(float)", [None, None, 384])])
    assert ins[0].axis_keys == (None, "axis1") and outs[0].axis_keys == (None, "axis1", None)


# ---- stacking, padding, splitting --------------------------------------------------------------------


def specs():
    return B.check_io(encoder_config(), ONNX_INPUTS, ONNX_OUTPUTS)


def req(batch: int, seq: int, start: int = 1) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + batch * seq, dtype=np.int64).reshape(batch, seq)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_stack_pads_to_longest_and_split_cuts_back():
    ins, outs = specs()
    reqs = [req(2, 3), req(1, 5, 100)]
    lengths = [B.request_lengths(ins, r, True)[1] for r in reqs]
    assert lengths == [{"sequence": 3}, {"sequence": 5}]
    feeds = B.stack_requests(ins, reqs, lengths)
    assert feeds["input_ids"].shape == (3, 5)
    np.testing.assert_array_equal(feeds["input_ids"][0], [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(feeds["attention_mask"][:2, 3:], 0)
    # a fake model output [B, S, 384] whose values encode (row, position)
    hidden = (np.arange(3)[:, None, None] * 100 + np.arange(5)[None, :, None] + np.zeros((1, 1, 384))).astype(np.float32)
    parts = B.split_outputs(outs, {OUT.name: hidden}, [2, 1], lengths)
    assert parts[0][OUT.name].shape == (2, 3, 384) and parts[1][OUT.name].shape == (1, 5, 384)
    np.testing.assert_array_equal(parts[1][OUT.name][0, :, 0], [200, 201, 202, 203, 204])


@pytest.mark.parametrize("arrays, message", [
    ({**req(1, 3), "attention_mask": np.ones((1, 4), np.int64)}, "inputs disagree on axis 'sequence'"),
    ({**req(1, 3), "token_type_ids": np.zeros((2, 3), np.int64)}, "inputs disagree on the batch size"),
    ({**req(1, 3), "input_ids": np.ones((1, 3), np.int32)}, "has dtype int32, expected int64"),
    ({**req(1, 3), "input_ids": np.ones((3,), np.int64)}, "expected rank 2"),
    ({k: v[:, :0] for k, v in req(1, 3).items()}, "has an empty axis 1"),
])
def test_request_lengths_rejects(arrays, message):
    ins, _ = specs()
    with pytest.raises(B.RequestError, match=message):
        B.request_lengths(ins, arrays, True)


def test_padding_does_not_change_unpadded_tokens():
    """What makes cross-request padding safe for attention-masked encoders, on the real model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    short = rng.integers(1000, 20000, size=(1, 6)).astype(np.int64)
    short[0, 0], short[0, -1] = 101, 102
    alone = sess.run([OUT.name], {"input_ids": short, "attention_mask": np.ones_like(short),
                                  "token_type_ids": np.zeros_like(short)})[0]
    ins, outs = specs()
    reqs = [{"input_ids": short, "attention_mask": np.ones_like(short), "token_type_ids": np.zeros_like(short)},
            req(2, 20, 2000)]
    lengths = [B.request_lengths(ins, r, True)[1] for r in reqs]
    feeds = B.stack_requests(ins, reqs, lengths)
    batched = B.split_outputs(outs, dict(zip([OUT.name], sess.run([OUT.name], feeds))), [1, 2], lengths)[0][OUT.name]
    assert batched.shape == alone.shape == (1, 6, 384)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)
    # and the padding is not a no-op: without the mask the padded positions would leak into the result
    unmasked = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    leaked = sess.run([OUT.name], unmasked)[0][0, :6]
    assert np.abs(leaked - alone[0]).max() > 1e-2


# ---- through the server --------------------------------------------------------------------------------


def served_encoders() -> list[str]:
    """Encoder variants of the main repository that this backend serves and that have a golden file."""
    names = []
    for d in sorted(MODEL_REPOSITORY.iterdir()):
        if (d / "config.pbtxt").is_file() and pbtxt.read(d).backend == "onnxruntime" and (GOLDEN_DIR / f"{d.name}.npz").is_file():
            names.append(d.name)
    return names


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", served_encoders() or ["no encoder with a golden file: run `make export`"])
def test_golden_replay(embedding_server, model, protocol):
    """The export-time inputs through the server match the PyTorch reference within the variant's tolerance."""
    g = golden.load(golden.path_for(model, GOLDEN_DIR))
    client = make_client(embedding_server.grpc_url if protocol == "grpc" else embedding_server.http_url, protocol)
    out = infer(client, protocol, model, g.inputs, list(g.reference))
    for name, ref in g.reference.items():
        assert out[name].shape == ref.shape and out[name].dtype == np.float32
    g.check(out)  # raises with max abs diff / cosine per output when out of tolerance


def encoder_inputs(protocol: str, arrays: dict[str, np.ndarray]):
    mod = grpcclient if protocol == "grpc" else httpclient
    inputs = []
    for n, a in arrays.items():
        i = mod.InferInput(n, list(a.shape), "INT64" if a.dtype == np.int64 else "INT32")
        i.set_data_from_numpy(a)
        inputs.append(i)
    return inputs


BAD_ENCODER_REQUESTS = {
    "wrong dtype": ({**req(1, 4), "input_ids": np.ones((1, 4), np.int32)}, "data-type is 'INT32', but model"),
    "wrong shape": ({k: v[0] for k, v in req(1, 4).items()}, "unexpected shape for input"),
    "batch over max": (req(MINILM.max_batch_size + 1, 4), f"batch-size must be <= {MINILM.max_batch_size}"),
    "unknown input": ({**req(1, 4), "pixels": np.ones((1, 4), np.int64)}, "expected 3 inputs but got 4 inputs"),
    "inconsistent lengths": ({**req(1, 4), "attention_mask": np.ones((1, 5), np.int64)}, "inputs disagree on axis 'sequence'"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD_ENCODER_REQUESTS))
def test_bad_encoder_request_is_invalid_argument(embedding_server, protocol, case):
    arrays, message = BAD_ENCODER_REQUESTS[case]
    client = make_client(embedding_server.grpc_url if protocol == "grpc" else embedding_server.http_url, protocol)
    with pytest.raises(InferenceServerException) as e:
        client.infer(MINILM.name, encoder_inputs(protocol, arrays))
    assert message in e.value.message()
    assert e.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    good = infer(client, protocol, MINILM.name, req(2, 4), [OUT.name])[OUT.name]  # the server keeps serving
    assert good.shape == (2, 4, 384)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """A private encoder with a long queue delay so that concurrent requests land in one execute(), and
    ragged batching so that requests of different lengths may share it (Triton batches equal shapes only)."""
    assert ONNX.is_file(), f"{ONNX} missing: run `make export`"
    repo = tmp_path_factory.mktemp("repo")
    (repo / MINILM.name / "1").mkdir(parents=True)
    os.symlink(ONNX, repo / MINILM.name / "1" / "model.onnx")
    config = pbtxt.read(ENCODER_DIR)
    config.dynamic_batching.max_queue_delay_microseconds = 300_000
    del config.dynamic_batching.preferred_batch_size[:]
    del config.model_warmup[:]
    for i in config.input:
        i.allow_ragged_batch = True
    pbtxt.write(config, repo / MINILM.name)
    with start_server(repo) as server:
        yield server


def test_concurrent_requests_batch_and_fail_alone(batching_server):
    """8 concurrent requests of different lengths, one malformed (rejected before the run) and one with a
    token id outside the vocabulary (breaks the batched ORT run): the 6 others equal their solo results."""
    client = make_client(batching_server.grpc_url, "grpc")
    reqs = [req(1 + i % 3, 3 + 2 * i, 1000 + 50 * i) for i in range(8)]
    reqs[5] = {**reqs[5], "attention_mask": np.ones((reqs[5]["input_ids"].shape[0], 2), np.int64)}
    reqs[6] = {**reqs[6], "input_ids": np.full_like(reqs[6]["input_ids"], 10**8)}
    solo = {i: infer(client, "grpc", MINILM.name, r, [OUT.name])[OUT.name] for i, r in enumerate(reqs) if i not in (5, 6)}

    def call(r):
        try:
            return infer(make_client(batching_server.grpc_url, "grpc"), "grpc", MINILM.name, r, [OUT.name])[OUT.name]
        except InferenceServerException as e:
            return e

    stats_before = model_stats(batching_server)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, reqs))
    stats_after = model_stats(batching_server)
    assert isinstance(results[5], InferenceServerException) and "disagree on axis 'sequence'" in results[5].message()
    assert isinstance(results[6], InferenceServerException) and "onnxruntime failed on this request" in results[6].message()
    assert results[5].status() == results[6].status() == "StatusCode.INVALID_ARGUMENT"
    for i, out in solo.items():
        assert results[i].shape == out.shape, i
        np.testing.assert_allclose(results[i], out, atol=2e-5, rtol=0)
    executions = stats_after["execution_count"] - stats_before["execution_count"]
    assert executions < 6, f"expected the concurrent requests to be batched, got {executions} executions"


def model_stats(server) -> dict:
    client = httpclient.InferenceServerClient(server.http_url)
    (s,) = client.get_inference_statistics(MINILM.name, headers=server.admin_headers)["model_stats"]
    return {"execution_count": int(s.get("execution_count", 0)), "inference_count": int(s.get("inference_count", 0))}
