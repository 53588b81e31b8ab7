"""Benchmark JSON -> markdown report + PNG plots.

    python -m bench.report results/gpu/llm_bench.json --hf-cb results/gpu/hfcb_llama-3.1-8b.json --out-dir results/gpu

Every target of the GPU issue is a row: target, measured figure, pass/miss. Figures come only from
the JSON files given (nothing is typed in by hand).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

BIG, SMALL = "llama-3.1-8b", "tinyllama-1.1b"
SHORT, LONG = (128, 256), (2048, 256)


@dataclass(frozen=True)
class Target:
    name: str
    shape: str
    unit: str
    bound: float
    higher_is_better: bool

    def passed(self, value: float | None) -> bool | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value >= self.bound if self.higher_is_better else value <= self.bound


TARGETS = (  # the LLM engine v2 issue's targets (H200, through Triton, bf16, random weights)
    Target("batch-1 decode (1 / TPOT), 128/256", BIG, "tok/s", 225, True),
    Target("64 streams output throughput, 128/256", BIG, "tok/s", 8000, True),
    Target("64 streams p50 inter-token latency, 128/256", BIG, "ms", 8, False),
    Target("64 streams output throughput, 2048/256", BIG, "tok/s", 2300, True),
    Target("64 streams TTFT p50, 2048/256", BIG, "ms", 1500, False),
    Target("TTFT idle server, 128-token prompt (median of 20)", BIG, "ms", 15, False),
    Target("TTFT idle server, 2048-token prompt (median of 20)", BIG, "ms", 60, False),
    Target("TTFT p99 / p50 at 8 streams, 128/256", BIG, "x", 3, False),
    # The host's share of the critical path: the GPU's idle time between steps (engine device-idle counter).
    Target("64 streams host time on the critical path per step (GPU idle between steps), 128/256", BIG, "ms", 0.3, False),
    Target("batch-1 decode (1 / TPOT), 128/256", SMALL, "tok/s", 1300, True),
    Target("64 streams at 8k context within a 40 GiB KV budget: requests failed", BIG, "requests", 0, False),
    Target("server ready with a warm compile cache", BIG, "s", 60, False),
)


ENCODER_TARGET = 50_000  # sentences/s at sequence length 128


def workload_of(lv: dict) -> str:
    return lv.get("workload") or f"{lv['isl']}:{lv['osl']}"


def level(shape_result: dict, isl_osl: tuple[int, int], concurrency: int, source: str = "triton") -> dict | None:
    for lv in shape_result.get(source, {}).get("levels", []):
        if workload_of(lv) == f"{isl_osl[0]}:{isl_osl[1]}" and lv["concurrency"] == concurrency:
            return lv
    return None


def inproc_file(experiments: dict, shape: str, key: str = "") -> dict | None:
    """An engine_inproc JSON of this shape (key: a substring of its label, e.g. '8k')."""
    for label, e in (experiments or {}).items():
        if e.get("shape") == shape and key in label:
            return e
    return None


def inproc_level(shape_result: dict, concurrency: int) -> dict | None:
    for lv in shape_result.get("inproc", {}).get("levels", []):
        if lv["concurrency"] == concurrency:
            return lv
    return None


def measure(target: Target, shapes: dict, experiments: dict | None = None) -> tuple[float | None, str]:
    """(value, source): through Triton when that run has it, else from an in-process run."""
    r = shapes.get(target.shape, {})
    n = target.name
    inproc = {"levels": (inproc_file(experiments, target.shape) or {}).get("levels", [])}
    if n.startswith("server ready"):  # a bench.ready_time JSON among the experiments
        model = target.shape.replace(".", "_").replace("-", "_")
        for e in (experiments or {}).values():
            starts = e.get("models", {}).get(model, {}).get("starts", [])
            warm = sorted(s["ready_s"] for s in starts if s["cache"] == "warm")
            cold = [s["ready_s"] for s in starts if s["cache"] == "cold"]
            if warm:
                return warm[len(warm) // 2], (f"through Triton, median of {len(warm)} warm starts"
                                              + (f"; empty cache {cold[0]:.0f} s" if cold else ""))
        return None, ""
    if n.startswith("64 streams at 8k"):
        e = inproc_file(experiments, target.shape, "8k")
        if not e or not e.get("levels"):
            return None, ""
        lv = e["levels"][0]
        return lv.get("failed", 0), f"in process, {lv['requests']} requests, {lv.get('preemptions', 0)} preemptions"
    for source, res in (("Triton", r), ("in process", {"inproc": inproc})):
        key = "triton" if source == "Triton" else "inproc"
        if n.startswith("batch-1 decode"):
            lv = level(res, SHORT, 1, key)
            if lv:
                if lv.get("tpot_p50_s"):
                    return 1.0 / lv["tpot_p50_s"], source
                return 1.0 / lv["itl_p50_s"], source + " (1 / ITL p50)"
        elif n.startswith("64 streams output"):
            lv = level(res, SHORT if "128/" in n else LONG, 64, key)
            if lv:
                return lv["tokens_per_s"], source
        elif n.startswith("64 streams host"):
            lv = level(res, SHORT, 64, key)
            idle = lv and lv.get("engine_idle_ms_per_step", lv.get("device_idle_ms_per_step"))
            if idle is not None:
                return idle, source + f" (all host work: {fmt(lv.get('engine_host_ms_per_step', lv.get('host_ms_per_step')), 2)} ms/step)"
        elif n.startswith("64 streams p50"):
            lv = level(res, SHORT, 64, key)
            if lv:
                return lv["itl_p50_s"] * 1e3, source
        elif n.startswith("64 streams TTFT"):
            lv = level(res, LONG, 64, key)
            if lv:
                return lv["ttft_p50_s"] * 1e3, source
        elif n.startswith("TTFT p99"):
            lv = level(res, SHORT, 8, key)
            if lv:
                return lv["ttft_p99_s"] / lv["ttft_p50_s"], source
        elif n.startswith("TTFT idle"):
            isl = 128 if "128" in n else 2048
            idle = r.get("triton", {}).get("ttft_idle", []) if source == "Triton" else \
                (inproc_file(experiments, target.shape) or {}).get("idle_ttft", [])
            for t in idle:
                if t["isl"] == isl:
                    return t["ttft_p50_s"] * 1e3, source
    return None, ""


def fmt(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{nd}f}"


def targets_table(shapes: dict, experiments: dict | None = None) -> list[str]:
    rows = ["| model | target | bound | measured | where | result |", "|---|---|---|---|---|---|"]
    for t in TARGETS:
        v, where = measure(t, shapes, experiments)
        ok = t.passed(v)
        bound = f"{'≥' if t.higher_is_better else '≤'} {fmt(t.bound, 0)} {t.unit}"
        res = "n/a (not measured)" if ok is None else ("**met**" if ok else "**missed**")
        nd = 2 if t.bound < 1 else 1
        bound = f"{'≥' if t.higher_is_better else '≤'} {fmt(t.bound, 1 if 0 < t.bound < 1 else 0)} {t.unit}"
        rows.append(f"| {t.shape} | {t.name} | {bound} | {fmt(v, nd)} {t.unit if v is not None else ''} | {where} | {res} |")
    return rows


def levels_table(shape: str, r: dict) -> list[str]:
    rows = [f"#### {shape} through Triton (gRPC streaming)", "",
            "| workload | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
            "TPOT p50 ms | engine host ms/step | device wait ms/step | device idle ms/step | GC pauses s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in r.get("triton", {}).get("levels", []):
        rows.append(f"| {workload_of(lv)} | {lv['concurrency']} | {lv['requests']} | {fmt(lv['tokens_per_s'])} | "
                    f"{fmt(lv['ttft_p50_s'] * 1e3)} | {fmt(lv['ttft_p99_s'] * 1e3)} | {fmt(lv['itl_p50_s'] * 1e3, 2)} | "
                    f"{fmt(lv['itl_p99_s'] * 1e3, 2)} | {fmt(lv.get('tpot_p50_s', float('nan')) * 1e3, 2)} | "
                    f"{fmt(lv.get('engine_host_ms_per_step'), 2)} | {fmt(lv.get('engine_wait_ms_per_step'), 2)} | "
                    f"{fmt(lv.get('engine_idle_ms_per_step'), 2)} | {fmt(lv.get('gc_pause_s'), 2)} |")
    return rows


def baseline_rows(shape: str, r: dict, hf_cb: list[dict]) -> list[str]:
    rows = []
    n = r.get("hf_naive")
    if n:
        rows.append(f"| {shape} | transformers `generate` (eager, 1 request) | 1 | {fmt(n['decode_tokens_per_s'])} | {fmt(n['ttft_s'] * 1e3)} | — |")
    for c in hf_cb:
        rows.append(f"| {shape} | transformers continuous batching, CUDA graphs {'on' if c['cuda_graph'] else 'off'} | "
                    f"{c['concurrency']} | {fmt(c['tokens_per_s'])} | {fmt(c['ttft_p50_s'] * 1e3)} | {fmt(c['itl_p50_s'] * 1e3, 2)} |")
    for lv in r.get("inproc", {}).get("levels", []):
        rows.append(f"| {shape} | ours, in process | {lv['concurrency']} | {fmt(lv['tokens_per_s'])} | "
                    f"{fmt(lv['ttft_p50_s'] * 1e3)} | {fmt(lv['itl_p50_s'] * 1e3, 2)} |")
    for c in (1, 64):
        lv = level(r, SHORT, c)
        if lv:
            rows.append(f"| {shape} | ours, through Triton + gRPC | {c} | {fmt(lv['tokens_per_s'])} | "
                        f"{fmt(lv['ttft_p50_s'] * 1e3)} | {fmt(lv['itl_p50_s'] * 1e3, 2)} |")
    rf = r.get("roofline")
    if rf:
        rows.append(f"| {shape} | roofline (copy bandwidth / bytes per token) | 1 | {fmt(rf['tokens_per_s'])} | — | — |")
    return rows


def overhead_rows(label: str, data: dict) -> list[str]:
    rows = []
    for shape, r in data["shapes"].items():
        lv, ip = level(r, SHORT, 64), inproc_level(r, 64)
        if lv and ip:
            rows.append(f"| {label} | {shape} | {fmt(lv['tokens_per_s'])} | {fmt(ip['tokens_per_s'])} | "
                        f"{fmt(100 * (1 - lv['tokens_per_s'] / ip['tokens_per_s']))} % |")
    return rows


def experiment_section(name: str, e: dict) -> list[str]:
    """An engine_inproc JSON: decode steps (+ compile flag), prefill timings, profile tables; or a
    bench.ready_time JSON: server starts."""
    if "models" in e:
        lines = [f"### {name}", "", "| model | start | compile cache | ready s | first request s |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {st['start']} | {st['cache']} ({st['cache_mib_before']} MiB) | {fmt(st['ready_s'])} | "
                  f"{fmt(st['first_request_s'], 2)} |" for m, r in e["models"].items() for st in r["starts"]]
        return lines + [""]
    shape = e.get("shape")
    shape = shape.get("name") if isinstance(shape, dict) else shape
    compiled = e.get("compile", str(e.get("settings", {}).get("compile", "false")).lower() == "true")
    lines = [f"### {name}: {shape}, torch.compile {'on' if compiled else 'off'}"
             f"{', build ' + fmt(e['build_s']) + ' s' if e.get('build_s') else ''}", ""]
    if e.get("decode"):
        lines += ["| batch | context | step ms | tok/s |", "|---|---|---|---|"]
        lines += [f"| {d['batch']} | {d['context']} | {d['step_s'] * 1e3:.2f} | {fmt(d['tokens_per_s'])} |" for d in e["decode"]]
        lines += [""]
    if e.get("levels"):
        lines += [f"Closed loops in process (attention {e.get('attention')}, {e.get('kv_blocks')} KV blocks):", "",
                  "| workload | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | host ms/step | device idle ms/step | preemptions |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {workload_of(lv)} | {lv['concurrency']} | {lv['requests']} | {fmt(lv['tokens_per_s'])} | "
                  f"{fmt(lv['ttft_p50_s'] * 1e3)} | {fmt(lv['ttft_p99_s'] * 1e3)} | {fmt(lv['itl_p50_s'] * 1e3, 2)} | "
                  f"{fmt(lv['itl_p99_s'] * 1e3, 2)} | {fmt(lv.get('host_ms_per_step'), 2)} | "
                  f"{fmt(lv.get('device_idle_ms_per_step'), 2)} | {lv.get('preemptions', 0)} |"
                  for lv in e["levels"]]
        lines += [""]
    st = e.get("static_compiled")
    if st:
        lines += [f"transformers `generate` with a static KV cache (compiled by `generate`, CUDA graphs), batch "
                  f"{st['batch']}, {st['isl']}/{st['osl']}: **{fmt(st['tokens_per_s'])} tok/s** "
                  f"(compile and capture {fmt(st['compile_s'])} s).", ""]
    if e.get("idle_ttft"):
        lines += ["Idle TTFT in process: " + ", ".join(f"{t['isl']} tokens **{t['ttft_p50_s'] * 1e3:.1f} ms** "
                                                     f"(median of {t['n']})" for t in e["idle_ttft"]) + ".", ""]
    for p in e.get("prefill", []):
        lines += [f"Prefill of one {p['isl']}-token prompt in chunks of {p['chunk']}: **{p['prefill_s'] * 1e3:.1f} ms** wall.", "",
                  "<details><summary>profile</summary>", "", "```", p["cuda_table"].rstrip(), "```", "", "```",
                  p["cpu_table"].rstrip(), "```", "", "</details>", ""]
    for p in e.get("prefill_steps", []):
        lines += [f"Prefill step of a {p['tokens']}-token prompt ({p['cached']} of them cached): p50 "
                  f"**{p['step_p50_s'] * 1e3:.1f} ms** back to back, {p['after_gap_p50_s'] * 1e3:.1f} ms after "
                  f"{p['gap_s']:g} s idle (median of {p['steps']}).", "",
                  "<details><summary>profile</summary>", "", "```", p["cuda_table"].rstrip(), "```", "", "</details>", ""]
    if e.get("idle_ttft_traces"):
        lines += ["Idle requests traced (ms after submission): forward on the host, its GPU span, TTFT:", "",
                  "| prompt tokens | computed tokens | forward host | forward GPU | TTFT |", "|---|---|---|---|---|"]
        for t in e["idle_ttft_traces"]:
            for c in (c for c in t["calls"] if c["call"] == "forward"):
                gpu = c.get("gpu_ms", ["-", "-"])
                lines += [f"| {t['isl']} | {c['tokens']} | {c['host_ms'][0]}-{c['host_ms'][1]} | {gpu[0]}-{gpu[1]} | "
                          f"{t['ttft_ms']} |"]
        lines += [""]
    for p in e.get("profiles", []):
        lines += [f"<details><summary>decode profile, batch {p['batch']}</summary>", "", "```", p["cuda_table"].rstrip(),
                  "```", "", "</details>", ""]
    return lines


def render(data: dict, hf_cb: dict[str, list[dict]] | None = None, encoder: dict | None = None,
           out_dir: Path | None = None, compare: dict[str, dict] | None = None,
           experiments: dict[str, dict] | None = None, encoder_compare: dict[str, dict] | None = None) -> str:
    hf_cb = hf_cb or {}
    v = data.get("versions", {})
    lines = ["# GPU benchmark report", "",
             f"GPU: **{v.get('gpu', 'none (CPU)')}**, driver {v.get('driver', '?')}, CUDA {v.get('cuda', '?')}; "
             f"torch {v.get('torch')}, transformers {v.get('transformers')}, Python {v.get('python')}, "
             f"numpy {v.get('numpy')} (model env), tritonserver {v.get('tritonserver')}. "
             f"Run {data.get('started')} → {data.get('finished', '(unfinished)')}.", "",
             "Models: random-weight checkpoints made on the device by `export/llm.py --random-shape` "
             "(bf16; speed does not depend on weight values). Engine settings: export/llm.py defaults"
             + (", overridden: " + ", ".join(f"`{k}={v}`" for k, v in data["engine_overrides"].items())
                if data.get("engine_overrides") else "") + ".", ""]
    bw = data.get("copy_bandwidth")
    if bw:
        lines += [f"Measured device copy bandwidth: **{bw['bandwidth_Bps'] / 1e12:.2f} TB/s** (read + write, "
                  f"{bw['bytes'] / 2**30:.0f} GiB copy, median of repeats).", ""]
    lines += ["## Targets", ""] + targets_table(data["shapes"], experiments)
    if encoder:
        best = encoder.get("best_128")
        ok = None if best is None else best >= ENCODER_TARGET
        lines += [f"| MiniLM-L6 encoder | sentences/s at sequence length 128, through Triton (perf_analyzer, gRPC) | "
                  f"≥ {fmt(ENCODER_TARGET, 0)} /s | {fmt(best, 0)} /s | "
                  f"{'n/a (not measured)' if ok is None else ('**met**' if ok else '**missed**')} |"]
    lines += [""]
    lines += ["## Baselines and engines (ISL/OSL 128/256)", "",
              "| model | engine | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms |", "|---|---|---|---|---|---|"]
    for shape, r in data["shapes"].items():
        lines += baseline_rows(shape, r, hf_cb.get(shape, []))
    lines += [""]
    for shape, r in data["shapes"].items():
        lines += levels_table(shape, r) + [""]
        t = r.get("triton", {})
        if t:
            lines += [f"GPU memory in use (nvidia-smi): idle server {t.get('gpu_mem_idle_mib')} MiB, "
                      f"peak {t.get('gpu_mem_peak_mib')} MiB; export {fmt(t.get('export_s'))} s, "
                      f"server ready {fmt(t.get('server_ready_s'))} s.", ""]
        for key in ("triton_error", "inproc_error", "hf_naive_error"):
            if r.get(key):
                lines += [f"**{key}**: `{r[key]}`", ""]
        steps = r.get("inproc", {}).get("decode_steps")
        if steps:
            lines += [f"Decode step of our runner alone (CUDA graph replay + argmax + host copy), {shape}:", "",
                      "| batch | context | step ms | tok/s |", "|---|---|---|---|"]
            lines += [f"| {s['batch']} | {s['context']} | {s['step_s'] * 1e3:.2f} | {fmt(s['tokens_per_s'])} |" for s in steps]
            lines += [""]
        for p in r.get("inproc", {}).get("profiles", []):
            lines += [f"<details><summary>torch.profiler: {shape} decode, batch {p['batch']}, {p['steps']} steps</summary>",
                      "", "```", p["cuda_table"].rstrip(), "```", "", "```", p["cpu_table"].rstrip(), "```", "", "</details>", ""]
    if compare:
        this = ", ".join(f"{k}={v}" for k, v in data.get("engine_overrides", {}).items()) or "defaults"
        rows = overhead_rows(f"this run ({this})", data)
        for label, other in compare.items():
            rows += overhead_rows(label, other)
        if rows:  # runs with an in-process level at the same load
            lines += ["## Python backend + gRPC overhead (64 streams, 128/256)", "",
                      "| run | model | through Triton tok/s | in process tok/s | overhead |", "|---|---|---|---|---|"]
            lines += rows + [""]
        for label, other in compare.items():
            lines += [f"## Comparison run: {label}", ""]
            for shape, r in other["shapes"].items():
                lines += levels_table(shape, r) + [""]
    for name, e in (experiments or {}).items():
        lines += experiment_section(name, e)
    if encoder:
        lines += ["## Encoder (MiniLM) on the GPU through Triton", "", "| seq len | concurrency | batch | sentences/s | p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|"]
        for e in encoder.get("levels", []):
            lines += [f"| {e['seq_len']} | {e['concurrency']} | {e['batch']} | {fmt(e['sentences_per_s'])} | "
                      f"{fmt(e['p50_s'] * 1e3, 2)} | {fmt(e['p99_s'] * 1e3, 2)} |"]
        lines += ["", f"Target: ≥ 50,000 sentences/s at sequence length 128. {encoder.get('note', '')} "
                  f"Model: {encoder.get('model', '')}, torch.compile on full-batch buckets: {encoder.get('compile', False)}; weights: {encoder.get('weights', '')}; "
                  f"correctness over gRPC: {encoder.get('correctness')}.", ""]
        for label, e in (encoder_compare or {}).items():
            best = max((l.get("sentences_per_s", 0) for l in e.get("levels", []) if l.get("seq_len") == 128), default=0)
            lines += [f"{label}: best {fmt(best, 0)} sentences/s at 128 tokens.", ""]
    if out_dir is not None:
        from bench.report_plots import plots  # imports this module: here, not at the top

        pngs = plots(data, out_dir)
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--hf-cb", type=Path, nargs="*", default=[], help="bench.baseline_hf --continuous JSON files")
    ap.add_argument("--encoder", type=Path, default=None, help="bench.encoder_gpu JSON")
    ap.add_argument("--compare", nargs="*", default=[], metavar="LABEL=JSON", help="other bench.llm runs")
    ap.add_argument("--experiment", nargs="*", default=[], metavar="LABEL=JSON", help="bench.engine_inproc outputs")
    ap.add_argument("--encoder-compare", nargs="*", default=[], metavar="LABEL=JSON")
    ap.add_argument("--notes", type=Path, default=None, help="hand-written analysis (markdown) appended as is")
    ap.add_argument("--out-dir", type=Path, default=None)
    a = ap.parse_args(argv)

    def labelled(items):
        return {k: json.loads(Path(v).read_text()) for k, v in (i.rsplit("=", 1) for i in items)}

    data = json.loads(a.bench_json.read_text())
    hf_cb = {}
    for f in a.hf_cb:
        d = json.loads(f.read_text())
        hf_cb.setdefault(d["shape"]["name"], []).extend(d["continuous"])
    enc = json.loads(a.encoder.read_text()) if a.encoder else None
    out_dir = a.out_dir or a.bench_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render(data, hf_cb, enc, out_dir, labelled(a.compare), labelled(a.experiment), labelled(a.encoder_compare))
    if a.notes:
        md += "\n" + a.notes.read_text()
    (out_dir / "report.md").write_text(md)
    print(f"wrote {out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
