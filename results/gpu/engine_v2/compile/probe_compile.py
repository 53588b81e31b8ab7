"""Decode step time per torch.compile variant (the probe behind docs/llm.md "Compiled decode"; run from the repo root)."""
import json, os, sys, time
import torch
from bench.engine_inproc import random_engine, decode_sweep
from export.llm import SHAPE_SETTINGS

shape, variant = sys.argv[1], sys.argv[2]
batches = [int(b) for b in sys.argv[3].split(",")]
import llm.attention as att
if variant == "D":
    import torch._inductor.config as ic
    ic.coordinate_descent_tuning = True
t0 = time.perf_counter()
e = random_engine(shape, "cuda", **{**SHAPE_SETTINGS.get(shape, {}), "compile": variant in ("A", "B", "D"), "warmup": False})
build = time.perf_counter() - t0
r = e.runner
if variant == "E":
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64
    r.step_fn = torch.compile(r.model.forward, dynamic=False)
comp = {}
for B in batches:
    t = time.perf_counter(); r._graph(B, r._graph_block_buckets()[-1]); torch.cuda.synchronize(); comp[B] = time.perf_counter() - t
res = decode_sweep(e, batches, 256, steps=100)
print("PROBE " + json.dumps({"shape": shape, "variant": variant, "build_s": build, "graph_s": comp,
      "decode": [{k: d[k] for k in ("batch", "step_s", "tokens_per_s")} for d in res]}), flush=True)
