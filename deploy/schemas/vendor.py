"""Re-make the vendored schemas of the custom resources (and compose) that tests/test_deploy.py validates
our manifests against. Kubernetes' own kinds need none: kubernetes-validate ships their schemas.

    python deploy/schemas/vendor.py OUT=GIT_DIR ...   # e.g. kserve_inferenceservice_v1beta1.json=~/src/kserve/.git
    python deploy/schemas/vendor.py tritonserver SERVER_GIT_DIR PYTHON_BACKEND_GIT_DIR

Each source is read at its pinned ref with `git show` (any clone of the repository will do). Each output
is the upstream openAPIV3Schema of one CRD version (or the compose spec), as JSON, with `description`
fields dropped (they are most of the bytes and no part of validation) and, for KServe's
InferenceService, pruned to what an InferenceService of ours can use (below). The source repository,
ref, path and commit are written into the file's `$comment`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# out file -> (repository, tag, path in it, CRD version or None for a plain JSON schema)
SOURCES = {
    "kserve_inferenceservice_v1beta1.json": (
        "kserve/kserve", "v0.20.0", "config/crd/full/serving.kserve.io_inferenceservices.yaml", "v1beta1"),
    "keda_scaledobject_v1alpha1.json": (
        "kedacore/keda", "v2.20.2", "config/crd/bases/keda.sh_scaledobjects.yaml", "v1alpha1"),
    "monitoring_servicemonitor_v1.json": (
        "prometheus-operator/prometheus-operator", "v0.93.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "v1"),
    "monitoring_podmonitor_v1.json": (
        "prometheus-operator/prometheus-operator", "v0.93.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    "compose-spec.json": (
        "compose-spec/compose-spec", "170098ba07d9f53c383a41bfd4c5166b0a4529a6", "schema/compose-spec.json", None),
}

# InferenceService: the full CRD is 2 MB, mostly the same PodSpec repeated for predictor, transformer,
# explainer, canary and every framework shortcut. Kept: metadata, and spec.predictor without the fields
# listed here (a manifest using one of them fails validation: re-vendor with it kept to use it).
ISVC_DROP_SPEC = ("transformer", "explainer", "canary")
ISVC_DROP_PREDICTOR = ("workerSpec", "containers", "initContainers", "affinity", "ephemeralContainers",
                       "huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn", "tensorflow",
                       "triton", "xgboost")  # ours uses predictor.model with modelFormat triton


def strip_descriptions(node, names: bool = False):
    """Drop the `description` annotations; a property that happens to be named "description" (a key of
    a `properties` map, names=True) stays."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v, k in ("properties", "patternProperties", "definitions", "$defs"))
                for k, v in node.items() if names or k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def crd_schema(crd: dict, version: str) -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def prune_inferenceservice(schema: dict) -> dict:
    schema["properties"].pop("status", None)  # written by the controller, never by us
    spec = schema["properties"]["spec"]["properties"]
    for k in ISVC_DROP_SPEC:
        spec.pop(k)
    predictor = spec["predictor"]["properties"]
    for k in ISVC_DROP_PREDICTOR:
        predictor.pop(k, None)
    return schema


def vendor(out: str, git_dir: Path) -> Path:
    repo, ref, path, version = SOURCES[out]
    git = ["git", "--git-dir", str(git_dir)]
    text = subprocess.run([*git, "show", f"{ref}:{path}"], capture_output=True, text=True, check=True).stdout
    commit = subprocess.run([*git, "rev-parse", f"{ref}^{{commit}}"], capture_output=True, text=True,
                            check=True).stdout.strip()
    if version is None:
        schema = json.loads(text)
    else:
        schema = crd_schema(yaml.safe_load(text), version)
        if out.startswith("kserve_inferenceservice"):
            schema = prune_inferenceservice(schema)
    schema = strip_descriptions(schema)
    pruned = (" pruned to spec.predictor without " + ", ".join(ISVC_DROP_PREDICTOR)) if out.startswith("kserve") else ""
    schema = {"$comment": f"https://github.com/{repo}/blob/{ref}/{path} (commit {commit}), CRD version "
                          f"{version or '-'}; descriptions dropped{pruned}; made by deploy/schemas/vendor.py", **schema}
    dst = HERE / out
    dst.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    return dst


# tritonserver's command line: the option names, restricted-API categories and Python backend settings of
# the release the container is built on, read from its C++ source (tests/test_container.py checks every
# flag the entrypoint passes against them).
TRITONSERVER = ("tritonserver-2.71.0.json", "triton-inference-server/server", "v2.71.0",
                "triton-inference-server/python_backend", "r26.07")


def vendor_tritonserver(server_git: Path, python_backend_git: Path) -> Path:
    out, repo, tag, pb_repo, pb_ref = TRITONSERVER

    def show(git_dir: Path, ref: str, path: str) -> str:
        return subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{ref}:{path}"], capture_output=True,
                              text=True, check=True).stdout

    parser = show(server_git, tag, "src/command_line_parser.cc")
    restricted = show(server_git, tag, "src/restricted_features.h")
    python_be = show(python_backend_git, pb_ref, "src/python_be.cc")
    categories = restricted[restricted.index("RESTRICTED_CATEGORY_NAMES"):].split("}", 1)[0]
    data = {
        "$comment": f"https://github.com/{repo}/blob/{tag}/src/command_line_parser.cc and src/restricted_features.h, "
                    f"https://github.com/{pb_repo}/blob/{pb_ref}/src/python_be.cc; made by deploy/schemas/vendor.py",
        "options": sorted(set(re.findall(r'\{OPTION_[A-Z0-9_]+,\s*"([a-z0-9-]+)"', parser))),
        "restricted_categories": re.findall(r'"([a-z-]+)"', categories),
        "python_backend_config": sorted(set(re.findall(r'"(shm-[a-z-]+)"', python_be))),
    }
    dst = HERE / out
    dst.write_text(json.dumps(data, indent=1) + "\n")
    return dst


def main(argv: list[str]) -> int:
    if argv[:1] == ["tritonserver"]:  # vendor.py tritonserver SERVER_GIT_DIR PYTHON_BACKEND_GIT_DIR
        print(vendor_tritonserver(Path(argv[1]).expanduser(), Path(argv[2]).expanduser()))
        return 0
    for arg in argv:
        out, _, git_dir = arg.partition("=")
        if out not in SOURCES or not git_dir:
            print(f"usage: vendor.py OUT=GIT_DIR ... with OUT one of {sorted(SOURCES)}", file=sys.stderr)
            return 2
        print(vendor(out, Path(git_dir).expanduser()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
