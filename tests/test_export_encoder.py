"""Unit tests of the encoder export (no server): spec -> axes/names/configs, validation, goldens, and a
real export of a tiny random BERT through the same code path as MiniLM."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import calibration, encoder, golden, pbtxt
from export.encoder_config import encoder_config, up_to_date, warmup_data, write_model_dir
from export.onnx_export import dynamic_axes
from export.specs import MINILM, Tensor, Tolerance
from export.validate import ValidationError, compare, random_feed, session, validate_onnx


def test_dynamic_axes_from_spec():
    both = {0: "batch", 1: "sequence"}
    assert dynamic_axes(MINILM) == {"input_ids": both, "attention_mask": both, "token_type_ids": both,
                                    "last_hidden_state": both}


def test_variant_names_and_inverse():
    assert [MINILM.variant_name(p) for p in encoder.PRECISIONS] == [
        "minilm", "minilm_fp16", "minilm_int8_dynamic", "minilm_int8"]
    assert all(MINILM.precision_of(MINILM.variant_name(p)) == p for p in encoder.PRECISIONS)
    assert MINILM.precision_of("minilm_text") is None
    with pytest.raises(AssertionError, match="unknown precision"):
        MINILM.variant_name("int4")


def test_encoder_config_fields():
    cfg = encoder_config(MINILM, "minilm")
    assert (cfg.name, cfg.backend, cfg.platform, cfg.max_batch_size) == ("minilm", "onnxruntime", "", 64)
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1]), ("token_type_ids", "TYPE_INT64", [-1])]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == [
        ("last_hidden_state", "TYPE_FP32", [-1, 384])]
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, MINILM.cpu_instances)]
    db = cfg.dynamic_batching
    assert (db.max_queue_delay_microseconds, list(db.preferred_batch_size)) == (500, [8, 16, 32, 64])
    assert (db.default_queue_policy.max_queue_size, db.default_queue_policy.default_timeout_microseconds) == (256, 5_000_000)
    assert cfg.version_policy.latest.num_versions == 1
    gpu = encoder_config(MINILM, "minilm", gpu=True, instances=2)
    assert [(g.kind, g.count) for g in gpu.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    with pytest.raises(AssertionError, match="instances"):
        encoder_config(MINILM, "minilm", instances=0)


def test_tensorrt_config_differs_only_in_platform_and_file():
    onnx_cfg = encoder_config(MINILM, "m")
    trt_cfg = encoder_config(MINILM, "m", backend="", platform="tensorrt_plan", filename="model.plan")
    for f in ("backend", "platform", "default_model_filename"):
        onnx_cfg.ClearField(f)
        trt_cfg.ClearField(f)
    assert onnx_cfg == trt_cfg


def test_warmup_inputs_are_valid_model_inputs():
    cfg = encoder_config(MINILM, "minilm")
    seq = MINILM.axes["sequence"].opt
    assert [w.batch_size for w in cfg.model_warmup] == [1, MINILM.axes["batch"].opt]
    data = warmup_data(MINILM)
    assert set(data) == {"input_ids", "attention_mask"}
    assert data["input_ids"].dtype == np.int64 and data["input_ids"].shape == (seq,)
    assert 0 <= data["input_ids"].min() and data["input_ids"].max() < MINILM.vocab_size
    assert (data["attention_mask"] == 1).all()
    for w in cfg.model_warmup:
        assert set(w.inputs) == {t.name for t in MINILM.inputs}
        for name, inp in w.inputs.items():
            assert list(inp.dims) == [seq]
            assert inp.WhichOneof("input_data_type") == ("input_data_file" if name in data else "zero_data")


def test_write_model_dir_and_up_to_date(tmp_path):
    cfg = encoder_config(MINILM, "minilm")
    write_model_dir(cfg, MINILM, tmp_path / "minilm")
    assert pbtxt.read(tmp_path / "minilm") == cfg
    raw = (tmp_path / "minilm" / "warmup" / "input_ids").read_bytes()
    assert np.array_equal(np.frombuffer(raw, np.int64), warmup_data(MINILM)["input_ids"])
    assert up_to_date(cfg, MINILM, tmp_path / "minilm")
    assert not up_to_date(encoder_config(MINILM, "minilm", instances=3), MINILM, tmp_path / "minilm")
    (tmp_path / "minilm" / "warmup" / "attention_mask").write_bytes(np.zeros(32, np.int64).tobytes())
    assert not up_to_date(cfg, MINILM, tmp_path / "minilm")


def test_compare_metrics_and_mask():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = ref.copy()
    got[0, 4] += 100.0  # a padded position: ignored
    m = compare("h", got, ref, mask)
    assert m.max_abs == 0.0 and m.min_cosine == pytest.approx(1.0)
    got[1, 0, 0] += 0.5  # a valid position: counted
    assert compare("h", got, ref, mask).max_abs == pytest.approx(0.5)
    assert compare("h", -ref, ref, mask).min_cosine == pytest.approx(-1.0)
    with pytest.raises(AssertionError, match="shape"):
        compare("h", ref[:1], ref, mask)
    with pytest.raises(AssertionError, match="non-finite"):
        compare("h", np.full_like(ref, np.nan), ref, mask)


def test_random_feed_is_valid_and_ragged():
    feed = random_feed(MINILM, 6, 20, 1000, seed=3)
    assert list(feed) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(v.dtype == np.int64 and v.shape == (6, 20) for v in feed.values())
    assert feed["input_ids"].max() < 1000 and feed["input_ids"].min() >= 0
    lengths = feed["attention_mask"].sum(1)
    assert lengths[0] == 20 and lengths.min() >= 1 and len(set(lengths.tolist())) > 1
    assert (feed["input_ids"][feed["attention_mask"] == 0] == 0).all()  # padding id
    assert (feed["token_type_ids"][feed["attention_mask"] == 0] == 0).all()


def test_sentences_are_deterministic_and_varied():
    a = calibration.sentences(300, seed=1)
    assert a == calibration.sentences(300, seed=1) and a != calibration.sentences(300, seed=2)
    assert len(set(a)) > 150
    assert any(not s.isascii() for s in a)
    lengths = sorted(len(s.split()) for s in a)
    assert lengths[0] <= 2 and lengths[-1] >= 100  # fragments and texts longer than 128 tokens


# ---------------------------------------------------------------- tiny BERT through the real path

TINY = dataclasses.replace(
    MINILM, name="tiny", hidden_size=32, vocab_size=1000,
    outputs=(Tensor("last_hidden_state", "FP32", ("sequence", 32)),),
)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("tiny")
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=MINILM.max_seq_len)
    transformers.set_seed(0)
    transformers.BertModel(cfg).save_pretrained(root / "hf")
    stamps = root / "stamps"
    encoder.STAMP_DIR, saved = stamps, encoder.STAMP_DIR
    try:
        results = encoder.export_encoder(TINY, ("fp32", "int8_dynamic"), source=root / "hf", out_repo=root / "repo",
                                         golden_dir=root / "golden")
        again = encoder.export_encoder(TINY, ("fp32", "int8_dynamic"), source=root / "hf", out_repo=root / "repo",
                                       golden_dir=root / "golden")
    finally:
        encoder.STAMP_DIR = saved
    return root, results, again


def test_tiny_export_writes_variants(tiny_export):
    root, results, _ = tiny_export
    assert [(r.name, r.precision, r.skipped) for r in results] == [
        ("tiny", "fp32", False), ("tiny_int8_dynamic", "int8_dynamic", False)]
    for r in results:
        model = onnx.load(str(root / "repo" / r.name / "1" / "model.onnx"))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == TINY.opset
        ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert ins == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                       "token_type_ids": ["batch", "sequence"]}
        out = model.graph.output[0]
        assert (out.name, out.type.tensor_type.elem_type) == ("last_hidden_state", onnx.TensorProto.FLOAT)
        assert pbtxt.read(root / "repo" / r.name) == encoder_config(TINY, r.name)
        assert r.metrics[0].min_cosine >= TINY.tolerances[r.precision].min_cosine
    int8 = onnx.load(str(root / "repo" / "tiny_int8_dynamic" / "1" / "model.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in int8.graph.node)


def test_tiny_export_is_idempotent(tiny_export):
    _, _, again = tiny_export
    assert [(r.name, r.skipped) for r in again] == [("tiny", True), ("tiny_int8_dynamic", True)]


def test_golden_roundtrip_and_check(tiny_export):
    root, _, _ = tiny_export
    g = golden.load(golden.path_for("tiny_int8_dynamic", root / "golden"))
    assert (g.model, g.precision, g.tolerance) == ("tiny_int8_dynamic", "int8_dynamic", TINY.tolerances["int8_dynamic"])
    assert set(g.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert g.inputs["input_ids"].shape == golden.GOLDEN_SHAPE
    assert g.reference["last_hidden_state"].shape == (*golden.GOLDEN_SHAPE, 32)
    # replaying the inputs through the model reproduces the stored outputs and passes the check
    sess = session(root / "repo" / "tiny_int8_dynamic" / "1" / "model.onnx")
    out = sess.run(["last_hidden_state"], g.inputs)[0]
    np.testing.assert_allclose(out, g.onnxruntime["last_hidden_state"], atol=1e-5)
    g.check({"last_hidden_state": out})
    with pytest.raises(ValidationError, match="min_cos"):
        g.check({"last_hidden_state": np.random.default_rng(0).normal(size=out.shape).astype(np.float32)})
    with pytest.raises(AssertionError, match="missing"):
        g.check({"embedding": out})


def test_validation_raises_on_tight_tolerance(tiny_export):
    import transformers

    root, _, _ = tiny_export
    model = transformers.AutoModel.from_pretrained(root / "hf", attn_implementation="eager").eval()
    strict = dataclasses.replace(TINY, tolerances={"int8_dynamic": Tolerance(max_abs=1e-7, min_cosine=0.9999999)})
    with pytest.raises(ValidationError, match=r"max_abs=.*min_cos="):
        validate_onnx(root / "repo" / "tiny_int8_dynamic" / "1" / "model.onnx", model, strict, "int8_dynamic", 1000)


def test_validation_raises_on_corrupted_model(tiny_export, tmp_path):
    import transformers

    root, _, _ = tiny_export
    model = onnx.load(str(root / "repo" / "tiny" / "1" / "model.onnx"))
    w = next(i for i in model.graph.initializer if i.name.endswith("LayerNorm.weight"))
    arr = onnx.numpy_helper.to_array(w) * 3.0  # a wrong LayerNorm scale: graph still runs
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    hf = transformers.AutoModel.from_pretrained(root / "hf", attn_implementation="eager").eval()
    with pytest.raises(ValidationError, match="outside tolerance"):
        validate_onnx(tmp_path / "bad.onnx", hf, TINY, "fp32", 1000)


def test_export_rejects_spec_mismatch(tiny_export, tmp_path):
    root, _, _ = tiny_export
    with pytest.raises(AssertionError, match="hidden_size"):
        encoder.export_encoder(MINILM, ("fp32",), source=root / "hf", out_repo=tmp_path / "repo",
                               golden_dir=tmp_path / "golden", force=True)
