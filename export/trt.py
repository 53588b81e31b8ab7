"""`make export-trt`: build TensorRT engines of an encoder's ONNX, write their config.pbtxt and build
manifests into a separate model repository (model_repository_trt/), and check parity against ONNX
Runtime on the golden inputs.

    python -m export.trt [--precision fp16|fp32|int8] [--workspace-gb N] [--out-repo DIR]
    python -m export.trt --check [--out-repo DIR]     # manifests vs this host, exit 1 on problems
    python -m export.trt --make-int8-source           # only the symmetric int8 ONNX of int8 engines

Engines only load on the TensorRT version that built them, so build them inside the image matching
the serving container (docker/build_engines.sh, `make export-trt-docker`). Without TensorRT this
command stops with exit code 2 and says so: no silent skip, never a fake engine.

Written against the TensorRT Python API of 10.x (and its 11.x changes); TensorRT was not available
on the machines this was developed on, so only the TensorRT-free parts are tested there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from export.specs import ENCODERS, EncoderSpec, Tolerance
from export.trt_config import write_trt_config
from export.trt_manifest import (  # noqa: F401  (check_engine_compat is part of this module's API)
    Gpu, Manifest, check_engine_compat, check_repository, detect_gpus, manifest_path, repo_relative,
    sha256_file, write_manifest,
)
from export.trt_int8 import ensure_int8_source, int8_onnx_problems
from export.trt_options import (
    BUILD_IMAGE, DEFAULT_OUT_REPO, DEFAULT_PRECISION, DEFAULT_WORKSPACE_GB, GOLDEN_DIR, INT8_SYMMETRIC, PRECISIONS,
    SERVING_IMAGE, SPEC_PRECISION, build_options, engine_filename, engine_model_name,
    profile_shapes, source_onnx, timing_cache_path as default_timing_cache_path,
)

EXIT_NO_TENSORRT = 2
# TensorRT DataType member name -> Triton data type name (config.pbtxt without TYPE_).
TRT_TO_TRITON = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "UINT8": "UINT8",
                 "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL"}
NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


class TensorRTMissing(RuntimeError):
    pass


class ParityError(AssertionError):
    pass


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissing(
            f"TensorRT's Python package is not importable here ({type(e).__name__}: {e}).\n"
            f"A TensorRT engine must be built by the TensorRT version that serves it (that of {SERVING_IMAGE}). "
            f"Build it in {BUILD_IMAGE} (the same release, the same TensorRT) with\n"
            f"    make export-trt-docker        # = bash docker/build_engines.sh\n"
            f"or install the tensorrt Python package matching the serving container and a CUDA GPU. "
            f"No engine was written.") from e
    return tensorrt


def build_gpu() -> Gpu:
    """The GPU the engine is built for; every visible GPU must share one architecture."""
    gpus = detect_gpus()
    if not gpus:
        raise RuntimeError("no NVIDIA GPU visible (nvidia-smi / torch.cuda found none): TensorRT builds need one")
    ccs = sorted({g.compute_capability for g in gpus})
    if len(ccs) > 1:
        raise RuntimeError(f"GPUs of several architectures are visible ({ccs}): make one visible "
                           f"(docker run --gpus device=N, GPU=N bash docker/build_engines.sh) and build once per GPU")
    return gpus[0]


def atomic_write(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def network_io(network) -> tuple[dict[str, str], dict[str, str]]:
    """({input: Triton dtype}, {output: Triton dtype}) of a parsed network."""
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    return ({t.name: TRT_TO_TRITON.get(t.dtype.name, t.dtype.name) for t in ins},
            {t.name: TRT_TO_TRITON.get(t.dtype.name, t.dtype.name) for t in outs})


def io_mismatches(inputs: dict[str, str], outputs: dict[str, str], config_io: dict[str, str]) -> list[str]:
    """Where a parsed network disagrees with the model config it will be served with: every network
    input and every config tensor must exist on both sides with the same dtype (the config may list a
    subset of the outputs)."""
    network = inputs | outputs
    problems = [f"network input {n} ({d}) is not in the config" for n, d in inputs.items() if n not in config_io]
    for n, d in config_io.items():
        if n not in network:
            problems.append(f"config tensor {n} ({d}) is not in the network (has {sorted(network)})")
        elif network[n] != d:
            problems.append(f"{n}: network dtype {network[n]} != config {d}")
    return problems


def build_engine(onnx_path: Path, spec: EncoderSpec, precision: str, out_dir: Path, workspace_bytes: int,
                 timing_cache_path: Path | None = None, gpu: Gpu | None = None,
                 io_dtypes: dict[str, str] | None = None) -> Path:
    """Build one engine from `onnx_path` into out_dir/model_sm<cc>.plan plus its build manifest.

    Profile from the spec (profile_shapes), workspace pool limit, timing cache loaded from and saved to
    `timing_cache_path` (default: one per TensorRT version and GPU architecture), precision recipe from
    build_options(tensorrt.__version__, precision). Every ONNX parser error is printed; a failed parse
    or build raises. `io_dtypes` ({name: Triton dtype}, from the ONNX model's config) must match the
    parsed network, so the engine fits the config it will be served with. Returns the engine path.
    """
    trt = import_tensorrt()
    gpu = gpu or build_gpu()
    opts = build_options(trt.__version__, precision)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    assert onnx_path.exists(), f"{onnx_path} not found: run `make export` first"
    timing_cache_path = Path(timing_cache_path or default_timing_cache_path(trt.__version__, gpu.compute_capability))
    t0 = time.time()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for f in opts.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so ONNX external data next to the file is found.
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for e in errors:
        print(f"ONNX parser error ({onnx_path.name}): {e}", file=sys.stderr)
    if not parsed or errors:
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {len(errors)} parser error(s), printed above")
    if io_dtypes is not None:
        problems = io_mismatches(*network_io(network), io_dtypes)
        if problems:
            raise RuntimeError(f"{onnx_path} does not fit its model config:\n  " + "\n  ".join(problems))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for f in opts.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in opts.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, f))
    shapes = profile_shapes(spec)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        # A cache from another device/version is refused: start a fresh one rather than fail.
        print(f"timing cache {timing_cache_path} does not match this device/TensorRT; starting a new one",
              file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(timing_cache_path, config.get_timing_cache().serialize())

    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / engine_filename(gpu.compute_capability)
    atomic_write(engine_path, plan)
    manifest = Manifest(
        model=out_dir.parent.name, engine_file=engine_path.name, engine_sha256=sha256_file(engine_path),
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, tensorrt_version=trt.__version__,
        precision=precision, build_options=asdict(opts),
        profiles={name: [list(s) for s in mmm] for name, mmm in shapes.items()},
        max_batch_size=spec.max_batch_size, source_onnx=repo_relative(onnx_path),
        source_onnx_sha256=sha256_file(onnx_path), workspace_bytes=workspace_bytes,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), build_seconds=round(time.time() - t0, 1),
    )
    write_manifest(manifest, manifest_path(engine_path))
    print(f"built {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB, {precision}, TensorRT "
          f"{trt.__version__}, {gpu.name} sm{gpu.compute_capability}) in {manifest.build_seconds} s")
    return engine_path


# ---- parity


def diff_stats(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """(max abs diff, min per-sequence cosine), in float64, as export/validate.py measures the ONNX
    variants against the spec tolerances. ref/got: [B, S, ...] with mask [B, S] (padded positions
    count as equal), or [B, ...] with mask None."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    if mask is not None:
        valid = mask.astype(bool)[(...,) + (None,) * (r.ndim - 2)]  # [B, S, 1...]
        r, g = r * valid, g * valid
    r, g = r.reshape(len(r), -1), g.reshape(len(g), -1)  # [B, S*H]
    cos = (r * g).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-30)
    return float(np.abs(r - g).max()), float(cos.min())


def parity_problems(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: Tolerance,
                    mask: np.ndarray | None = None) -> list[str]:
    """One line per reference output outside `tolerance` (or missing, or of another shape); empty when all
    pass. `mask` ([B, S] attention mask) restricts outputs with a sequence axis to valid tokens."""
    problems = []
    for name, r in ref.items():
        if name not in got:
            problems.append(f"{name}: missing from the engine outputs (has {sorted(got)})")
        elif got[name].shape != r.shape:
            problems.append(f"{name}: shape {got[name].shape} != reference {r.shape}")
        else:
            max_abs, cosine = diff_stats(r, got[name], mask if r.ndim >= 3 else None)
            # `not <=` so that NaN fails
            if not (max_abs <= tolerance.max_abs and cosine >= tolerance.min_cosine):
                problems.append(f"{name}: max abs diff {max_abs:.3g} (limit {tolerance.max_abs}), min cosine "
                                f"{cosine:.6f} (limit {tolerance.min_cosine})")
    return problems


def load_golden(path: Path, spec: EncoderSpec) -> dict[str, np.ndarray]:
    """The spec's inputs from a golden file of export/golden.py (arrays `input.<name>`), read directly:
    export.golden imports torch, which the TensorRT build image does not have."""
    assert Path(path).exists(), f"{path} not found: `make export` writes the golden files"
    with np.load(path, allow_pickle=False) as data:
        missing = [t.name for t in spec.inputs if f"input.{t.name}" not in data.files]
        assert not missing, f"{path}: no input arrays {missing} (has {data.files})"
        # The engine's input dtypes are the config's: cast so a golden file saved as int32 still feeds.
        feeds = {t.name: data[f"input.{t.name}"].astype(NUMPY_DTYPES[t.dtype]) for t in spec.inputs}
    for name, a in feeds.items():
        lo, _, hi = profile_shapes(spec)[name]
        assert all(l <= n <= h for l, n, h in zip(lo, a.shape, hi)), f"golden {name} shape {a.shape} outside {lo}..{hi}"
    return feeds


def run_engine(engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine on host arrays (Polygraphy's TrtRunner moves them to and from the GPU)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(Path(engine_path).read_bytes())) as runner:
        return {k: np.array(v) for k, v in runner.infer(feed_dict=feeds).items()}


def run_onnxruntime(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def check_parity(engine_path: Path, onnx_path: Path, golden: Path, spec: EncoderSpec, precision: str) -> list[str]:
    """Engine vs ONNX Runtime (the ONNX the engine was built from) on the golden inputs, with the spec's
    tolerance for `precision`. Raises ParityError on a mismatch; returns the per-output report lines."""
    feeds = load_golden(golden, spec)
    mask = feeds.get("attention_mask")
    ref = run_onnxruntime(onnx_path, feeds)
    got = run_engine(engine_path, feeds)
    tolerance = spec.tolerances[SPEC_PRECISION[precision]]
    problems = parity_problems(ref, got, tolerance, mask)
    if problems:
        raise ParityError(f"{engine_path} differs from ONNX Runtime on {golden}:\n  " + "\n  ".join(problems))
    stats = {k: diff_stats(ref[k], got[k], mask if ref[k].ndim >= 3 else None) for k in ref}
    return [f"{k}: max abs diff {a:.3g}, min cosine {c:.6f}" for k, (a, c) in stats.items()]


# ---- the command


def export_trt(spec: EncoderSpec, precision: str = DEFAULT_PRECISION, out_repo: Path = DEFAULT_OUT_REPO,
               workspace_bytes: int = DEFAULT_WORKSPACE_GB << 30, timing_cache: Path | None = None,
               golden: Path | None = None) -> Path:
    """Build, parity-check and publish one engine; returns the engine model's directory.

    A parity failure deletes the new engine and its manifest, so no unchecked engine is served.
    """
    trt = import_tensorrt()
    opts = build_options(trt.__version__, precision)
    onnx_path, fp32_onnx = source_onnx(spec, opts.onnx_precision), source_onnx(spec, "fp32")
    if opts.onnx_precision == INT8_SYMMETRIC:  # a build input, made (or found up to date) from the fp32 ONNX
        ensure_int8_source(spec, fp32_onnx, onnx_path, spec.tolerances[SPEC_PRECISION[precision]])
    # The served ONNX model whose config (instance count) the engine model copies: a build input has
    # none, so its fp32 origin's.
    onnx_model_dir = (fp32_onnx if opts.onnx_precision == INT8_SYMMETRIC else onnx_path).parent.parent
    assert onnx_path.exists(), f"{onnx_path} not found: run `make export` (writes the ONNX variants) first"
    if precision == "int8":
        import onnx

        # A guard on the file actually parsed: TensorRT would reject it later with a less clear message.
        problems = int8_onnx_problems(onnx.load(str(onnx_path), load_external_data=False))
        if problems:
            raise RuntimeError(f"{onnx_path} cannot become a TensorRT int8 engine:\n  " + "\n  ".join(problems))
    # The engine must fit the config it is served with (trt_config: the spec's inputs and outputs).
    io_dtypes = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
    model_dir = Path(out_repo) / engine_model_name(spec, precision)
    engine = build_engine(onnx_path, spec, precision, model_dir / "1", workspace_bytes, timing_cache,
                          io_dtypes=io_dtypes)
    try:
        report = check_parity(engine, onnx_path, golden or GOLDEN_DIR / f"{spec.name}.npz", spec, precision)
    except BaseException:
        engine.unlink(missing_ok=True)
        manifest_path(engine).unlink(missing_ok=True)
        raise
    print("parity vs ONNX Runtime: " + "; ".join(report))
    print(f"wrote {write_trt_config(spec, model_dir, onnx_model_dir)}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=sorted(ENCODERS))
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS)
    p.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="TensorRT workspace pool limit")
    p.add_argument("--out-repo", type=Path, default=DEFAULT_OUT_REPO, help="model repository for engine models")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="default: build/trt_timing_cache/trt<ver>_sm<cc>.cache")
    p.add_argument("--golden", type=Path, default=None, help="default: tests/golden/<model>.npz")
    p.add_argument("--check", action="store_true", help="only check the engines in --out-repo against this host")
    p.add_argument("--make-int8-source", action="store_true",
                   help="only make (or confirm up to date) the symmetric int8 Q/DQ ONNX that --precision int8 "
                        "builds from; needs no TensorRT (run it on the host: the build image has no tokenizer)")
    args = p.parse_args(argv)

    if args.make_int8_source:
        spec = ENCODERS[args.model]
        ensure_int8_source(spec, source_onnx(spec, "fp32"), source_onnx(spec, INT8_SYMMETRIC),
                           spec.tolerances[SPEC_PRECISION["int8"]])
        return 0

    if args.check:
        results = check_repository(args.out_repo) if args.out_repo.is_dir() else {}
        if not results:
            print(f"no models in {args.out_repo}", file=sys.stderr)
            return 1
        for model, problems in results.items():
            print(f"{model}: " + ("ok" if not problems else "\n  " + "\n  ".join(problems)))
        return 1 if any(results.values()) else 0
    try:
        export_trt(ENCODERS[args.model], args.precision, args.out_repo, int(args.workspace_gb * (1 << 30)),
                   args.timing_cache, args.golden)
    except TensorRTMissing as e:
        print(f"export.trt: {e}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    return 0


if __name__ == "__main__":
    sys.exit(main())
