"""Multi-GPU placement (export/placement.py) on a CPU host: `--gpus` parsing, the generated instance
groups of the encoder exports and the LLM, the instances and devices Triton will make of them, the
device binding of the torch encoder backend, and doctor's per-GPU report."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import encoder, encoder_torch, pbtxt, placement, trt_config
from export.encoder_config import encoder_config
from export.placement import KIND_CPU, KIND_GPU, Instance
from export.specs import MINILM
from serve import doctor
from serve.paths import PROJECT_BACKENDS, REPO_ROOT


@pytest.mark.parametrize("text, ids", [
    ("2", (0, 1)), ("1", (0,)), ("0,1", (0, 1)), ("3,", (3,)), ("1,3", (1, 3)), (" 2 , 0 ", (2, 0)), ("7", tuple(range(7))),
])
def test_parse_gpus(text, ids):
    assert placement.parse_gpus(text) == ids


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("0", ">= 1"), ("-1", "whole number"), ("two", "whole number"), ("0,0", "twice"),
    ("1,,2", "device ids"), (",", "device ids"), ("0,-1", "device ids"), ("65", "more than 64"), ("0,64", ">= 64"),
])
def test_parse_gpus_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        placement.parse_gpus(text)


def groups(config: mc.ModelConfig) -> list[tuple[int, int, list[int]]]:
    return [(g.kind, g.count, list(g.gpus)) for g in config.instance_group]


def test_encoder_config_one_group_per_gpu():
    cfg = encoder_config(MINILM, "minilm", gpus=(0, 1))
    assert groups(cfg) == [(KIND_GPU, 1, [0]), (KIND_GPU, 1, [1])]
    assert groups(encoder_config(MINILM, "minilm", gpus=(1, 3), instances=2)) == [(KIND_GPU, 2, [1]), (KIND_GPU, 2, [3])]
    # The text Triton reads: each group pinned to its GPU, and it parses back to the same config.
    text = pbtxt.to_text(cfg)
    assert text.count("instance_group {") == 2 and "gpus: 0" in text and "gpus: 1" in text
    assert pbtxt.parse(text) == cfg
    # Without --gpus nothing changes (the committed CPU configs, tests/test_configs.py).
    assert groups(encoder_config(MINILM, "minilm")) == [(KIND_CPU, MINILM.cpu_instances, [])]
    assert groups(encoder_config(MINILM, "minilm", gpu=True, instances=2)) == [(KIND_GPU, 2, [])]


def test_instances_and_devices_of_a_two_gpu_encoder():
    cfg = encoder_config(MINILM, "minilm", gpus=(0, 1), instances=2)
    got = placement.instances(cfg, visible_gpus=2)
    assert [(i.group, i.index, i.kind, i.device_id) for i in got] == [
        (0, 0, "GPU", 0), (0, 1, "GPU", 0), (1, 0, "GPU", 1), (1, 1, "GPU", 1)]
    assert [i.device for i in got] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    with pytest.raises(ValueError, match=r"wants GPU\(s\) \[1\], 1 visible"):
        placement.instances(cfg, visible_gpus=1)


def test_instances_follow_triton_semantics_for_unpinned_groups():
    def cfg(*gs):
        return mc.ModelConfig(name="m", instance_group=list(gs))
    # KIND_GPU without gpus: `count` on every visible GPU.
    unpinned = cfg(mc.ModelInstanceGroup(kind=KIND_GPU, count=2))
    assert [i.device for i in placement.instances(unpinned, 2)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    with pytest.raises(ValueError, match="0 visible"):
        placement.instances(unpinned, 0)
    # KIND_CPU, KIND_AUTO and no group at all.
    assert [i.device for i in placement.instances(cfg(mc.ModelInstanceGroup(kind=KIND_CPU, count=3)), 2)] == ["cpu"] * 3
    auto = cfg(mc.ModelInstanceGroup(kind=placement.KIND_AUTO, count=1))
    assert [i.device for i in placement.instances(auto, 2)] == ["cuda:0", "cuda:1"]
    assert [i.device for i in placement.instances(auto, 0)] == ["cpu"]
    assert placement.instances(cfg(), 0) == [Instance("m", 0, 0, "CPU", 0)]


def test_llm_one_engine_per_gpu():
    assert [(g.kind, g.count, list(g.gpus)) for g in placement.llm_instance_groups((0, 1))] == [
        (KIND_GPU, 1, [0]), (KIND_GPU, 1, [1])]
    assert [(g.kind, g.count, list(g.gpus)) for g in placement.llm_instance_groups(None)] == [(KIND_CPU, 1, [])]
    llm = mc.ModelConfig(name="llama", instance_group=placement.llm_instance_groups(placement.parse_gpus("2")))
    assert [i.device for i in placement.instances(llm, 2)] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("bad", [dict(gpus=()), dict(gpus=(0, 0)), dict(gpus=(-1,)), dict(gpus=(0,), per_gpu=0)])
def test_gpu_groups_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        placement.gpu_groups(**bad)


def test_gpus_of_reads_the_placement_back():
    assert placement.gpus_of(placement.gpu_groups((2, 0))) == (2, 0)
    assert placement.gpus_of([mc.ModelInstanceGroup(kind=KIND_GPU, count=2)]) is None
    assert placement.gpus_of(encoder_config(MINILM, "m").instance_group) is None


def test_tensorrt_config_keeps_the_onnx_placement():
    cfg = trt_config.trt_config(MINILM, "minilm_trt", {"9.0": "model.sm90.plan"}, instances=2, gpus=(0, 1))
    assert groups(cfg) == [(KIND_GPU, 2, [0]), (KIND_GPU, 2, [1])]


def test_encoder_fingerprint_depends_on_placement(tmp_path):
    base = encoder._fingerprint("src", MINILM, "fp32", False, None, tmp_path)
    assert encoder._fingerprint("src", MINILM, "fp32", False, None, tmp_path, (0, 1)) != base
    assert encoder._fingerprint("src", MINILM, "fp32", False, None, tmp_path, None) == base


def test_encoder_torch_cli_writes_per_gpu_groups(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.encoder_torch", "--random-weights", "--repository", str(tmp_path),
                        "--gpus", "0,1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = pbtxt.read(tmp_path / encoder_torch.DEFAULT_NAME)
    assert groups(cfg) == [(KIND_GPU, encoder_torch.GPU_INSTANCES, [0]), (KIND_GPU, encoder_torch.GPU_INSTANCES, [1])]
    bad = subprocess.run([sys.executable, "-m", "export.encoder_torch", "--repository", str(tmp_path), "--gpus", "0,0"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "listed twice" in bad.stderr


def test_export_cli_refuses_a_bad_gpus_flag():
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--gpus", "zero"])
    assert e.value.code == 2


# ---- device binding inside the Python backends


@pytest.mark.parametrize("args, device", [
    ({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, "cuda:1"),
    ({"model_instance_kind": "GPU", "model_instance_device_id": "0"}, "cuda:0"),
    ({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, "cpu"),
])
def test_instance_device(args, device):
    assert placement.instance_device(args) == device


@pytest.fixture
def torch_encoder_backend(monkeypatch):
    """backends/torch_encoder/model.py imported outside Triton (its pb_utils module stubbed)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("torch_encoder_model", PROJECT_BACKENDS / "torch_encoder" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_encoder_binds_its_instance_device(torch_encoder_backend, monkeypatch):
    import torch

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert str(torch_encoder_backend.bind_device(args)) == placement.instance_device(args) == "cuda:1"
    assert made_current == [torch.device("cuda", 1)]  # graphs, streams and pools on GPU 1, not GPU 0
    cpu = {"model_instance_kind": "CPU", "model_instance_device_id": "0"}
    assert str(torch_encoder_backend.bind_device(cpu)) == placement.instance_device(cpu) == "cpu"
    assert len(made_current) == 1


# ---- doctor: per-GPU memory and what each instance will hold

SMI = "0, NVIDIA H200, 9.0, 143771, 1024\n1, NVIDIA H200, 9.0, 143771, 512\n"


def test_doctor_parses_nvidia_smi():
    assert doctor.parse_smi(SMI) == [doctor.Gpu(0, "NVIDIA H200", "9.0", 143771, 1024),
                                     doctor.Gpu(1, "NVIDIA H200", "9.0", 143771, 512)]
    assert doctor.parse_smi("0, Some GPU, 8.6, [N/A], [N/A]\n") == [doctor.Gpu(0, "Some GPU", "8.6", 0, 0)]


def test_doctor_reads_a_fake_nvidia_smi_on_path(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{SMI.replace(chr(10), chr(92) + 'n')}'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert [g.free_mib for g in doctor.gpu_info()] == [142747, 143259]
    assert doctor.gpus() == [("NVIDIA H200", "9.0"), ("NVIDIA H200", "9.0")]


def write_model(repo, name, groups_, weight_mib=0, params=None):
    d = repo / name
    (d / "1").mkdir(parents=True)
    if weight_mib:
        (d / "1" / "model.onnx").write_bytes(b"\0" * (weight_mib << 20))
    cfg = mc.ModelConfig(name=name, backend="onnxruntime", instance_group=groups_)
    for k, v in (params or {}).items():
        cfg.parameters[k].string_value = v
    pbtxt.write(cfg, d)


def test_doctor_reports_each_gpus_instances(tmp_path):
    write_model(tmp_path, "enc", placement.gpu_groups((0, 1), 2), weight_mib=2)
    write_model(tmp_path, "llm", placement.llm_instance_groups((0, 1)), weight_mib=1,
                params={"kv_cache_memory_fraction": "0.85"})
    write_model(tmp_path, "tok", placement.instance_groups(None, 1))
    gpus = doctor.parse_smi(SMI)
    c = doctor.check_placement(tmp_path, gpus)
    assert c.ok and not c.info_only, c.detail
    lines = c.detail.splitlines()
    assert lines == [
        "CPU: tok x1",
        "GPU 0: enc x2 (weights 2 MiB each), llm x1 (weights 1 MiB + KV cache up to 85% of GPU 0 less weights each)",
        "GPU 1: enc x2 (weights 2 MiB each), llm x1 (weights 1 MiB + KV cache up to 85% of GPU 1 less weights each)",
    ]
    gpu = doctor.check_gpu(tmp_path, gpus)
    assert gpu.ok and "GPU 1 NVIDIA H200 (sm 9.0): 143771 MiB, 512 MiB in use, 143259 MiB free" in gpu.detail


def test_doctor_fails_a_placement_this_host_cannot_hold(tmp_path):
    write_model(tmp_path, "llm", placement.gpu_groups((0,), 2), params={"kv_cache_memory_fraction": "0.85"})
    c = doctor.check_placement(tmp_path, doctor.parse_smi(SMI)[:1])
    assert not c.ok and "GPU 0: its instances need about" in c.detail and "--gpus" in c.fix  # two engines at 85% each
    write_model(tmp_path, "enc", placement.gpu_groups((1,), 1))
    c = doctor.check_placement(tmp_path, doctor.parse_smi(SMI)[:1])
    assert not c.ok and "wants GPU(s) [1], 1 visible" in c.detail


def test_doctor_on_a_cpu_host_says_no_gpu(tmp_path):
    write_model(tmp_path, "enc", placement.instance_groups(None, 2), weight_mib=1)
    assert doctor.check_gpu(tmp_path, []).detail.startswith("no GPU")
    c = doctor.check_placement(tmp_path, [])
    assert c.ok and c.info_only and c.detail == "CPU: enc x2 (weights 1 MiB each)"
