"""Bundle smoke test on a GPU host: a one-model repository whose Python model computes on the GPU
with the image's torch, served through the launcher, called over gRPC.

Proves the unpacked bundle works end to end: tritonserver + Python backend + the stub for the host's
Python + numpy<2 in the model env + torch/CUDA from the host image inside the stub.

    python -m bench.smoke --workdir /tmp/smoke      # prints JSON; exits non-zero on failure
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.specs import Tensor

MODEL = "gpu_smoke"
INPUT = Tensor("INPUT0", "FP32", (-1,))
OUTPUTS = (Tensor("OUTPUT0", "FP32", (-1,)), Tensor("DEVICE", "STRING", (1,)))

MODEL_PY = textwrap.dedent('''
    import json
    import numpy as np
    import torch
    import transformers  # the image's, under numpy 1.26 (proves the bundle env imports it)
    import triton_python_backend_utils as pb_utils
    from transformers import AutoConfig  # lazy module: import something real


    class TritonPythonModel:
        def initialize(self, args):
            kind = args["model_instance_kind"]
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if kind == "GPU" else "cpu")

        def execute(self, requests):
            out = []
            for r in requests:
                x = torch.from_numpy(pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy().copy()).to(self.device)
                y = (x * 2).cpu().numpy()
                name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
                info = json.dumps({"device": name, "numpy": np.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__})
                out.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", y.astype(np.float32)),
                    pb_utils.Tensor("DEVICE", np.array([info.encode()], dtype=np.object_)),
                ]))
            return out
''')


def write_repo(root: Path, gpu: bool = True) -> Path:
    cfg = mc.ModelConfig(name=MODEL, backend="python", max_batch_size=0)
    cfg.input.append(pbtxt.model_input(INPUT))
    cfg.output.extend(pbtxt.model_output(t) for t in OUTPUTS)
    cfg.instance_group.append(pbtxt.instance_group(1, gpu=gpu))
    d = root / MODEL
    pbtxt.write(cfg, d)
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "1" / "model.py").write_text(MODEL_PY)
    return root


def run(workdir: Path, gpu: bool = True) -> dict:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from serve.launcher import ServerOptions, TritonServer
    from serve.ports import free_port

    repo = write_repo(workdir / "repo", gpu)
    opts = ServerOptions(model_repository=repo, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), log_file=workdir / "smoke-server.log")
    t0 = time.perf_counter()
    with TritonServer(opts) as server:
        ready_s = time.perf_counter() - t0
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = np.arange(8, dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer(MODEL, [inp])
        y = res.as_numpy("OUTPUT0")
        info = json.loads(res.as_numpy("DEVICE")[0])
        assert np.array_equal(y, x * 2), f"wrong output {y}"
        assert not gpu or "cpu" != info["device"], info
        assert info["numpy"].startswith("1."), f"stub runs numpy {info['numpy']}"
    return {"ok": True, "ready_s": ready_s, **info}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/triton-smoke"))
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        out = run(args.workdir, gpu=not args.cpu)
    except Exception as e:  # print the server log tail with the failure
        log = args.workdir / "smoke-server.log"
        print(json.dumps({"ok": False, "error": repr(e)}), flush=True)
        if log.exists():
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
