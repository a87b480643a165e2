"""Offline validation of Kubernetes objects for the k8s/ manifests and the Helm chart.

No cluster exists in CI, so an object is checked the three ways an API server would:
core kinds against the pinned Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
fields are errors), RayCluster / RayJob against the KubeRay CRD schemas in
../shared/schemas/kuberay (jsonschema, made strict the same way, since a CRD schema without
``additionalProperties`` would accept any typo), and the KubeRay operator's own admission
rules that no schema expresses (ray-operator/controllers/ray/utils/validation.go, v1.7).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QBERT_SHARED", REPO.parent / "shared"))
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay"
# The Kubernetes version manifests are validated against (kubernetes-validate ships it).
K8S_VERSION = "1.33.0"
RAY_KINDS = {"RayCluster", "RayJob"}
# KubeRay limits (utils/constant.go) and Ray's minimum version for token auth.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = 47
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load_docs(text: str) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a manifest stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def load_manifest_file(path: Path) -> list[dict[str, Any]]:
    return load_docs(path.read_text())


# ---------------------------------------------------------------- CRD schemas


def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI schema where every object with declared properties rejects others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=1)
def _crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators: dict[tuple[str, str], jsonschema.Validator] = {}
    for path in sorted(KUBERAY_SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """Validators per (apiVersion, kind); skips the calling test when the schemas are absent."""
    if not KUBERAY_SCHEMAS.is_dir() or not any(KUBERAY_SCHEMAS.glob("*.yaml")):
        pytest.skip(f"KubeRay CRD schemas not present at {KUBERAY_SCHEMAS} (a fresh clone lacks ../shared)")
    return _crd_validators()


def validate_custom(obj: dict[str, Any]) -> list[str]:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    validator = crd_validators().get(key)
    if validator is None:
        return [f"{_name(obj)}: no CRD schema for {key}"]
    return [
        f"{_name(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ---------------------------------------------------------------- core kinds


def validate_core(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_name(obj)}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{_name(obj)}: {e.message}"]
    return []


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one object: CRD schema for Ray kinds (plus each embedded pod template
    against the core PodTemplate schema), core schema otherwise; KubeRay admission rules."""
    if obj.get("kind") in RAY_KINDS:
        errors = validate_custom(obj)
        for label, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": "embedded"}, "template": template}
            errors += [f"{label}: {e}" for e in validate_core(wrapped)]
        return errors + kuberay_admission_errors(obj)
    return validate_core(obj)


# ---------------------------------------------------------------- KubeRay admission rules


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def _cluster_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    errors = []
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        rv = spec.get("rayVersion", "")
        if not rv or _version_tuple(rv) < MIN_TOKEN_AUTH_RAY:
            errors.append(f"{where}: authOptions.mode=token needs rayVersion >= 2.52.0, got {rv!r}")
    for group in spec.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if lo is None or hi is None or lo < 0 or hi < lo:
            errors.append(f"{where}: worker group {group.get('groupName')}: bad replica bounds {lo}..{hi}")
        if group.get("suspend") and spec.get("enableInTreeAutoscaling"):
            errors.append(f"{where}: worker group {group.get('groupName')} suspended with autoscaling")
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{where}: worker group {group.get('groupName')} has no container")
    if not spec["headGroupSpec"]["template"]["spec"].get("containers"):
        errors.append(f"{where}: head group has no container")
    return errors


def kuberay_admission_errors(obj: dict[str, Any]) -> list[str]:
    """The operator-side checks (validation.go) that would reject the object at reconcile time."""
    name, spec, kind = obj["metadata"]["name"], obj.get("spec", {}), obj["kind"]
    errors = []
    limit = MAX_RAYCLUSTER_NAME if kind == "RayCluster" else MAX_RAYJOB_NAME
    if len(name) > limit or not DNS1035.match(name):
        errors.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {limit} characters")
    if kind == "RayCluster":
        return errors + _cluster_spec_errors(spec, name)
    selector = spec.get("clusterSelector") or {}
    if not selector and "rayClusterSpec" not in spec:
        errors.append(f"{name}: one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append(f"{name}: clusterSelector needs a non-empty ray.io/cluster")
        if spec.get("backoffLimit", 0) > 0:
            errors.append(f"{name}: spec.backoffLimit is incompatible with clusterSelector")
        if spec.get("suspend"):
            errors.append(f"{name}: clusterSelector mode cannot be suspended")
        if spec.get("submissionMode") == "SidecarMode":
            errors.append(f"{name}: clusterSelector is not supported in SidecarMode")
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append(f"{name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "")
    except yaml.YAMLError as e:
        errors.append(f"{name}: runtimeEnvYAML is not YAML: {e}")
    if "rayClusterSpec" in spec:
        errors += _cluster_spec_errors(spec["rayClusterSpec"], f"{name}.rayClusterSpec")
    return errors


# ---------------------------------------------------------------- pods and containers


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") == "RayCluster":
        return obj["spec"]
    if obj.get("kind") == "RayJob":
        return obj["spec"].get("rayClusterSpec")
    return None


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, PodTemplateSpec) for every pod an object creates."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    spec = obj.get("spec", {})
    if obj.get("kind") in {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}:
        yield name, spec["template"]
    cs = cluster_spec(obj)
    if cs:
        yield f"{name} head", cs["headGroupSpec"]["template"]
        for group in cs.get("workerGroupSpecs", []):
            yield f"{name} worker {group['groupName']}", group["template"]
    if obj.get("kind") == "RayJob" and "submitterPodTemplate" in spec:
        yield f"{name} submitter", spec["submitterPodTemplate"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, container, pod spec) for every container, the KubeRay autoscaler sidecar
    included (its resources and securityContext come from autoscalerOptions)."""
    for label, template in pod_templates(obj):
        pod = template["spec"]
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{label}/{c['name']}", c, pod
    cs = cluster_spec(obj)
    if cs and cs.get("enableInTreeAutoscaling"):
        head_pod = cs["headGroupSpec"]["template"]["spec"]
        opts = cs.get("autoscalerOptions") or {}
        yield f"{obj['kind']}/{obj['metadata']['name']} autoscaler", {"name": "autoscaler", **opts}, head_pod


def security_errors(obj: dict[str, Any]) -> list[str]:
    """Hardening every container must have: cpu+memory limits, non-root, no privilege
    escalation, all capabilities dropped, a read-only root filesystem."""
    errors = []
    for label, c, pod in containers(obj):
        limits = (c.get("resources") or {}).get("limits") or {}
        if not {"cpu", "memory"} <= set(limits):
            errors.append(f"{label}: needs cpu and memory limits, has {sorted(limits)}")
        sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if non_root is not True or uid == 0:
            errors.append(f"{label}: must run as non-root (runAsNonRoot={non_root}, runAsUser={uid})")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{label}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            errors.append(f"{label}: must not be privileged")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errors.append(f"{label}: must drop ALL capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{label}: readOnlyRootFilesystem must be true")
    return errors


def secret_refs(obj: dict[str, Any]) -> set[tuple[str, str]]:
    """(secret name, key) pairs referenced by env valueFrom.secretKeyRef anywhere in obj."""
    refs: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.add((ref["name"], ref["key"]))
            for key, value in node.items():
                if key in {"secretRef"} and isinstance(value, dict):
                    refs.add((value["name"], "*"))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return refs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or the valueFrom mapping) of a container's env list."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volumes_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def _name(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
