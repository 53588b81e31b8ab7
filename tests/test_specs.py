"""The spec table is self-consistent: every name the other parts derive from it resolves."""
from __future__ import annotations

import pytest

from export.specs import ENCODERS, MINILM, VARIANT_SUFFIX, Axis, Tolerance


@pytest.mark.parametrize("spec", ENCODERS.values(), ids=lambda s: s.name)
def test_encoder_spec_consistent(spec):
    assert spec.max_seq_len == spec.axes["sequence"].max
    assert spec.max_batch_size == spec.axes["batch"].max
    for t in spec.inputs + spec.outputs:
        assert all(d in spec.axes for d in t.dims if isinstance(d, str)), t
    assert spec.outputs[0].dims[-1] == spec.hidden_size
    assert set(spec.tolerances) == set(VARIANT_SUFFIX)
    names = [spec.variant_name(p) for p in VARIANT_SUFFIX]
    assert len(set(names)) == len(names)
    # lower precision never gets a stricter bound than a higher one
    tol = spec.tolerances
    assert tol["fp32"].max_abs <= tol["fp16"].max_abs <= tol["int8_static"].max_abs
    assert tol["fp32"].min_cosine >= tol["fp16"].min_cosine >= tol["int8_static"].min_cosine
    assert spec.opset >= 17  # native LayerNormalization


def test_minilm_io_contract():
    assert [(t.name, t.dtype, t.dims) for t in MINILM.inputs] == [
        ("input_ids", "INT64", ("sequence",)), ("attention_mask", "INT64", ("sequence",)),
        ("token_type_ids", "INT64", ("sequence",))]
    assert [(t.name, t.dtype, t.dims) for t in MINILM.outputs] == [("last_hidden_state", "FP32", ("sequence", 384))]


def test_axis_and_tolerance_records():
    with pytest.raises(AssertionError):
        Axis(4, 2, 8)
    assert Tolerance(1e-4, 0.9999) == Tolerance(max_abs=1e-4, min_cosine=0.9999)
