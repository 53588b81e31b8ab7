"""Checks that every model in a repository has the files its config needs, before the server loads it.

A missing artifact otherwise shows up as a load failure deep in the server log; here it becomes one
line naming the model, the missing file and the command that makes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export import pbtxt
from serve.paths import PROJECT_BACKENDS

DEFAULT_EXPORT_COMMAND = "make export"
# config `parameters` keys our exporters write so that this check needs no per-model code.
REQUIRED_ARTIFACTS_KEY = "required_artifacts"  # comma-separated paths relative to the model dir
EXPORT_COMMAND_KEY = "export_command"  # the command that makes them
DEFAULT_FILENAMES = {
    "onnxruntime": "model.onnx",
    "onnxruntime_onnx": "model.onnx",
    "tensorrt_plan": "model.plan",
    "tensorrt": "model.plan",
    "python": "model.py",
    "pytorch_libtorch": "model.pt",
}


@dataclass(frozen=True)
class Problem:
    model: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"model '{self.model}': {self.message} (fix: {self.fix})"


def model_dirs(repo: Path) -> list[Path]:
    """Every model directory Triton would load from `repo` (a folder holding config.pbtxt)."""
    return sorted(p.parent for p in repo.glob("*/config.pbtxt"))


def _param(config, key: str) -> str | None:
    p = config.parameters.get(key)
    return p.string_value if p is not None and p.string_value else None


def check_model(model_dir: Path) -> list[Problem]:
    name = model_dir.name
    try:
        config = pbtxt.read(model_dir)
    except Exception as e:  # text_format.ParseError and friends: the message names the line
        return [Problem(name, f"config.pbtxt does not parse: {e}", "regenerate it with " + DEFAULT_EXPORT_COMMAND)]
    fix = _param(config, EXPORT_COMMAND_KEY) or DEFAULT_EXPORT_COMMAND
    if config.name and config.name != name:
        return [Problem(name, f"config name '{config.name}' differs from its directory name", fix)]
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        return [Problem(name, "no version directory (e.g. 1/)", fix)]
    version_dir = model_dir / str(versions[-1])
    kind = config.platform or config.backend

    problems = []
    if kind == "ensemble":
        repo = model_dir.parent
        for step in config.ensemble_scheduling.step:
            if not (repo / step.model_name / "config.pbtxt").exists():
                problems.append(Problem(name, f"ensemble step model '{step.model_name}' is not in the repository", fix))
    elif kind in DEFAULT_FILENAMES:
        files = [config.default_model_filename or DEFAULT_FILENAMES[kind]]
        files += list(config.cc_model_filenames.values())
        # An engine built for several GPUs names one file per compute capability; any one suffices.
        if kind.startswith("tensorrt") and config.cc_model_filenames:
            files = list(config.cc_model_filenames.values())
            if not any((version_dir / f).exists() for f in files):
                problems.append(Problem(name, f"no engine file of {files} in {version_dir}", fix))
        else:
            problems += [
                Problem(name, f"missing {version_dir / f}", fix) for f in files if not (version_dir / f).exists()
            ]
    elif not (PROJECT_BACKENDS / kind / "model.py").exists():
        problems.append(Problem(name, f"backend '{kind}' is neither built in nor in {PROJECT_BACKENDS}", "check the config's backend field"))

    for rel in filter(None, (_param(config, REQUIRED_ARTIFACTS_KEY) or "").split(",")):
        path = model_dir / rel.strip()
        if not path.exists():
            problems.append(Problem(name, f"missing {path}", fix))
    if kind.startswith("tensorrt") and not problems:
        problems += _engine_problems(model_dir)
    return problems


def _engine_problems(model_dir: Path) -> list[Problem]:
    """A TensorRT engine built for another GPU or TensorRT version: say so before the server tries."""
    try:
        from export.trt import check_engine_compat
    except ImportError:
        return []
    return [Problem(model_dir.name, msg, "rebuild the engine for this host: make export-trt-docker (docs/tensorrt.md)") for msg in check_engine_compat(model_dir)]


def check_repository(repo: Path) -> list[Problem]:
    if not repo.is_dir():
        return [Problem("*", f"model repository {repo} does not exist", DEFAULT_EXPORT_COMMAND)]
    dirs = model_dirs(repo)
    if not dirs:
        return [Problem("*", f"model repository {repo} holds no model", DEFAULT_EXPORT_COMMAND)]
    return [p for d in dirs for p in check_model(d)]
