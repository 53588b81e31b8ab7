"""`python -m export` (`make export`): every default model of the repository, each validated.

Steps run in dependency order (the text pipeline needs its encoder). Each step is the library function
of its own module and has its own CLI for non-default exports (`python -m export.encoder --help`, ...).
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--force", action="store_true", help="re-export even when artifacts are up to date")
    a = p.parse_args(argv)
    from export import encoder, llm, pipeline

    steps = [
        ("encoder (ONNX fp32/fp16/int8, validated)", lambda: encoder.export_default(force=a.force)),
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
