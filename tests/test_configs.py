"""Every committed config.pbtxt parses; the encoder ones equal what export/encoder_config.py generates
(so regenerating changes nothing), including the warmup files they reference."""
from __future__ import annotations

import pytest

from export import encoder, pbtxt
from export.encoder_config import encoder_config, up_to_date
from export.specs import ENCODERS
from serve.paths import MODEL_REPOSITORY

MODEL_DIRS = sorted(d for d in MODEL_REPOSITORY.iterdir() if (d / "config.pbtxt").is_file())


def encoder_variant(name: str):
    """(spec, precision) when `name` is an ONNX variant of a spec'd encoder, else None."""
    for spec in ENCODERS.values():
        precision = spec.precision_of(name)
        if precision is not None:
            return spec, precision
    return None


def test_repository_has_the_default_encoder_variants():
    names = {d.name for d in MODEL_DIRS}
    spec = ENCODERS["minilm"]
    assert {spec.variant_name(p) for p in encoder.DEFAULT_PRECISIONS} <= names


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda d: d.name)
def test_config_parses_and_names_its_dir(model_dir):
    text = (model_dir / "config.pbtxt").read_text()
    config = pbtxt.parse(text)
    assert config.name == model_dir.name
    assert config.backend or config.platform, "a config must say which backend serves it"
    for warm in config.model_warmup:  # files referenced by warmup requests must ship with the config
        for inp in warm.inputs.values():
            if inp.WhichOneof("input_data_type") == "input_data_file":
                assert (model_dir / "warmup" / inp.input_data_file).is_file()


@pytest.mark.parametrize("model_dir", [d for d in MODEL_DIRS if encoder_variant(d.name)], ids=lambda d: d.name)
def test_encoder_config_equals_regeneration(model_dir):
    spec, precision = encoder_variant(model_dir.name)
    expected = encoder_config(spec, model_dir.name, filename=encoder.ONNX_FILE)
    assert (model_dir / "config.pbtxt").read_text() == pbtxt.to_text(expected)
    assert up_to_date(expected, spec, model_dir)
    assert expected.backend == "onnxruntime"
