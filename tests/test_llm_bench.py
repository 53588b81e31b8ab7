"""The in-process benchmark (bench/engine_inproc.py) and the workloads (bench/workloads.py)."""
from __future__ import annotations

import pytest

from bench.engine_inproc import closed_loop, idle_ttft, idle_ttft_trace, per_token_gaps, prefill_step
from bench.host_work import host_phases, host_profile
from bench.workloads import chat_lengths, lengths, parse_workload, requests_for
from llm.engine import Engine
from llm.settings import EngineSettings
from serve.paths import MODEL_REPOSITORY


def test_coalesced_responses_count_one_gap_per_token():
    # Two responses 0.8 s apart carrying 4 new tokens: four gaps of 0.2 s; a repeated count adds none.
    assert per_token_gaps([[0.0, 0.8, 0.9]], [[1, 5, 5]]) == pytest.approx([0.2] * 4)


def test_chat_workload_is_seeded_and_shaped_like_chat():
    a, b = chat_lengths(500), chat_lengths(500)
    assert a == b and chat_lengths(500, seed=1) != a
    isl = sorted(i for i, _ in a)
    osl = sorted(o for _, o in a)
    assert 150 < isl[250] < 400 and isl[-1] <= 2048 and isl[0] >= 16  # median ~256, long tail
    assert 80 < osl[250] < 200 and osl[-1] <= 512
    assert parse_workload("128:256") == (128, 256) and lengths((128, 256), 3) == [(128, 256)] * 3
    assert requests_for(64) == 256 and requests_for(1) == 16


@pytest.fixture(scope="module")
def engine():
    checkpoint = MODEL_REPOSITORY / "tiny_llama" / "1" / "checkpoint"
    e = Engine(EngineSettings(checkpoint=str(checkpoint), max_seqs=4, step_token_budget=64, stream_interval=3,
                              cpu_threads=1), device="cpu")
    e.start()
    yield e
    e.stop()


@pytest.mark.parametrize("workload, temperature", [((6, 7), 0.0), ("chat", 0.0), ((6, 7), 0.7)])
def test_closed_loop_generates_exactly_the_requested_tokens(engine, workload, temperature):
    r = closed_loop(engine, workload, concurrency=3, n_requests=9, temperature=temperature)
    expected = sum(o for _, o in lengths(workload, 9 + 3)[3:])
    assert r["requests"] == 9 and r["output_tokens"] == expected and r["tokens_per_s"] > 0
    assert r["temperature"] == temperature
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
    assert r["steps"] > 0 and r["host_ms_per_step"] > 0


def test_idle_ttft_is_a_median_of_single_requests(engine):
    r = idle_ttft(engine, 12, n=5)
    assert r["n"] == 5 and 0 < r["ttft_min_s"] <= r["ttft_p50_s"]


def test_idle_ttft_trace_shows_the_prefill_forward_and_leaves_the_engine_as_it_was(engine):
    traces = idle_ttft_trace(engine, 40, n=2)
    for t in traces:
        forward = [c for c in t["calls"] if c["call"] == "forward"]
        assert forward[0]["tokens"] == 40 and 0 <= forward[0]["host_ms"][0] <= forward[0]["host_ms"][1] <= t["ttft_ms"]
    assert "forward" not in vars(engine.runner) and "_process" not in vars(engine)  # the wrappers are gone
    assert idle_ttft(engine, 12, n=1)["n"] == 1


def test_host_profile_names_the_engine_threads_functions_and_unwraps_step(engine):
    r = host_profile(engine, (6, 7), concurrency=2, top=500)
    assert r["concurrency"] == 2 and r["steps"] > 0 and r["profiled_host_ms_per_step"] > 0
    assert "_process" in r["table"] and "schedule" in r["table"]  # profiled on the engine thread
    assert "step" not in vars(engine)  # the class's step again


def test_host_phases_split_each_step_by_kind_and_part_and_unwrap(engine):
    r = host_phases(engine, (6, 7), concurrency=2)
    decode, mixed = r["kinds"]["decode"], r["kinds"]["mixed"]
    # 10 requests (a warm-up wave of 2, then 8): each one prompt step and six decode-only steps
    assert mixed["steps"] >= 5 and decode["steps"] >= 30 and decode["steps"] > 3 * mixed["steps"]
    assert r["all"]["steps"] == sum(k["steps"] for k in r["kinds"].values())
    for k in (decode, mixed):
        parts = [k[p] for p in ("schedule_ms", "forward_ms", "sample_ms", "launch_other_ms", "process_ms")]
        assert min(parts) >= 0 and k["forward_ms"] > 0 and k["step_other_ms"] >= 0
        assert sum(parts) + k["step_other_ms"] == pytest.approx(k["host_ms"])
    assert mixed["forward_ms"] > decode["forward_ms"]  # a prompt chunk costs more than one token a row
    assert not {"step", "_launch", "_sample", "_process"} & set(vars(engine))  # the wrappers are gone
    assert "forward" not in vars(engine.runner) and "schedule" not in vars(engine.scheduler)


def test_prefill_ab_alternates_the_variants_hits_the_cache_on_the_rerun_and_restores_grouping(engine):
    from bench.host_work import prefill_ab
    from llm import attention

    grouped, calls = attention.group_prefill, []
    hits = []

    def counting(specs, bs):
        calls.append(len(specs))
        return grouped(specs, bs)
    attention.group_prefill = counting
    try:
        sched = engine.scheduler
        before = sched.prefix_hit
        out = prefill_ab(engine, (40, 3), concurrency=2, repeats=1)
        hits.append(sched.prefix_hit - before)
    finally:
        attention.group_prefill = grouped
    assert [(r["variant"], r["prompts"]) for r in out] == [
        ("alone", "fresh"), ("alone", "cached"), ("grouped", "fresh"), ("grouped", "cached")]
    assert calls, "the grouped variant went through group_prefill"
    assert hits[0] > 0 and all(r["loop"]["tokens_per_s"] > 0 for r in out)
    assert out[0]["seed"] == out[1]["seed"] != out[2]["seed"] == out[3]["seed"]


@pytest.mark.parametrize("cached", [0, 16])
def test_prefill_step_times_a_chunk_after_a_cached_prefix(engine, cached):
    free = engine.pool.num_free
    r = prefill_step(engine, 48, cached, steps=2, gap_s=0.0)
    assert (r["tokens"], r["cached"], r["steps"]) == (48, cached, 2) and 0 < r["step_min_s"] <= r["step_p50_s"]
    assert engine.pool.num_free == free  # its blocks are given back


def test_ready_time_starts_the_server_twice_on_one_cache_and_serves_each_time(tmp_path):
    import os

    from bench.ready_time import run

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    out = run("tiny", encoder=False, starts=2, device="cpu", work=tmp_path)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before  # the caller's environment is restored
    starts = out["models"]["tiny"]["starts"]
    assert [s["start"] for s in starts] == [1, 2]
    assert all(s["ready_s"] > 0 and s["first_request_s"] > 0 and s["ttft_s"] > 0 for s in starts)
    assert starts[0]["cache_mib_before"] == 0.0 and starts[0]["cache"] == "cold"  # a new, empty cache


def test_host_work_bench_times_decode_steps_through_the_graph_path():
    from bench.host_work import run

    out = run([2], osl=8, repeats=1)
    (level,) = out["levels"]
    assert level["concurrency"] == 2 and 0 < level["host_ms_per_decode_step"] < 100
    assert 0 < level["argmax_ms"] < level["host_ms_per_decode_step"]  # the sampler's argmax is part of it
    assert out["stream_interval"] == 8  # as the GPU benchmarks stream
