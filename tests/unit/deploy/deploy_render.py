"""Read deploy/ the way Kubernetes would: kustomizations built, containers' command lines rendered.

    objects = build(K8S / "base")                 # what `kubectl kustomize deploy/k8s/base` gives
    for source, workload, pod in workloads():     # every Deployment, CronJob and Job
        for container in pod["containers"]:
            line = command_line(container, pod_environment(...))

The builder implements the part of kustomize these files use (resources, namespace,
labels, images, strategic-merge patches with merge-by-name lists and `$patch: delete`);
tests/unit/deploy/test_manifests.py compares it with `kubectl kustomize` where kubectl is
installed, so it cannot drift from the real thing unnoticed.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
KUSTOMIZATIONS = (K8S / "base", K8S / "overlays" / "keda", K8S / "overlays" / "redis-cluster")
JOBS = tuple(sorted((K8S / "jobs").glob("*.yaml")))
# Objects of custom resource definitions: no schema in kubernetes-validate, checked by hand.
CUSTOM_API_GROUPS = ("keda.sh/", "monitoring.coreos.com/")

Object = dict[str, Any]


def load(path: Path) -> list[Object]:
    """The YAML documents of `path`, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build(folder: Path) -> list[Object]:
    """The objects the kustomization in `folder` produces."""
    kustomization = load(folder / "kustomization.yaml")[0]
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        objects += build(path) if path.is_dir() else load(path)
    for patch in kustomization.get("patches", []):
        objects = _patched(objects, load(folder / patch["path"])[0])
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if "namespace" in kustomization:
            metadata["namespace"] = kustomization["namespace"]
        for labels in kustomization.get("labels", []):
            metadata.setdefault("labels", {}).update(labels["pairs"])
        for image in kustomization.get("images", []):
            for container in containers(obj):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def _patched(objects: list[Object], patch: Object) -> list[Object]:
    """`objects` with a strategic-merge `patch` applied to the one object it names."""
    key = (patch["kind"], patch["metadata"]["name"])
    targets = [i for i, obj in enumerate(objects) if (obj["kind"], obj["metadata"]["name"]) == key]
    assert len(targets) == 1, f"patch of {key} matches {len(targets)} objects"
    if patch.get("$patch") == "delete":
        return [obj for i, obj in enumerate(objects) if i != targets[0]]
    merged = list(objects)
    merged[targets[0]] = _merge(objects[targets[0]], patch)
    return merged


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as these files need it: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        out_list = list(base)
        for item in patch:
            at = [i for i, x in enumerate(out_list) if isinstance(x, dict) and x.get("name") == item["name"]]
            if at:
                out_list[at[0]] = _merge(out_list[at[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def sources() -> Iterator[tuple[str, list[Object]]]:
    """(name, objects) of every kustomization and every standalone job file."""
    for folder in KUSTOMIZATIONS:
        yield str(folder.relative_to(DEPLOY)), build(folder)
    for path in JOBS:
        yield str(path.relative_to(DEPLOY)), load(path)


def pod_spec(obj: Object) -> Object | None:
    """The pod template's spec of a workload; None for other kinds."""
    if obj["kind"] in ("Deployment", "Job"):
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def containers(obj: Object) -> list[Object]:
    spec = pod_spec(obj)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def workloads() -> Iterator[tuple[str, Object, list[Object]]]:
    """(source, workload, the objects it is deployed with) for every Deployment, CronJob and Job.

    A standalone job file is deployed with the base's ConfigMaps and Secret.
    """
    base = build(K8S / "base")
    for source, objects in sources():
        context = objects if source.startswith("k8s/base") or source.startswith("k8s/overlays") else base + objects
        for obj in objects:
            if pod_spec(obj) is not None:
                yield source, obj, context


def find(objects: list[Object], kind: str, name: str) -> Object:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def secret_data(secret: Object) -> dict[str, str]:
    """A Secret's values as text (stringData; data is base64)."""
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**data, **secret.get("stringData", {})}


def container_environment(container: Object, context: list[Object], extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment Kubernetes gives `container`: envFrom in order, then env (which wins), then `extra`
    (what Kubernetes adds itself, e.g. JOB_COMPLETION_INDEX)."""
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environ.update(find(context, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            environ.update(secret_data(find(context, "Secret", source["secretRef"]["name"])))
    for var in container.get("env", []):
        environ[var["name"]] = _env_value(var, context, environ)
    environ.update(extra)
    return environ


def _env_value(var: Object, context: list[Object], environ: Mapping[str, str]) -> str:
    if "value" in var:
        return expand(var["value"], environ)
    ref = var["valueFrom"]
    if "secretKeyRef" in ref:
        return secret_data(find(context, "Secret", ref["secretKeyRef"]["name"]))[ref["secretKeyRef"]["key"]]
    if "configMapKeyRef" in ref:
        data: dict[str, str] = find(context, "ConfigMap", ref["configMapKeyRef"]["name"])["data"]
        return data[ref["configMapKeyRef"]["key"]]
    raise AssertionError(f"unhandled env source {ref}")


def expand(text: str, environ: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values ($$ escapes; unknown stays)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else environ.get(m.group(1), m.group(0)),
        text,
    )


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of every instruction, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form) of its final stage."""
    import json

    found = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert found, "the Dockerfile has no ENTRYPOINT"
    value = json.loads(found[-1])
    assert isinstance(value, list), "ENTRYPOINT must be in exec form (a JSON list): signals reach the server"
    return [str(v) for v in value]


def command_line(container: Object, environ: Mapping[str, str]) -> list[str]:
    """What the container runs: its command (else the image's entrypoint) then its args, $(VAR) expanded."""
    command = container.get("command") or entrypoint()
    return [expand(str(part), environ) for part in [*command, *container.get("args", [])]]


def shown(line: list[str]) -> str:
    return shlex.join(line)
