"""deploy/k8s: every object valid against the Kubernetes schemas, wired together, secrets kept secret.

Offline: kubernetes-validate ships the API schemas, so no cluster is needed. Objects of
custom resources (KEDA's ScaledObject, prometheus-operator's PodMonitor) have no schema
there and are checked field by field against what they point at.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_render import (
    CUSTOM_API_GROUPS,
    DEPLOY,
    JOBS,
    K8S,
    KUSTOMIZATIONS,
    Object,
    build,
    containers,
    find,
    load,
    pod_spec,
    secret_data,
    sources,
    workloads,
)

from featurestore import metrics
from featurestore.serving.server import SERVICE_NAME

# The oldest Kubernetes the manifests support (native gRPC probes, podFailurePolicy,
# backoffLimitPerIndex, matchLabelKeys) and the newest the package has schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
IN_FLIGHT_METRIC = "featurestore_in_flight_requests"
SECRET_NAMES = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|DSN|REDIS_URL|CREDENTIAL", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)

SOURCES = list(sources())
OBJECTS = [(name, obj) for name, objects in SOURCES for obj in objects]
BASE = build(K8S / "base")


def _id(obj: Object) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"


def _source_id(value: Any) -> str:
    """Parameter ids: the source's name; the objects themselves stay out of the id."""
    return value if isinstance(value, str) else ""


def _is_custom(obj: Object) -> bool:
    return str(obj["apiVersion"]).startswith(CUSTOM_API_GROUPS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("source", "obj"),
    [pytest.param(s, o, id=f"{s}:{_id(o)}") for s, o in OBJECTS if not _is_custom(o)],
)
def test_every_object_validates_against_the_kubernetes_schemas(source: str, obj: Object, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{source} {_id(obj)} is not a valid Kubernetes {version} object: {exc.message}")


def test_the_validator_refuses_what_kubernetes_would() -> None:
    deployment = find(BASE, "Deployment", "featurestore")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"  # must be a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 20  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: str(f.relative_to(DEPLOY)))
def test_every_yaml_file_of_a_kustomization_folder_is_used(folder: Any) -> None:
    kustomization = load(folder / "kustomization.yaml")[0]
    used = {*kustomization.get("resources", []), *(p["path"] for p in kustomization.get("patches", []))}
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert files <= used, f"{folder}: files no kustomization uses: {sorted(files - used)}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda f: str(f.relative_to(DEPLOY)))
def test_our_build_of_each_kustomization_equals_kubectl_kustomize(folder: Any) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = sorted((o for o in yaml.safe_load_all(done.stdout) if o), key=_id)
    ours = sorted(build(folder), key=_id)
    assert [_id(o) for o in ours] == [_id(o) for o in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert mine == real, _id(mine)


def test_secrets_live_only_in_secret_objects() -> None:
    for source, obj in OBJECTS:
        if obj["kind"] == "Secret":
            continue
        for path, value in _leaves(obj):
            assert not URL_WITH_PASSWORD.search(str(value)), f"{source} {_id(obj)} {path}: a password in a URL"
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                assert not SECRET_NAMES.search(key), f"{source} {_id(obj)}: {key} belongs in a Secret"
        for container in containers(obj):
            for var in container.get("env", []):
                if SECRET_NAMES.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{source} {_id(obj)}: {var['name']}"


def test_the_secret_check_finds_a_password_in_a_config_map() -> None:
    leaked = {"kind": "ConfigMap", "data": {"FEATURESTORE_HOST": "redis://:hunter2@redis:6379/0"}}
    assert any(URL_WITH_PASSWORD.search(str(v)) for _, v in _leaves(leaked))
    assert SECRET_NAMES.search("FEATURESTORE_DSN") and SECRET_NAMES.search("FEATURESTORE_REDIS_URL")


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


@pytest.mark.parametrize(("source", "workload", "context"), list(workloads()), ids=_source_id)
def test_every_reference_of_a_workload_exists(source: str, workload: Object, context: list[Object]) -> None:
    spec = pod_spec(workload)
    assert spec is not None
    assert find(context, "ServiceAccount", spec["serviceAccountName"])
    for container in containers(workload):
        for ref in container.get("envFrom", []):
            kind, name = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref else ("Secret", "")
            assert find(context, kind, name or ref["secretRef"]["name"])
        for var in container.get("env", []):
            key_ref = var.get("valueFrom", {}).get("secretKeyRef")
            if key_ref:
                secret = find(context, "Secret", key_ref["name"])
                assert key_ref["key"] in secret_data(secret), var["name"]


@pytest.mark.parametrize(("source", "workload", "context"), list(workloads()), ids=_source_id)
def test_every_pod_runs_locked_down(source: str, workload: Object, context: list[Object]) -> None:
    spec = pod_spec(workload)
    assert spec is not None
    where = f"{source} {_id(workload)}"
    # A Service named featurestore would otherwise set FEATURESTORE_PORT=tcp://... in the pod,
    # which the server reads as its port.
    assert spec["enableServiceLinks"] is False, where
    assert spec["automountServiceAccountToken"] is False, where
    assert spec["securityContext"]["runAsNonRoot"] is True, where
    assert spec["securityContext"]["runAsUser"] != 0, where
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
    for container in containers(workload):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        assert {"/tmp"} <= {m["mountPath"] for m in container.get("volumeMounts", [])}, f"{where}: /tmp"
        for need in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][need]), f"{where}: resources.{need}"


def _labels(selector: Object) -> dict[str, str]:
    return dict(selector["matchLabels"])


@pytest.mark.parametrize(("source", "objects"), SOURCES[: len(KUSTOMIZATIONS)], ids=_source_id)
def test_the_server_deployment_probes_spreads_and_drains(source: str, objects: list[Object]) -> None:
    deployment = find(objects, "Deployment", "featurestore")
    spec = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _labels(deployment["spec"]["selector"]).items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas"
    (server,) = spec["containers"]
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port, probe
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert server["livenessProbe"]["grpc"].get("service", "") == ""
    # A draining pod answers NOT_SERVING: liveness must outlast the whole drain.
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > spec["terminationGracePeriodSeconds"]
    spread = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert spread == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spec["topologySpreadConstraints"]:
        assert _labels(constraint["labelSelector"]).items() <= labels.items()


@pytest.mark.parametrize(("source", "objects"), SOURCES[: len(KUSTOMIZATIONS)], ids=_source_id)
def test_the_service_is_headless_and_selects_the_servers(source: str, objects: list[Object]) -> None:
    service = find(objects, "Service", "featurestore")
    deployment = find(objects, "Deployment", "featurestore")
    assert service["spec"]["clusterIP"] == "None", "client-side round_robin needs every pod's address"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    pdb = find(objects, "PodDisruptionBudget", "featurestore")
    assert _labels(pdb["spec"]["selector"]).items() <= labels.items()


def _autoscaler_of(objects: list[Object]) -> Object:
    scalers = [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(scalers) == 1, f"one autoscaler per fleet, not {[_id(s) for s in scalers]}"
    return scalers[0]


@pytest.mark.parametrize(("source", "objects"), SOURCES[: len(KUSTOMIZATIONS)], ids=_source_id)
def test_one_autoscaler_scales_the_deployment_on_calls_in_flight(source: str, objects: list[Object]) -> None:
    scaler = _autoscaler_of(objects)
    target = scaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "featurestore")
    if scaler["kind"] == "HorizontalPodAutoscaler":
        (metric,) = scaler["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == IN_FLIGHT_METRIC
        assert scaler["spec"]["minReplicas"] >= 2, "one pod is no fleet (and the PDB would block every drain)"
    else:
        assert scaler["apiVersion"] == "keda.sh/v1alpha1"
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        assert IN_FLIGHT_METRIC in trigger["metadata"]["query"]
        assert float(trigger["metadata"]["threshold"]) > 0
        assert scaler["spec"]["minReplicaCount"] >= 2


def test_the_adapter_rule_and_the_pod_monitor_expose_the_gauge() -> None:
    values = load(K8S / "monitoring" / "prometheus-adapter-values.yaml")[0]
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(IN_FLIGHT_METRIC + "{")
    assert rule["name"]["as"] == IN_FLIGHT_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    monitor = load(K8S / "monitoring" / "podmonitor.yaml")[0]
    deployment = find(BASE, "Deployment", "featurestore")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _labels(monitor["spec"]["selector"]).items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= port_names


def test_the_server_exports_the_gauge_the_autoscaler_reads() -> None:
    names = {getattr(m, "_name", None) for m in vars(metrics).values()}
    if IN_FLIGHT_METRIC not in names:
        pytest.skip(f"featurestore.metrics has no {IN_FLIGHT_METRIC} yet (it comes with --max-in-flight)")
    assert IN_FLIGHT_METRIC in names


def test_the_incremental_cron_job_never_overlaps_and_fails_fast_on_bad_configuration() -> None:
    cron = find(BASE, "CronJob", "featurestore-materialize")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    failing = {
        code
        for rule in job["podFailurePolicy"]["rules"]
        if rule["action"] == "FailJob"
        for code in rule["onExitCodes"]["values"]
    }
    assert failing == {2, 3, 5}  # materialize/__main__.py: bad arguments, bad configuration, lock held


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_the_sharded_backfill_is_an_indexed_job_with_one_shard_per_index(path: Any) -> None:
    (job,) = load(path)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert int(env["FEATURESTORE_SHARD_COUNT"]) == spec["completions"] == spec["parallelism"]
    assert "JOB_COMPLETION_INDEX" not in env, "Kubernetes sets it per pod"
