"""AIPerf (genai-perf's successor; its PyPI release speaks HTTP/OpenAI only) through the gateway's
/v1/chat/completions, streaming, with the model's own local tokenizer.

    python -m bench.aiperf_gateway [--concurrency 16] [--requests 256] [--out results/gateway/aiperf]

AIPerf's dependency pins clash with the project's (numpy 2, its own pydantic/transformers), so it lives
in its own venv, build/aiperf-venv, made on first use with the pinned version below. The server (Triton +
gateway, tiny_llama + the text pipeline) is started on free loopback ports for the run. AIPerf's
summary (CSV/JSON exports and its console table) is written to --out.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from serve.paths import BUILD_DIR, MODEL_REPOSITORY, REPO_ROOT
from tests.embedding_models import embedding_model_dirs, link_repo
from tests.server_fixtures import start_stack

AIPERF_VERSION = "0.13.0"
VENV = BUILD_DIR / "aiperf-venv"
LLM = "tiny_llama"
KEEP = ("profile_export_aiperf.csv", "profile_export_aiperf.json", "profile_export_console.txt")  # AIPerf's summaries


def aiperf_bin() -> Path:
    exe = VENV / "bin" / "aiperf"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"aiperf=={AIPERF_VERSION}"], check=True)
    return exe


def run(concurrency: int, requests: int, isl: int, osl: int, out: Path) -> int:
    exe = aiperf_bin()
    with tempfile.TemporaryDirectory() as tmp:
        repo = link_repo(Path(tmp) / "repo", embedding_model_dirs() + [MODEL_REPOSITORY / LLM])
        with start_stack(repo) as stack:
            artifacts = Path(tmp) / "artifacts"
            cmd = [str(exe), "profile", "--model", LLM, "--url", stack.base_url, "--endpoint-type", "chat",
                   "--streaming", "--tokenizer", str(repo / LLM / "1" / "checkpoint"),
                   "--concurrency", str(concurrency), "--request-count", str(requests),
                   "--warmup-request-count", str(concurrency * 2), "--synthetic-input-tokens-mean", str(isl),
                   "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(osl),
                   "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--random-seed", "0",
                   # the server's usage counts: re-tokenizing the random model's text gives other counts
                   "--use-server-token-count",
                   "--output-artifact-dir", str(artifacts), "--ui-type", "none", "--no-auto-plot"]
            print("$ " + " ".join(cmd), flush=True)
            # Not HF_HUB_OFFLINE: AIPerf 0.13 then looks a local tokenizer path up as a hub snapshot and
            # fails; online mode loads a local directory directly.
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
            out.mkdir(parents=True, exist_ok=True)
            (out / "console.txt").write_text("$ aiperf " + " ".join(cmd[1:]).replace(tmp, "<tmp>") + "\n\n" + proc.stdout)
            for f in artifacts.rglob("*"):
                if f.name in KEEP:
                    shutil.copy2(f, out / f.name)
            return proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--isl", type=int, default=64, help="input tokens per request")
    ap.add_argument("--osl", type=int, default=64, help="output tokens per request")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gateway" / "aiperf")
    a = ap.parse_args(argv)
    return run(a.concurrency, a.requests, a.isl, a.osl, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
