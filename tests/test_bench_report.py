"""bench/report.py: benchmark JSON -> markdown targets table + PNG plots, from a sample JSON."""
from __future__ import annotations

import json
import math

import pytest

from bench import report
from bench.baseline_hf import percentile


def level(isl, c, tps, ttft, itl, tpot):
    return {"isl": isl, "osl": 256, "concurrency": c, "requests": c, "output_tokens": 256 * c, "wall_s": 1.0,
            "tokens_per_s": tps, "ttft_p50_s": ttft, "ttft_p99_s": ttft * 2, "itl_p50_s": itl, "itl_p99_s": itl * 2,
            "tpot_p50_s": tpot}


SAMPLE = {
    "versions": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "transformers": "5.17.0",
                 "python": "3.12.3", "numpy": "1.26.4", "cuda": "13.0", "driver": "580", "tritonserver": "2.51"},
    "started": "2026-11-22T05:00:00Z", "finished": "2026-11-22T05:05:00Z",
    "copy_bandwidth": {"bytes": 2**31, "median_s": 0.00143, "bandwidth_Bps": 3.0e12},
    "shapes": {
        "llama-3.1-8b": {
            "triton": {"levels": [level(128, 1, 100.0, 0.05, 0.0099, 0.005),  # 1/TPOT = 200 tok/s: met
                                  level(128, 64, 6000.0, 0.9, 0.0122, 0.0125)  # 6000 < 7000: missed
                                  | {"engine_host_ms_per_step": 3.2, "engine_idle_ms_per_step": 0.04},
                                  level(2048, 64, 800.0, 8.0, 0.02, 0.04)],
                       "ttft_idle": [{"isl": 128, "ttft_p50_s": 0.012}, {"isl": 2048, "ttft_p50_s": 0.149}],
                       "gpu_mem_idle_mib": 56000, "gpu_mem_peak_mib": 62000, "export_s": 20.0, "server_ready_s": 17.0},
            "inproc": {"levels": [{"engine": "ours-inproc", "isl": 128, "osl": 256, "concurrency": 64,
                                   "tokens_per_s": 6250.0, "ttft_p50_s": 0.8, "itl_p50_s": 0.012}]},
            "hf_naive": {"isl": 128, "osl": 256, "ttft_s": 0.06, "total_s": 8.0, "tokens_per_s": 32.0,
                         "decode_tokens_per_s": 32.1},
            "roofline": {"shape": "llama-3.1-8b", "tokens_per_s": 199.5, "bytes_per_token": 15043403776},
        },
        "tinyllama-1.1b": {"triton_error": "RuntimeError('boom')"},
    },
}


def rows_by_target(md: str) -> dict[str, str]:
    out = {}
    section = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("llama-3.1-8b", "tinyllama-1.1b"):
            out[f"{cells[0]}: {cells[1]}"] = line
    return out


@pytest.fixture
def rendered(tmp_path):
    path = tmp_path / "llm_bench.json"
    path.write_text(json.dumps(SAMPLE))
    report.main([str(path), "--out-dir", str(tmp_path)])
    return (tmp_path / "report.md").read_text(), tmp_path


def test_each_target_has_its_figure_and_verdict(rendered):
    md, _ = rendered
    rows = rows_by_target(md)
    assert len(rows) == len(report.TARGETS)
    assert "| 200.0 tok/s | Triton | **missed** |" in rows["llama-3.1-8b: batch-1 decode (1 / TPOT), 128/256"]
    assert "| 6,000.0 tok/s | Triton | **missed** |" in rows["llama-3.1-8b: 64 streams output throughput, 128/256"]
    assert "| 12.2 ms | Triton | **missed** |" in rows["llama-3.1-8b: 64 streams p50 inter-token latency, 128/256"]
    assert "| 12.0 ms | Triton | **met** |" in rows["llama-3.1-8b: TTFT idle server, 128-token prompt (median of 20)"]
    assert "| 149.0 ms | Triton | **missed** |" in rows["llama-3.1-8b: TTFT idle server, 2048-token prompt (median of 20)"]
    assert "| 8,000.0 ms | Triton | **missed** |" in rows["llama-3.1-8b: 64 streams TTFT p50, 2048/256"]
    host = rows["llama-3.1-8b: 64 streams host time on the critical path per step (GPU idle between steps), 128/256"]
    assert "| ≤ 0.3 ms | 0.04 ms | Triton (all host work: 3.20 ms/step) | **met** |" in host
    # No TinyLlama data: reported as not measured, never as met.
    assert "n/a (not measured)" in rows["tinyllama-1.1b: batch-1 decode (1 / TPOT), 128/256"]


def test_in_process_figures_fill_targets_the_triton_run_lacks(tmp_path):
    path = tmp_path / "llm_bench.json"
    path.write_text(json.dumps(SAMPLE))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"shape": "tinyllama-1.1b", "levels": [
        {"workload": "128:256", "concurrency": 1, "requests": 16, "tokens_per_s": 400.0, "ttft_p50_s": 0.01,
         "ttft_p99_s": 0.02, "itl_p50_s": 0.0025, "itl_p99_s": 0.003}]}))
    long8k = tmp_path / "8k.json"
    long8k.write_text(json.dumps({"shape": "llama-3.1-8b", "levels": [
        {"workload": "7680:256", "concurrency": 64, "requests": 64, "failed": 0, "preemptions": 12,
         "tokens_per_s": 900.0, "ttft_p50_s": 5.0, "ttft_p99_s": 9.0, "itl_p50_s": 0.02, "itl_p99_s": 0.05}]}))
    report.main([str(path), "--out-dir", str(tmp_path), "--experiment", f"tiny={tiny}", f"8k 40GiB={long8k}"])
    rows = rows_by_target((tmp_path / "report.md").read_text())
    assert "| 400.0 tok/s | in process (1 / ITL p50) | **missed** |" in rows["tinyllama-1.1b: batch-1 decode (1 / TPOT), 128/256"]
    assert "in process, 64 requests, 12 preemptions | **met** |" in \
        rows["llama-3.1-8b: 64 streams at 8k context within a 40 GiB KV budget: requests failed"]


def test_header_names_gpu_and_versions_and_errors(rendered):
    md, _ = rendered
    assert "GPU: **NVIDIA H100 80GB HBM3**" in md and "torch 2.11.0+cu130" in md and "transformers 5.17.0" in md
    assert "3.00 TB/s" in md
    assert "**triton_error**: `RuntimeError('boom')`" in md
    assert "| llama-3.1-8b | roofline (copy bandwidth / bytes per token) | 1 | 199.5 |" in md
    assert "| 2048:256 | 64 | 64 | 800.0 | 8,000.0 |" in md


def test_plots_are_written_and_linked(rendered):
    md, out = rendered
    for png in ("llm_throughput.png", "llm_ttft.png", "llm_itl.png", "llm_batch1.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"![{png}]({png})" in md


def test_target_verdicts():
    t = report.Target("x", "m", "ms", 10, higher_is_better=False)
    assert t.passed(10.0) is True and t.passed(10.01) is False
    assert t.passed(None) is None and t.passed(math.nan) is None
    assert report.Target("y", "m", "tok/s", 160, True).passed(159.9) is False


def test_percentile_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert math.isnan(percentile([], 50))


def test_encoder_target_row(tmp_path):
    enc = {"best_128": 49999.0, "levels": [{"seq_len": 128, "concurrency": 4, "batch": 256,
                                            "sentences_per_s": 49999.0, "p50_s": 0.02, "p99_s": 0.03}]}
    md = report.render(SAMPLE, encoder=enc)
    assert "| MiniLM-L6 encoder | sentences/s at sequence length 128, through Triton (perf_analyzer, gRPC) | " \
           "≥ 50,000 /s | 49,999 /s | **missed** |" in md
    assert "| 128 | 4 | 256 | 49,999.0 | 20.00 | 30.00 |" in md


def test_warm_ready_time_target_reads_a_ready_time_run():
    ready = {"models": {"llama_3_1_8b": {"starts": [
        {"start": 1, "cache": "cold", "cache_mib_before": 0.0, "ready_s": 95.0, "first_request_s": 0.1},
        {"start": 2, "cache": "warm", "cache_mib_before": 14.0, "ready_s": 24.0, "first_request_s": 0.1},
        {"start": 3, "cache": "warm", "cache_mib_before": 14.0, "ready_s": 70.0, "first_request_s": 0.1},
        {"start": 4, "cache": "warm", "cache_mib_before": 14.0, "ready_s": 30.0, "first_request_s": 0.1}]}}}
    target = next(t for t in report.TARGETS if t.name.startswith("server ready"))
    value, source = report.measure(target, {}, {"ready": ready})
    assert value == 30.0 and target.passed(value)
    assert "3 warm starts" in source and "empty cache 95 s" in source
    assert report.measure(target, {}, {}) == (None, "")
    assert "| llama_3_1_8b | 1 | cold (0.0 MiB) | 95.0 | 0.10 |" in report.experiment_section("ready", ready)


def test_prefill_steps_and_idle_traces_are_rendered():
    e = {"shape": "llama-3.1-8b",
         "prefill_steps": [{"tokens": 2048, "cached": 128, "steps": 10, "step_p50_s": 0.0576, "gap_s": 0.2,
                            "after_gap_p50_s": 0.0549, "cuda_table": "flash_fwd_kernel", "cpu_table": ""}],
         "idle_ttft_traces": [{"isl": 2048, "ttft_ms": 58.5, "calls": [
             {"call": "forward", "tokens": 2048, "host_ms": [0.2, 29.8], "gpu_ms": [0.3, 58.3]},
             {"call": "process", "host_ms": [30.3, 58.5]}]}]}
    md = "\n".join(report.experiment_section("8B", e))
    assert ("Prefill step of a 2048-token prompt (128 of them cached): p50 **57.6 ms** back to back, 54.9 ms "
            "after 0.2 s idle (median of 10).") in md
    assert "flash_fwd_kernel" in md
    assert "| 2048 | 2048 | 0.2-29.8 | 0.3-58.3 | 58.5 |" in md
