"""The in-process benchmark core shared by `python -m llm.bench` and bench/engine_inproc.py."""
from __future__ import annotations

import pytest

from llm.bench import bench, per_token_gaps
from llm.engine import Engine
from llm.settings import EngineSettings
from serve.paths import MODEL_REPOSITORY


def test_coalesced_responses_count_one_gap_per_token():
    # Two responses 0.8 s apart carrying 4 new tokens: four gaps of 0.2 s; a repeated count adds none.
    assert per_token_gaps([[0.0, 0.8, 0.9]], [[1, 5, 5]]) == pytest.approx([0.2] * 4)


@pytest.mark.parametrize("started", [False, True])
def test_bench_generates_exactly_osl_tokens_per_stream(started):
    checkpoint = MODEL_REPOSITORY / "tiny_llama" / "1" / "checkpoint"
    engine = Engine(EngineSettings.from_parameters({"stream_interval": "3"}, checkpoint=str(checkpoint)), device="cpu")
    if started:
        engine.start()
    try:
        r = bench(engine, concurrency=3, isl=6, osl=7)
    finally:
        if started:
            engine.stop()
    assert r["output_tokens"] == 21 and r["output_tokens_per_s"] > 0
    assert r["itl_p50_ms"] > 0 and r["ttft_p50_ms"] > 0
