"""`python -m export` (`make export`): every default model of the repository, each validated.

Steps run in dependency order (the text pipeline needs its encoder). Each step is the library function
of its own module and has its own CLI for non-default exports (`python -m export.encoder --help`, ...).

`--gpus 2` / `--gpus 0,1` (export/placement.py) gives the ONNX encoders one KIND_GPU instance on each of
those GPUs instead of CPU instances; the text pipeline's Python steps stay on CPU, and the LLM is placed
by its own exporter (`python -m export.llm`, one engine per GPU).
"""
from __future__ import annotations

import argparse
import sys
import time

from export.placement import gpus_arg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--force", action="store_true", help="re-export even when artifacts are up to date")
    p.add_argument("--gpus", type=gpus_arg, default=None, metavar="N|ID,ID",
                   help="encoders on these GPUs, one instance each: a count (2) or device ids (0,1; one id: 3,)")
    a = p.parse_args(argv)
    from export import encoder, llm, pipeline

    steps = [
        ("encoder (ONNX fp32/fp16/int8, validated)", lambda: encoder.export_default(force=a.force, gpus=a.gpus)),
        ("text pipeline", lambda: pipeline.export_pipeline()),
        ("tiny LLM (random weights)", lambda: llm.export_default(force=a.force)),
    ]
    for name, step in steps:
        t0 = time.monotonic()
        print(f"== export: {name}", flush=True)
        step()
        print(f"== export: {name} done in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
