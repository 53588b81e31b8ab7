"""`kustomize build` for the subset of kustomize that deploy/k8s/ uses, in Python, for hosts without a
kustomize binary (`kubectl kustomize` or `kustomize`). tests/test_deploy.py renders with the binary when
there is one and then also checks that this renderer gives the same objects, so the fallback is
verified wherever both exist.

Supported kustomization fields: resources (files and directories), namespace, images (name -> newName,
newTag on pod-template containers), patches (a strategic-merge patch file or inline patch matched by
kind and name, or an inline JSON 6902 patch with a target). Anything else raises: the fallback never
renders something the binary would render differently without saying so.
"""
from __future__ import annotations

import copy
import subprocess
import shutil
from pathlib import Path

import yaml

FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "ClusterServingRuntime"}


class Unsupported(ValueError):
    pass


def binary() -> list[str] | None:
    """The kustomize command on this host, if any."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def build_with_binary(directory: Path) -> list[dict]:
    cmd = binary()
    assert cmd, "no kustomize binary"
    out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {directory}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def build(directory: Path) -> list[dict]:
    directory = Path(directory)
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - FIELDS
    if unknown:
        raise Unsupported(f"{directory}/kustomization.yaml: {sorted(unknown)} not supported by tests/kustomize_lite.py")
    objects: list[dict] = []
    for r in k.get("resources", []):
        path = directory / r
        objects += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for p in k.get("patches", []):
        apply_patch(objects, directory, p)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = k["namespace"]
    for image in k.get("images", []):
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict], directory: Path, p: dict) -> None:
    if set(p) - {"path", "patch", "target"}:
        raise Unsupported(f"patch fields {sorted(set(p))}")
    body = yaml.safe_load((directory / p["path"]).read_text() if "path" in p else p["patch"])
    if isinstance(body, list):  # JSON 6902
        target = p.get("target") or {}
        matched = [o for o in objects if matches(o, target)]
        if len(matched) != 1:
            raise ValueError(f"JSON 6902 patch target {target} matched {len(matched)} objects")
        for op in body:
            json6902(matched[0], op)
        return
    target = p.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    matched = [o for o in objects if matches(o, target)]
    if len(matched) != 1:
        raise ValueError(f"strategic merge patch for {target} matched {len(matched)} objects")
    merged = merge(matched[0], body)
    matched[0].clear()
    matched[0].update(merged)


def matches(o: dict, target: dict) -> bool:
    group, _, version = o["apiVersion"].rpartition("/")
    return all([target.get("kind", o["kind"]) == o["kind"],
                target.get("name", o["metadata"]["name"]) == o["metadata"]["name"],
                target.get("group", group) == group, target.get("version", version) == version])


def merge(base, patch):
    """Strategic merge for what our patches use: maps merge (null deletes a key), lists of named items
    merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise Unsupported(f"patch directives {[k for k in patch if k.startswith('$')]}")
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and named(base) and named(patch):
        out = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def json6902(o: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = o
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    key = (len(parent) if last == "-" else int(last)) if isinstance(parent, list) else last
    if op["op"] == "remove":
        del parent[key]
    elif op["op"] == "replace":
        if isinstance(parent, dict) and key not in parent:
            raise ValueError(f"replace {op['path']}: no such field")
        parent[key] = op["value"]
    elif op["op"] == "add":
        if isinstance(parent, list):
            parent.insert(key, op["value"])
        else:
            parent[key] = op["value"]
    else:
        raise Unsupported(f"JSON 6902 op {op['op']}")


def split_image(ref: str) -> tuple[str, str | None]:
    """'reg:5000/app:1.2@sha256:...' -> ('reg:5000/app', '1.2')."""
    ref = ref.split("@")[0]
    head, _, last = ref.rpartition("/")
    name, _, tag = last.partition(":")
    return (f"{head}/" if head else "") + name, tag or None


def set_image(objects: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise Unsupported(f"images fields {sorted(image)}")
    for o in objects:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = split_image(c["image"])
            if name == image["name"]:
                tag = image.get("newTag", tag)
                c["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
