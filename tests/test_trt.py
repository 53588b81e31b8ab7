"""TensorRT export (export/trt.py), the build and the command: everything that does not need
TensorRT, plus build/parity tests marked `tensorrt` that run only where TensorRT and a GPU are present
(inside docker/Dockerfile.trt).

The build code is exercised against a fake `tensorrt` module that records the API calls, so the
profile, flags, workspace, timing cache, parser-error and manifest paths are checked here too.
Options and configs, manifests, parity and int8: tests/test_trt_{config,manifest,int8}.py.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export import pbtxt, trt_int8, trt_options
from export import trt as trt_export
from export.encoder_config import write_model_dir
from export.specs import MINILM, Tensor
from export.trt_manifest import HostInfo, check_engine_compat, manifest_path, read_manifest, sha256_file
from export.trt_options import INT8_SYMMETRIC, build_options
from serve.paths import REPO_ROOT
from tests.trt_helpers import (
    H100, HAVE_TENSORRT, L4, TINY_SPEC, calibration_batches, make_engine_model, needs_tensorrt, onnx_config,
    qdq_model, tiny_encoder_onnx, tiny_matmul_encoder_model,
)


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT Python API that build_engine uses; records every call in .calls.
    TensorRT 11 has no FP16/INT8 builder flags: using one raises AttributeError, as it would there."""

    def __init__(self, version="10.5.0", parse_ok=True, errors=(), plan=b"PLAN", cache_accepted=True,
                 outputs_dtype="FLOAT"):
        super().__init__("tensorrt")
        self.__version__ = version
        calls = self.calls = []
        flags = {"TF32": "TF32"} | ({"FP16": "FP16", "INT8": "INT8"} if version.startswith("10.") else {})
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                calls.append(("Logger", level))

        class Tensor:
            def __init__(self, name, dtype):
                self.name, self.dtype = name, types.SimpleNamespace(name=dtype)

        class Network:
            inputs = [Tensor(t.name, "INT64") for t in MINILM.inputs]
            outputs = [Tensor("last_hidden_state", outputs_dtype)]
            num_inputs, num_outputs = len(inputs), len(outputs)

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return b"CACHE[" + self.data + b"]+new"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool, n):
                calls.append(("set_memory_pool_limit", pool, n))

            def set_flag(self, f):
                calls.append(("set_flag", f))

            def clear_flag(self, f):
                calls.append(("clear_flag", f))

            def add_optimization_profile(self, p):
                calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                calls.append(("create_timing_cache", bytes(data)))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                self.cache = cache
                return cache_accepted or cache.data == b""

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                return plan

        class OnnxParser:
            num_errors = len(errors)

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse_from_file", path))
                return parse_ok

            def get_error(self, i):
                return errors[i]

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        fake = FakeTensorRT(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return fake
    return install


def test_build_engine_tensorrt_10_fp16(tmp_path, fake_trt, capsys):
    fake = fake_trt(version="10.5.0")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    cache = tmp_path / "cache" / "t.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    out = tmp_path / "repo" / "minilm_fp16_trt" / "1"
    engine = trt_export.build_engine(onnx, MINILM, "fp16", out, 3 << 30, cache, gpu=H100,
                                     io_dtypes={"input_ids": "INT64", "last_hidden_state": "FP32",
                                                "attention_mask": "INT64", "token_type_ids": "INT64"})
    assert engine == out / "model_sm90.plan" and engine.read_bytes() == b"PLAN"
    c = fake.calls
    assert ("create_network", 0) in c  # weakly typed on TensorRT 10
    assert ("parse_from_file", str(onnx)) in c
    assert ("set_memory_pool_limit", "WORKSPACE", 3 << 30) in c
    assert [x for x in c if x[0] in ("set_flag", "clear_flag")] == [("set_flag", "FP16")]
    assert [x[1:] for x in c if x[0] == "set_shape"] == [(t.name, (1, 1), (16, 32), (64, 128)) for t in MINILM.inputs]
    assert ("create_timing_cache", b"old") in c and ("set_timing_cache", b"old", False) in c
    assert cache.read_bytes() == b"CACHE[old]+new"  # saved after the build
    assert fake.names().index("add_optimization_profile") < fake.names().index("build_serialized_network")
    m = read_manifest(manifest_path(engine))
    assert (m.model, m.compute_capability, m.gpu_name, m.tensorrt_version, m.precision) == (
        "minilm_fp16_trt", "9.0", H100.name, "10.5.0", "fp16")
    assert m.engine_sha256 == sha256_file(engine) and m.source_onnx_sha256 == sha256_file(onnx)
    assert m.profiles["input_ids"] == [[1, 1], [16, 32], [64, 128]] and m.max_batch_size == 64
    assert m.build_options["set_flags"] == ["FP16"] and m.build_options["onnx_precision"] == "fp32"


def test_build_engine_tensorrt_11_uses_no_precision_flags(tmp_path, fake_trt):
    fake = fake_trt(version="11.0.0")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c.cache", gpu=H100)
    assert ("create_network", 0) in fake.calls  # strongly typed is implicit; the deprecated flag is not set
    assert not [x for x in fake.calls if x[0] in ("set_flag", "clear_flag")]
    assert ("create_timing_cache", b"") in fake.calls and (tmp_path / "c.cache").read_bytes() == b"CACHE[]+new"
    fake = fake_trt(version="11.0.0")
    trt_export.build_engine(onnx, MINILM, "fp32", tmp_path / "m" / "1", 1 << 30, tmp_path / "c.cache", gpu=H100)
    assert [x for x in fake.calls if x[0] in ("set_flag", "clear_flag")] == [("clear_flag", "TF32")]


def test_build_engine_prints_every_parser_error_and_raises(tmp_path, fake_trt, capsys):
    fake_trt(parse_ok=False, errors=("node Attention_3: unsupported op", "node Gelu_9: bad attribute"))
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(RuntimeError, match="2 parser error"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    err = capsys.readouterr().err
    assert "unsupported op" in err and "bad attribute" in err
    assert not (tmp_path / "m").exists()


def test_build_engine_failures(tmp_path, fake_trt):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    fake_trt(plan=None)
    with pytest.raises(RuntimeError, match="failed to build"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()
    fake_trt(outputs_dtype="HALF")
    config_io = {t.name: "INT64" for t in MINILM.inputs} | {"last_hidden_state": "FP32"}
    with pytest.raises(RuntimeError, match="last_hidden_state: network dtype FP16 != config FP32"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100,
                                io_dtypes=config_io)
    fake = fake_trt(cache_accepted=False)
    (tmp_path / "c").write_bytes(b"from another gpu")
    trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    assert ("set_timing_cache", b"", False) in fake.calls  # refused cache replaced by a fresh one


@pytest.fixture
def export_setup(tmp_path, fake_trt, monkeypatch):
    """Source ONNX + ONNX config + golden inputs in tmp_path; engine outputs = ONNX Runtime's (+ `offset`)."""
    src_repo = tmp_path / "model_repository"
    onnx = tiny_encoder_onnx(src_repo / "minilm" / "1" / "model.onnx")
    write_model_dir(onnx_config(), MINILM, src_repo / "minilm")
    rng = np.random.default_rng(1)
    golden = tmp_path / "minilm.npz"
    np.savez(golden, **{"input.input_ids": rng.integers(0, 1000, (3, 7)).astype(np.int32),  # cast to INT64
                        "input.attention_mask": np.ones((3, 7), np.int64),
                        "input.token_type_ids": np.zeros((3, 7), np.int64),
                        "reference.last_hidden_state": np.zeros((3, 7, 384), np.float32)})
    monkeypatch.setattr(trt_export, "source_onnx",
                        lambda spec, p: trt_options.source_onnx(spec, p, src_repo, tmp_path / "trt_sources"))
    monkeypatch.setattr(trt_export, "detect_gpus", lambda: (H100,))
    offset = {"value": 0.0}

    def run_engine(engine_path, feeds):
        assert Path(engine_path).read_bytes() == b"PLAN"
        return {k: v + offset["value"] for k, v in trt_export.run_onnxruntime(onnx, feeds).items()}

    monkeypatch.setattr(trt_export, "run_engine", run_engine)
    fake_trt(version="10.5.0")
    return types.SimpleNamespace(out_repo=tmp_path / "model_repository_trt", golden=golden, onnx=onnx,
                                 cache=tmp_path / "c.cache", offset=offset, sources=tmp_path / "trt_sources")


def test_export_trt_writes_engine_manifest_and_config(export_setup, capsys):
    s = export_setup
    model_dir = trt_export.export_trt(MINILM, "fp16", s.out_repo, 1 << 30, s.cache, s.golden)
    assert model_dir == s.out_repo / "minilm_fp16_trt"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model_sm90.manifest.json", "model_sm90.plan"]
    config = pbtxt.read(model_dir)
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan"}
    assert config.max_batch_size == 64 and config.model_warmup
    assert (model_dir / "warmup" / "input_ids").read_bytes() == (s.onnx.parents[2] / "minilm" / "warmup" /
                                                                 "input_ids").read_bytes()
    assert "parity vs ONNX Runtime: last_hidden_state: max abs diff 0" in capsys.readouterr().out
    assert check_engine_compat(model_dir, HostInfo("10.5.0.18", (H100,))) == []


def test_export_trt_parity_failure_leaves_no_engine(export_setup):
    s = export_setup
    s.offset["value"] = 0.1  # > the fp16 tolerance 2e-2
    with pytest.raises(trt_export.ParityError, match=r"max abs diff 0.1 \(limit 0.02\)"):
        trt_export.export_trt(MINILM, "fp16", s.out_repo, 1 << 30, s.cache, s.golden)
    assert list((s.out_repo / "minilm_fp16_trt" / "1").iterdir()) == []
    assert not (s.out_repo / "minilm_fp16_trt" / "config.pbtxt").exists()


def test_export_trt_int8_builds_from_the_symmetric_onnx(export_setup, monkeypatch, capsys):
    import onnx

    s = export_setup
    onnx.save(tiny_matmul_encoder_model(), s.onnx)  # the fp32 ONNX the symmetric one is made from
    monkeypatch.setattr(trt_int8, "tokenizer_calibration", lambda spec: ("4 random batches", calibration_batches))
    model_dir = trt_export.export_trt(TINY_SPEC, "int8", s.out_repo, 1 << 30, s.cache, s.golden)
    sym = s.sources / "minilm_int8_sym.onnx"
    assert model_dir == s.out_repo / "minilm_int8_trt" and trt_int8.stamp_path(sym).is_file()
    fake = sys.modules["tensorrt"]
    assert ("parse_from_file", str(sym)) in fake.calls
    assert [x for x in fake.calls if x[0] == "set_flag"] == [("set_flag", "INT8"), ("set_flag", "FP16")]
    m = read_manifest(manifest_path(model_dir / "1" / "model_sm90.plan"))
    assert m.source_onnx_sha256 == sha256_file(sym) and m.build_options["onnx_precision"] == INT8_SYMMETRIC
    assert pbtxt.read(model_dir).instance_group[0].count == pbtxt.read(s.onnx.parents[1]).instance_group[0].count
    out = capsys.readouterr().out
    assert f"making {sym}" in out and "parity vs ONNX Runtime: last_hidden_state: max abs diff" in out
    # the engine (here: fp32 outputs) against the symmetric ONNX, with int8_static's tolerance
    s.offset["value"] = 2.5  # > its max_abs 2.0
    with pytest.raises(trt_export.ParityError, match=r"\(limit 2.0\)"):
        trt_export.export_trt(TINY_SPEC, "int8", s.out_repo, 1 << 30, s.cache, s.golden)
    assert f"{sym}: up to date" in capsys.readouterr().out


def test_export_trt_int8_refuses_asymmetric_onnx_before_building(export_setup, monkeypatch):
    import onnx

    def ensure(spec, fp32_onnx, dst, tolerance):  # as if a uint8 Q/DQ model had been put there
        dst.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(qdq_model(np.array(128, np.uint8)), dst)

    monkeypatch.setattr(trt_export, "ensure_int8_source", ensure)
    with pytest.raises(RuntimeError, match="minilm_int8_sym.onnx cannot become a TensorRT int8 engine"):
        trt_export.export_trt(MINILM, "int8", export_setup.out_repo, 1 << 30, export_setup.cache, export_setup.golden)
    assert "parse_from_file" not in sys.modules["tensorrt"].names()


def test_cli_without_tensorrt_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert trt_export.main(["--out-repo", str(tmp_path / "out")]) == trt_export.EXIT_NO_TENSORRT == 2
    err = capsys.readouterr().err
    assert "TensorRT's Python package is not importable" in err
    assert "make export-trt-docker" in err and "nvcr.io/nvidia/tensorrt:26.07-py3" in err
    assert "No engine was written" in err
    assert not (tmp_path / "out").exists()


def test_cli_int8_without_tensorrt_stops_before_making_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_export, "ensure_int8_source", lambda *a: pytest.fail("made the int8 ONNX without TensorRT"))
    assert trt_export.main(["--precision", "int8", "--out-repo", str(tmp_path / "out")]) == 2
    assert "TensorRT's Python package is not importable" in capsys.readouterr().err


def test_cli_make_int8_source_needs_no_tensorrt(tmp_path, monkeypatch, capsys):
    import onnx

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fp32 = tmp_path / "repo" / "minilm" / "1" / "model.onnx"
    fp32.parent.mkdir(parents=True)
    onnx.save(tiny_matmul_encoder_model(), fp32)
    monkeypatch.setattr(trt_export, "source_onnx",
                        lambda spec, p: trt_options.source_onnx(spec, p, tmp_path / "repo", tmp_path / "src"))
    monkeypatch.setattr(trt_int8, "tokenizer_calibration", lambda spec: ("4 random batches", calibration_batches))
    monkeypatch.setitem(trt_export.ENCODERS, "minilm", TINY_SPEC)
    assert trt_export.main(["--make-int8-source"]) == 0
    assert trt_export.int8_onnx_problems(onnx.load(str(tmp_path / "src" / "minilm_int8_sym.onnx"))) == []
    assert "last_hidden_state: max_abs=" in capsys.readouterr().out


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_cli_module_exit_code_without_tensorrt(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.trt", "--out-repo", str(tmp_path / "out")], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "make export-trt-docker" in r.stderr and not (tmp_path / "out").exists()


def test_cli_check(tmp_path, monkeypatch, capsys):
    model_dir = make_engine_model(tmp_path / "repo")
    monkeypatch.setattr("export.trt_manifest.detect_host", lambda: HostInfo("10.5.0", (L4,)))
    assert trt_export.main(["--check", "--out-repo", str(model_dir.parent)]) == 1
    out = capsys.readouterr().out
    assert "minilm: ok" in out and "GPU 0 (NVIDIA L4, compute capability 8.9) has no engine" in out
    monkeypatch.setattr("export.trt_manifest.detect_host", lambda: HostInfo("10.5.0", (H100,)))
    assert trt_export.main(["--check", "--out-repo", str(model_dir.parent)]) == 0
    assert trt_export.main(["--check", "--out-repo", str(tmp_path / "none")]) == 1


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_build_and_parity(tmp_path, precision):
    import tensorrt

    src = trt_options.source_onnx(MINILM, build_options(tensorrt.__version__, precision).onnx_precision)
    if not src.exists() and precision != "int8":
        pytest.skip(f"{src} not exported (run `make export`)")
    if precision == "int8":  # the build image has no tokenizer: the symmetric ONNX is made on the host
        fp32 = trt_options.source_onnx(MINILM, "fp32")
        want = trt_int8.recipe(fp32, trt_int8.tokenizer_calibration(MINILM)[0]) if fp32.exists() else None
        if want is None or not trt_int8.is_fresh(src, want):
            pytest.skip(f"{src} missing or stale: run `python -m export.trt --make-int8-source` on the host")
    model_dir = trt_export.export_trt(MINILM, precision, tmp_path / "repo", 2 << 30, tmp_path / "t.cache")
    assert (tmp_path / "t.cache").stat().st_size > 0
    assert check_engine_compat(model_dir) == []
