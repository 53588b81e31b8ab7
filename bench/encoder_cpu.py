"""CPU benchmark of the encoder and the text pipeline through Triton (`make bench-encoder-cpu`).

perf_analyzer sweeps concurrency x max_queue_delay x instance count. A config change needs a server
restart, so each (instances, delay) setting gets its own temporary repository (configs from the main
repository's, edited; ONNX files symlinked) and its own server. Requests are one short sentence
(~16 tokens). Writes results/encoder_cpu/{report.md, results.json, throughput.png}.

    python -m bench.encoder_cpu                        # the default sweep (< 10 minutes on 2 cores)
    python -m bench.encoder_cpu --compare-pipelines --out-dir results/encoder_cpu/pipelines   # BLS vs ensemble
    python -m bench.encoder_cpu --concurrency 1 16 --delays none 500 --instances 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.machine import cpu_name
from export import pbtxt
from export.pipeline import DEFAULT_KIND, KINDS, export_pipeline, hf_dir
from export.specs import MINILM_TEXT, VARIANT_SUFFIX, TextPipelineSpec
from serve import perf
from serve.launcher import TritonServer
from serve.paths import MODEL_REPOSITORY, REPO_ROOT, perf_analyzer_bin
from tests.server_fixtures import server_options

SPEC: TextPipelineSpec = MINILM_TEXT
OUT_DIR = REPO_ROOT / "results" / "encoder_cpu"
SENTENCE = "A quick brown fox jumps over the lazy dog by the quiet river."  # 16 tokens with [CLS]/[SEP]
PRECISIONS = ("fp32", "int8_static", "int8_dynamic")
CONCURRENCY = (1, 4, 16)
DELAYS_US = (None, 500, 2000)  # None: no dynamic batching (one request per execution)
INSTANCES = (1, 2)
MEASURE_MS = 1500  # perf_analyzer window; up to MAX_TRIALS windows until stable
MAX_TRIALS = 3
PIPELINE_PRECISIONS = ("fp32",)
# perf_analyzer csv columns (microseconds per request): where the time of a request goes.
CSV_SPLIT = {"client_send": "Client Send", "network": "Network+Server Send/Recv", "queue": "Server Queue",
             "compute_input": "Server Compute Input", "compute_infer": "Server Compute Infer",
             "compute_output": "Server Compute Output", "client_recv": "Client Recv"}  # encoder variants the benchmarked pipeline calls
STABILITY_PCT = 20
PASS_RE = re.compile(r"Pass \[\d+\] throughput: ([\d.]+) infer/sec\. Avg latency: (\d+) usec")
TARGETS = {"fp32": 400.0, "int8_static": 1000.0, "int8_dynamic": 1000.0}  # sentences/s, issue 3 item 8
BATCHING_GAIN_TARGET = 3.0  # dynamic batching vs none at concurrency 16
SHARED_LOAD = 0.5  # 1-minute load average before the run above which the machine counts as shared


@dataclass(frozen=True)
class Setting:
    instances: int  # encoder instances (KIND_CPU); ORT threads = cores / instances
    delay_us: int | None  # dynamic batching max_queue_delay; None: no dynamic batching

    @property
    def label(self) -> str:
        return f"{self.instances} inst, " + ("no batching" if self.delay_us is None else f"delay {self.delay_us} us")


def encoder_names(precisions) -> dict[str, str]:
    return {p: SPEC.encoder.variant_name(p) for p in precisions
            if (MODEL_REPOSITORY / SPEC.encoder.variant_name(p) / "config.pbtxt").is_file()}


def pipeline_names(precisions, kinds) -> dict[str, tuple[str, str]]:
    """model name -> (kind, encoder precision); the default kind keeps the served name (minilm_text)."""
    names = {}
    for kind in kinds:
        for p in precisions:
            names[SPEC.name + ("" if kind == DEFAULT_KIND else f"_{kind}") + VARIANT_SUFFIX[p]] = (kind, p)
    return names


def write_repo(root: Path, setting: Setting, encoders: dict[str, str], pipelines: dict[str, tuple[str, str]]) -> Path:
    """A repository holding the encoders under `setting` and the pipelines calling them."""
    for name in encoders.values():
        src = MODEL_REPOSITORY / name
        config = pbtxt.read(src)
        config.instance_group[0].count = setting.instances
        del config.model_warmup[:]  # warmup only slows the many restarts down
        if setting.delay_us is None:
            config.ClearField("dynamic_batching")
        else:
            config.dynamic_batching.max_queue_delay_microseconds = setting.delay_us
        pbtxt.write(config, root / name)
        for version in (p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
            (root / name / version.name).mkdir(exist_ok=True)
            for f in version.iterdir():
                os.symlink(f, root / name / version.name / f.name)
    for name, (kind, precision) in pipelines.items():
        export_pipeline(root, kind=kind, encoder_precision=precision, name=name)
    return root


def input_data(tmp: Path) -> dict[str, Path]:
    """perf_analyzer --input-data documents: real token ids for the encoder, the string for pipelines."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir(SPEC) / "tokenizer.json"))
    tok.no_padding()
    enc = tok.encode(SENTENCE)
    ids = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
    docs = {
        "encoder": {"data": [{t.name: {"content": ids[t.name], "shape": [len(enc.ids)]} for t in SPEC.encoder.inputs}]},
        "pipeline": {"data": [{SPEC.text.name: {"content": [SENTENCE], "shape": [1]}}]},
    }
    paths = {}
    for k, doc in docs.items():
        paths[k] = tmp / f"{k}.json"
        paths[k].write_text(json.dumps(doc))
    paths["tokens"] = len(enc.ids)
    paths["token_ids"] = enc.ids
    return paths


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of live processes (/proc/<pid>/stat fields 14 and 15)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_perf(model: str, server: TritonServer, concurrency: int, data: Path, csv_path: Path) -> dict:
    """One perf_analyzer point plus where the CPU went: cores used by the load generator (perf_analyzer
    shares the 2 cores), by tritonserver itself and by the Python stubs (backend + pipeline steps)."""
    stubs = server.stub_pids()
    t0, pa0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    srv0, stub0 = cpu_seconds([server.process.pid]), cpu_seconds(stubs)
    r = _run_perf(model, server, concurrency, data, csv_path)
    wall, pa1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    r["cores_perf_analyzer"] = (pa1.ru_utime + pa1.ru_stime - pa0.ru_utime - pa0.ru_stime) / wall
    r["cores_tritonserver"] = (cpu_seconds([server.process.pid]) - srv0) / wall
    r["cores_stubs"] = (cpu_seconds(stubs) - stub0) / wall
    return r


def _run_perf(model: str, server: TritonServer, concurrency: int, data: Path, csv_path: Path) -> dict:
    # perf_analyzer reads server-side statistics, an admin API: it needs the token header.
    (header,) = (f"{k}:{v}" for k, v in server.admin_grpc_headers.items())
    cmd = [str(perf_analyzer_bin()), "-m", model, "-u", server.grpc_url, "-i", "grpc", "-v", "-H", header, f"--input-data={data}",
           f"--concurrency-range={concurrency}", f"--measurement-interval={MEASURE_MS}",
           f"--max-trials={MAX_TRIALS}", f"--stability-percentage={STABILITY_PCT}", "-f", str(csv_path)]
    csv_path.unlink(missing_ok=True)  # an unstable run writes none: never read a stale one
    p = subprocess.run(cmd, env=perf.perf_env(), capture_output=True, text=True, timeout=120)
    if csv_path.is_file():
        with open(csv_path) as f:
            row = next(csv.DictReader(f))
        split = {f"{k}_us": float(row[c]) for k, c in CSV_SPLIT.items() if c in row}
        return {"infer_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3,
                "p99_ms": float(row["p99 latency"]) / 1e3, "stable": True, **split}
    # No stable result (other work on a shared machine): report the mean of the last two windows.
    passes = PASS_RE.findall(p.stdout)
    if not passes:
        return {"error": (p.stdout + p.stderr)[-500:]}
    last = [(float(t), float(l)) for t, l in passes[-2:]]
    return {"infer_per_s": sum(t for t, _ in last) / len(last), "p50_ms": float("nan"),
            "p99_ms": float("nan"), "avg_ms": sum(l for _, l in last) / len(last) / 1e3, "stable": False}


def encoder_stats(server: TritonServer, model: str) -> dict:
    """Cumulative executions / inferences / compute time of one model (an admin API: token header)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    (s,) = client.get_inference_statistics(model, headers=server.admin_headers)["model_stats"]
    return {"executions": int(s.get("execution_count", 0)), "inferences": int(s.get("inference_count", 0)),
            "infer_ns": sum(int(b["compute_infer"]["ns"]) for b in s.get("batch_stats", []))}


def batching_effect(before: dict, after: dict) -> dict:
    """Average batch the encoder actually ran, and its compute time per execution."""
    ex = after["executions"] - before["executions"]
    if ex <= 0:
        return {}
    return {"encoder_avg_batch": (after["inferences"] - before["inferences"]) / ex,
            "encoder_ms_per_execution": (after["infer_ns"] - before["infer_ns"]) / ex / 1e6}


def sweep(settings: list[Setting], concurrency, precisions, kinds, pipeline_precisions=PIPELINE_PRECISIONS,
          encoders_too: bool = True, log=print) -> tuple[list[dict], dict]:
    encoders = encoder_names(set(precisions) | set(pipeline_precisions))
    pipelines = pipeline_names([p for p in pipeline_precisions if p in encoders], kinds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = input_data(tmp)
        for setting in settings:
            repo = write_repo(tmp / f"repo_{setting.instances}_{setting.delay_us}", setting, encoders, pipelines)
            t0 = time.monotonic()
            with TritonServer(server_options(repo)) as server:
                log(f"== {setting.label}: server ready in {time.monotonic() - t0:.1f}s")
                models = [(n, "encoder", p, "encoder") for p, n in encoders.items() if p in precisions] if encoders_too else []
                models += [(n, kind, p, "pipeline") for n, (kind, p) in pipelines.items()]
                for name, kind, precision, doc in models:
                    encoder = name if kind == "encoder" else SPEC.encoder.variant_name(precision)
                    for c in concurrency:
                        before = encoder_stats(server, encoder)
                        r = run_perf(name, server, c, data[doc], repo / f"{name}_{c}.csv")
                        r.update(batching_effect(before, encoder_stats(server, encoder)))
                        row = {"model": name, "kind": kind, "precision": precision, **asdict(setting),
                               "concurrency": c, **r}
                        if "infer_per_s" in r:
                            row["sentences_per_s"] = r["infer_per_s"]  # one sentence per request
                        rows.append(row)
                        log(f"   {name:28} c={c:<3} " + (f"{row['sentences_per_s']:8.1f} sent/s  p50 {r['p50_ms']:.1f} ms  "
                                                         f"encoder batch {r.get('encoder_avg_batch', 0):.1f}"
                                                         if "infer_per_s" in r else f"ERROR {r['error']}"))
        ceiling = ort_ceiling(precisions, data["token_ids"]) if encoders_too else []
    return rows, {"tokens_per_sentence": data["tokens"], "sentence": SENTENCE, "ort_ceiling": ceiling}


def ort_ceiling(precisions, tokens: list[int], batches=(1, 16, 64), seconds: float = 2.0) -> list[dict]:
    """In-process ONNX Runtime on the same ONNX files and threads (all cores): the most Triton could reach.
    The gap to the served numbers is Triton + Python backend + gRPC overhead."""
    import numpy as np
    import onnxruntime as ort

    rows = []
    for precision, name in encoder_names(precisions).items():
        config = pbtxt.read(MODEL_REPOSITORY / name)
        onnx_path = MODEL_REPOSITORY / name / "1" / (config.default_model_filename or "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        for b in batches:
            ids = np.tile(np.array(tokens, np.int64), (b, 1))  # [b, S]
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            sess.run(None, feeds)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sess.run(None, feeds)
                n += 1
            rows.append({"model": name, "precision": precision, "batch": b,
                         "sentences_per_s": n * b / (time.perf_counter() - t0)})
    return rows


def machine_info() -> dict:
    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    import onnxruntime

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg()),
            "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f" {f}" in flags],
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def best(rows, **match) -> dict | None:
    ok = [r for r in rows if "sentences_per_s" in r and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r["sentences_per_s"], default=None)


def summary(rows) -> list[str]:
    lines = []
    for precision, target in TARGETS.items():
        b = best(rows, kind="encoder", precision=precision)
        if b:
            verdict = "met" if b["sentences_per_s"] >= target else "MISSED"
            lines.append(f"- encoder {precision}: best {b['sentences_per_s']:.0f} sentences/s "
                         f"({b['instances']} inst, delay {b['delay_us']}, c={b['concurrency']}); target {target:.0f}: {verdict}")
        for kind in ("bls", "ensemble"):
            p = best(rows, kind=kind, precision=precision)
            if p:
                lines.append(f"- pipeline {kind} {precision}: best {p['sentences_per_s']:.0f} sentences/s "
                             f"({p['instances']} encoder inst, delay {p['delay_us']}, c={p['concurrency']})")
    for precision in TARGETS:
        none = best(rows, kind="encoder", precision=precision, delay_us=None, concurrency=16)
        dyn = max((r for r in rows if r.get("kind") == "encoder" and r["precision"] == precision and r["delay_us"] is not None
                   and r["concurrency"] == 16 and "sentences_per_s" in r), key=lambda r: r["sentences_per_s"], default=None)
        if none and dyn:
            gain = dyn["sentences_per_s"] / none["sentences_per_s"]
            lines.append(f"- dynamic batching gain at concurrency 16, encoder {precision}: {gain:.2f}x "
                         f"({dyn['sentences_per_s']:.0f} vs {none['sentences_per_s']:.0f} sentences/s); target "
                         f"{BATCHING_GAIN_TARGET:.0f}x: {'met' if gain >= BATCHING_GAIN_TARGET else 'MISSED'}")
    return lines


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False, sharey=False)
    for ax, model in zip(axes[0], models):
        for key in sorted({(r["instances"], r["delay_us"] if r["delay_us"] is not None else -1) for r in rows if r["model"] == model}):
            pts = sorted((r["concurrency"], r["sentences_per_s"]) for r in rows
                         if r["model"] == model and "sentences_per_s" in r
                         and (r["instances"], r["delay_us"] if r["delay_us"] is not None else -1) == key)
            label = f"{key[0]} inst, " + ("no batching" if key[1] < 0 else f"{key[1]} us")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("sentences/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows, meta: dict, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out_dir / "throughput.png")
    m = meta["machine"]
    lines = [
        "# Encoder and text pipeline on CPU (Triton, perf_analyzer)", "",
        f"Generated by `python -m bench.encoder_cpu` on {meta['date']} in {meta['seconds']:.0f} s.", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores visible ({', '.join(m['isa'])}); onnxruntime {m['onnxruntime']}",
        f"- load average before/after the run: {meta['load_before'][0]:.1f} / {m['load_avg_1_5_15'][0]:.1f} "
        f"({'shared machine: other work ran at the same time, numbers are lower bounds' if meta['shared'] else 'idle machine'})",
        f"- requests: one sentence of {meta['tokens_per_sentence']} tokens ({meta['sentence']!r}) per request over gRPC; "
        f"perf_analyzer windows of {MEASURE_MS} ms, up to {MAX_TRIALS} until within {STABILITY_PCT}%",
        f"- encoder threads: intra_op = cores / instances; pipeline: {SPEC.instances} pipeline instances", "",
        "## Summary", "", *summary(rows), "",
        *(["## ONNX Runtime alone (no Triton), same ONNX files, all cores", "",
            "| model | batch | sentences/s |", "|---|---:|---:|",
            *[f"| {r['model']} | {r['batch']} | {r['sentences_per_s']:.0f} |" for r in meta["ort_ceiling"]], ""]
          if meta.get("ort_ceiling") else []),
        "## All points", "",
        "Cores: CPU time / wall time of perf_analyzer (the load generator runs on the same cores), "
        "tritonserver and the Python stub processes during the point. "
        "Encoder batch: the average batch the encoder ran (its inferences / executions during the point); "
        "encoder ms: its ONNX Runtime compute per execution. Server split (stable points): queue / compute "
        "infer / transport per request in ms.", "",
        "| model | kind | precision | instances | max_queue_delay | concurrency | sentences/s | p50 ms | p99 ms "
        "| encoder batch | encoder ms | queue / infer / network ms | cores: perf_analyzer / server / stubs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        delay = "no batching" if r["delay_us"] is None else f"{r['delay_us']} us"
        if "sentences_per_s" in r:
            split = (f"{r['queue_us'] / 1e3:.1f} / {r['compute_infer_us'] / 1e3:.1f} / {r['network_us'] / 1e3:.1f}"
                     if "queue_us" in r else "")
            lines.append(f"| {r['model']} | {r['kind']} | {r['precision']} | {r['instances']} | {delay} | {r['concurrency']} | "
                         f"{r['sentences_per_s']:.1f}{'' if r['stable'] else ' (unstable)'} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r.get('encoder_avg_batch', float('nan')):.1f} | {r.get('encoder_ms_per_execution', float('nan')):.1f} | {split} | "
                         f"{r['cores_perf_analyzer']:.2f} / {r['cores_tritonserver']:.2f} / {r['cores_stubs']:.2f} |")
        else:
            lines.append(f"| {r['model']} | {r['kind']} | {r['precision']} | {r['instances']} | {delay} | {r['concurrency']} | error | | |")
    lines += ["", "![throughput](throughput.png)", ""]
    if meta.get("notes"):
        lines += ["## Notes", "", meta["notes"], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def parse_delay(s: str) -> int | None:
    return None if s == "none" else int(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--delays", type=parse_delay, nargs="+", default=list(DELAYS_US), help="microseconds or 'none'")
    ap.add_argument("--instances", type=int, nargs="+", default=list(INSTANCES))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--pipelines", nargs="*", default=[DEFAULT_KIND], choices=list(KINDS))
    ap.add_argument("--pipeline-precisions", nargs="*", default=list(PIPELINE_PRECISIONS))
    ap.add_argument("--compare-pipelines", action="store_true",
                    help="only BLS vs ensemble (fp32 encoder) at the spec's default batching delay")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--shared", action="store_true", help="say in the report that the machine was shared")
    ap.add_argument("--notes", default="", help="free text appended to the report (profiling findings)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-write report.md/png from <out-dir>/results.json (e.g. with new --notes); no measuring")
    a = ap.parse_args(argv)
    if a.render_only:
        saved = json.loads((a.out_dir / "results.json").read_text())
        saved["meta"]["notes"] = a.notes or saved["meta"].get("notes", "")
        print(report(saved["rows"], saved["meta"], a.out_dir).read_text())
        return 0
    if a.compare_pipelines:
        settings = [Setting(i, SPEC.encoder.batching.max_queue_delay_us) for i in a.instances]
        a.precisions, a.pipelines, a.pipeline_precisions = ["fp32"], list(KINDS), ["fp32"]
    else:
        settings = [Setting(i, d) for i in a.instances for d in a.delays]
    t0, load_before = time.time(), os.getloadavg()
    rows, meta = sweep(settings, a.concurrency, a.precisions, a.pipelines, a.pipeline_precisions,
                       encoders_too=not a.compare_pipelines)
    meta.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=time.time() - t0,
                load_before=list(load_before), machine=machine_info(), notes=a.notes)
    meta["shared"] = a.shared or load_before[0] > SHARED_LOAD
    print(report(rows, meta, a.out_dir).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
