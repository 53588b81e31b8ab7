"""The LLM export and engine settings: the model directory's layout and freshness, the random-weight
checkpoint and its tokenizer, settings round trips and errors that name the key."""
from __future__ import annotations

import pytest

from export.random_llm import write_random_checkpoint
from llm.settings import EngineSettings, parse_overrides


def test_settings_round_trip_and_errors_name_the_key():
    s = EngineSettings(max_seqs=3, cuda_graphs=False, metrics_interval_s=0.5)
    assert EngineSettings.from_parameters(s.to_parameters()) == s
    with pytest.raises(ValueError, match="unknown engine parameters"):
        EngineSettings.from_parameters({"max_seq": "3"})
    with pytest.raises(ValueError, match="block_size"):
        EngineSettings(block_size=12)
    with pytest.raises(ValueError, match="step_token_budget"):
        EngineSettings(max_seqs=64, step_token_budget=32)
    with pytest.raises(ValueError, match="cuda_graphs='maybe'"):
        EngineSettings.from_parameters({"cuda_graphs": "maybe"})
    assert parse_overrides(["max_seqs=8", "overlap=false"]) == {"max_seqs": 8, "overlap": False}
    with pytest.raises(ValueError, match="--set max_slots: unknown engine setting"):
        parse_overrides(["max_slots=8"])


def test_settings_from_config_resolves_the_checkpoint(tmp_path):
    from export.llm import export_default

    model_dir = export_default(repository=tmp_path)
    s = EngineSettings.from_config(model_dir)
    assert s.checkpoint == str(model_dir / "1" / "checkpoint") and s.max_seqs == 32


def test_tiny_checkpoint_tokenizer_matches_model(checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    from clients.chat import render

    tok, cfg = AutoTokenizer.from_pretrained(checkpoint), AutoConfig.from_pretrained(checkpoint)
    assert len(tok) == cfg.vocab_size == 1024
    ids = tok("Hello 🙂")["input_ids"]
    assert ids[0] == tok.bos_token_id == cfg.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 🙂"  # byte-level: every string round-trips
    assert tok.eos_token_id == cfg.eos_token_id
    text = render([{"role": "user", "content": "Hi"}], tok)
    assert text == "<|user|>\nHi<|end_of_text|>\n<|assistant|>\n"


def test_random_checkpoint_is_deterministic(checkpoint, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", "tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name


def test_export_layout_and_up_to_date(tmp_path):
    from export import pbtxt
    from export.llm import DEFAULT_NAME, export_default, is_up_to_date

    model_dir = export_default(repository=tmp_path)
    config = pbtxt.read(model_dir)
    assert config.backend == "llm" and config.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in config.parameters.items()}
    settings = EngineSettings.from_parameters(params)  # every parameter is a known engine setting
    assert (settings.max_seqs, settings.max_context) == (32, 512)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["checkpoint"]  # the engine is the backend
    for rel in params["required_artifacts"].split(","):
        assert (model_dir / rel).exists(), rel
    assert is_up_to_date(model_dir, config)
    (model_dir / "1" / "llm").mkdir()  # a stale engine copy of an older export
    assert not is_up_to_date(model_dir, config)
    export_default(repository=tmp_path)
    assert not (model_dir / "1" / "llm").exists() and is_up_to_date(model_dir, config)
    assert model_dir.name == DEFAULT_NAME
