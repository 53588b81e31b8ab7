"""Where a model's instances run: `--gpus` (a count or a list of device ids) -> Triton `instance_group`s,
and back, from a config, to the instances Triton will create and the device each one binds to.

    --gpus 2      two GPUs, device ids 0 and 1
    --gpus 0,1    the same, as a list
    --gpus 3,     GPU 3 only (a list of one: the trailing comma tells it from a count)
    --gpus 1,3    GPUs 1 and 3

One KIND_GPU group per GPU (`gpus: [i]`, `count` instances): Triton creates `count` instances on each
listed GPU and passes each its device in `args['model_instance_device_id']` (with
`args['model_instance_kind'] == 'GPU'`); the model code must bind to that device (`instance_device`)
before it allocates anything or captures CUDA graphs. The ids are those the server process sees
(after CUDA_VISIBLE_DEVICES / the container's GPU reservation).

No torch here: configs are generated (and tested) on hosts without a GPU.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

KIND_GPU = mc.ModelInstanceGroup.KIND_GPU
KIND_CPU = mc.ModelInstanceGroup.KIND_CPU
KIND_AUTO = mc.ModelInstanceGroup.KIND_AUTO
MAX_GPUS = 64  # a sanity bound on ids and counts (a typo like `--gpus 80` is refused, not exported)


def parse_gpus(text: str) -> tuple[int, ...]:
    """'2' -> (0, 1) (a count); '0,1' -> (0, 1); '3,' -> (3,) (a list). Raises ValueError on anything else."""
    text = text.strip()
    if not text:
        raise ValueError("--gpus: empty; give a count (2) or device ids (0,1 or 3,)")
    if "," not in text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--gpus {text!r}: a count must be a whole number >= 1 (for GPU ids use a list: 0,1 or 3,)")
        count = int(text)
        if count > MAX_GPUS:
            raise ValueError(f"--gpus {count}: more than {MAX_GPUS} GPUs")
        return tuple(range(count))
    parts = [p.strip() for p in text.split(",")]
    if parts[-1] == "":  # '3,': a list of one
        parts = parts[:-1]
    if not parts or any(not p.isdigit() for p in parts):
        raise ValueError(f"--gpus {text!r}: device ids must be whole numbers >= 0, comma separated (0,1)")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text!r}: a GPU is listed twice")
    if max(ids) >= MAX_GPUS:
        raise ValueError(f"--gpus {text!r}: device id >= {MAX_GPUS}")
    return ids


def gpus_arg(text: str) -> tuple[int, ...]:
    """argparse `type=` for --gpus (a usage error instead of a traceback)."""
    try:
        return parse_gpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_gpus_argument(p: argparse.ArgumentParser, per_gpu_default: int, what: str = "instances") -> None:
    p.add_argument("--gpus", type=gpus_arg, default=None, metavar="N|ID,ID",
                   help=f"KIND_GPU {what} on these GPUs: a count (2: GPUs 0 and 1) or device ids (0,1; one id: 3,); "
                        f"--instances is then per GPU (default {per_gpu_default})")


def gpu_groups(gpus: Sequence[int], per_gpu: int = 1) -> list[mc.ModelInstanceGroup]:
    """One KIND_GPU group per GPU: `per_gpu` instances on each of `gpus`, in the order given."""
    gpus = list(gpus)
    if not gpus:
        raise ValueError("no GPUs given")
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"GPU ids must be distinct and >= 0, got {gpus}")
    if per_gpu < 1:
        raise ValueError(f"instances per GPU must be >= 1, got {per_gpu}")
    return [mc.ModelInstanceGroup(count=per_gpu, kind=KIND_GPU, gpus=[i]) for i in gpus]


def instance_groups(gpus: Sequence[int] | None, count: int, gpu: bool = False) -> list[mc.ModelInstanceGroup]:
    """What an exporter writes: per-GPU groups when `gpus` is given (`count` per GPU), else one group of
    `count` instances (KIND_GPU on every visible GPU when `gpu`, else KIND_CPU) as before."""
    if gpus:
        return gpu_groups(gpus, count)
    if count < 1:
        raise ValueError(f"instances must be >= 1, got {count}")
    return [mc.ModelInstanceGroup(count=count, kind=KIND_GPU if gpu else KIND_CPU)]


def llm_instance_groups(gpus: Sequence[int] | None) -> list[mc.ModelInstanceGroup]:
    """The LLM: one engine instance per GPU (each holds its own weights and KV cache, so two on one GPU
    would halve the cache for no gain); `gpus` None or empty: one CPU instance."""
    if not gpus:
        return [mc.ModelInstanceGroup(count=1, kind=KIND_CPU)]
    return gpu_groups(gpus, 1)


def gpus_of(groups: Iterable[mc.ModelInstanceGroup]) -> tuple[int, ...] | None:
    """The explicit GPU ids of KIND_GPU groups (in order), or None when no group lists any."""
    ids = [i for g in groups if g.kind == KIND_GPU for i in g.gpus]
    return tuple(dict.fromkeys(ids)) if ids else None


@dataclass(frozen=True)
class Instance:
    """One model instance as Triton will create it."""

    model: str
    group: int  # index of its instance_group
    index: int  # its number within the group on its device
    kind: str  # 'GPU' | 'CPU' (args['model_instance_kind'])
    device_id: int  # args['model_instance_device_id']; 0 for CPU instances

    @property
    def device(self) -> str:
        return instance_device({"model_instance_kind": self.kind, "model_instance_device_id": str(self.device_id)})


def instances(config: mc.ModelConfig, visible_gpus: int) -> list[Instance]:
    """Expand a config's instance groups as Triton does: a KIND_GPU group makes `count` instances on each
    GPU it lists, or on every visible GPU when it lists none; KIND_AUTO is GPU when there is one, else CPU;
    no instance_group at all means one instance of KIND_AUTO. A GPU id that is not visible raises
    ValueError (Triton refuses to load such a model)."""
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(count=1, kind=KIND_AUTO)]
    out = []
    for gi, g in enumerate(groups):
        count = g.count or 1
        kind = g.kind
        if kind == KIND_AUTO:
            kind = KIND_GPU if visible_gpus else KIND_CPU
        if kind == KIND_GPU:
            ids = list(g.gpus) or list(range(visible_gpus))
            missing = [i for i in ids if i >= visible_gpus]
            if missing or not ids:
                raise ValueError(f"{config.name}: instance group {gi} wants GPU(s) {missing or 'any'}, "
                                 f"{visible_gpus} visible")
            out += [Instance(config.name, gi, n, "GPU", i) for i in ids for n in range(count)]
        else:
            out += [Instance(config.name, gi, n, "CPU", 0) for n in range(count)]
    return out


def instance_device(args: Mapping[str, str]) -> str:
    """The torch device string of a Python-backend instance from its initialize() args: 'cuda:<id>' for
    a GPU instance, 'cpu' otherwise. The model must also make it the current device
    (`torch.cuda.set_device`) before allocating or capturing CUDA graphs: streams and graph pools
    default to the current device, which is GPU 0 in every instance's process."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "cpu"
