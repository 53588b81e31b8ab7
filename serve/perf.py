"""`make perf MODEL=...`: perf_analyzer (the 2.51 binary set up by `make setup`) against a running server.

Shapes for variable dims and, for decoupled (streaming) models, `--streaming` and a request body are
derived from the model's config.pbtxt, so `make perf MODEL=<any model>` works without flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from export import pbtxt
from serve import paths
from serve.launcher import ADMIN_GRPC_HEADER, ADMIN_HEADER, default_admin_token

DEFAULT_SEQUENCE = 16  # tokens per text for variable dims: short sentences, as in the benchmarks
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."
DEFAULT_MAX_TOKENS = 32


def perf_env() -> dict[str, str]:
    libs = [str(paths.perf_analyzer_libs())] + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else [])
    return dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libs))


def shape_args(config, sequence: int) -> list[str]:
    """--shape name:dims for inputs with variable dims (perf_analyzer needs concrete ones)."""
    args = []
    for i in config.input:
        if any(d < 0 for d in i.dims):
            dims = ",".join(str(sequence if d < 0 else d) for d in i.dims)
            args.append(f"--shape={i.name}:{dims}")
    return args


def llm_input_data(config, prompt: str, max_tokens: int) -> dict:
    """A perf_analyzer input-data document for the LLM contract (text_input + max_tokens)."""
    names = {i.name for i in config.input}
    data = {"text_input": [prompt]}
    if "max_tokens" in names:
        data["max_tokens"] = [max_tokens]
    if "stream" in names:
        data["stream"] = [True]
    return {"data": [data]}


def perf_command(model: str, url: str, protocol: str, repo: Path, extra: list[str], sequence: int,
                 data_dir: Path, admin_token: str) -> list[str]:
    config = pbtxt.read(repo / model)
    # perf_analyzer reads server-side statistics, an admin API: send the token.
    header = f"{ADMIN_GRPC_HEADER if protocol == 'grpc' else ADMIN_HEADER}:{admin_token}"
    cmd = [str(paths.perf_analyzer_bin()), "-m", model, "-u", url, "-i", protocol, "-H", header,
           *shape_args(config, sequence)]
    given = any(a.startswith("--input-data") for a in extra)
    if config.model_transaction_policy.decoupled:
        doc = data_dir / f"{model}-input.json"
        doc.write_text(json.dumps(llm_input_data(config, DEFAULT_PROMPT, DEFAULT_MAX_TOKENS)))
        cmd += ["--streaming"] + ([] if given else [f"--input-data={doc}"])
    elif not given:
        # perf_analyzer's default random data puts token ids out of the vocabulary; zeros are valid ids.
        cmd.append("--input-data=zero")
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-u", "--url", default=None, help="server address (default 127.0.0.1:8001 for grpc, :8000 for http)")
    p.add_argument("-i", "--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--model-repository", type=Path, default=paths.MODEL_REPOSITORY)
    p.add_argument("--sequence", type=int, default=DEFAULT_SEQUENCE, help="size used for variable dims")
    p.add_argument("--admin-token", default=None, help="default: $TRITON_ADMIN_TOKEN or build/admin-token")
    a, extra = p.parse_known_args(argv)
    url = a.url or ("127.0.0.1:8001" if a.protocol == "grpc" else "127.0.0.1:8000")
    if not (a.model_repository / a.model / "config.pbtxt").exists():
        print(f"error: no model '{a.model}' in {a.model_repository}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        token = a.admin_token or default_admin_token()
        cmd = perf_command(a.model, url, a.protocol, a.model_repository, extra, a.sequence, Path(tmp), token)
        print("+", " ".join(cmd).replace(token, "<admin-token>"), flush=True)
        return subprocess.run(cmd, env=perf_env()).returncode


if __name__ == "__main__":
    sys.exit(main())
