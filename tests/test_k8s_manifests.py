"""The plain k8s/ manifests: schema-valid (pinned Kubernetes + KubeRay CRDs), accepted by the
operator's admission rules, hardened, and wired together (names, Secrets, ConfigMaps, GPUs)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

import k8s_validation as kv

K8S = kv.REPO / "k8s"
STAGES = {  # RayJob stage -> (script, --workers, --gpus-per-worker)
    "extract-features": ("extract_features.py", None, None),
    "fusion": ("fusion.py", 1, 1),
    "quantize": ("quantize.py", 1, 1),
    "pretrain": ("pretrain.py", 4, 1),
    "finetune": ("finetune.py", 1, 1),
    "pipeline": ("pipeline.py", None, None),
    "sweep": ("sweep.py", None, None),
}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def objects(kind: str | None = None, under: str = "") -> list[dict]:
    out = []
    for path in manifest_files():
        if under and not str(path.relative_to(K8S)).startswith(under):
            continue
        out += [o for o in kv.load_manifest_file(path) if kind in (None, o["kind"])]
    return out


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (rc,) = objects("RayCluster", "base")
    return rc


@pytest.fixture(scope="module")
def rayjobs() -> dict[str, dict]:
    return {o["metadata"]["labels"]["qbert.dev/stage"]: o for o in objects("RayJob", "jobs")}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates(path: Path) -> None:
    docs = kv.load_manifest_file(path)
    assert docs, f"{path} holds no object"
    if any(d["kind"] in kv.RAY_KINDS for d in docs):
        kv.crd_validators()  # skip (with reason) when ../shared/schemas/kuberay is absent
    errors = [e for d in docs for e in kv.validate_object(d)]
    assert not errors, "\n".join(errors)


def test_validation_is_strict(raycluster: dict, rayjobs: dict[str, dict]) -> None:
    kv.crd_validators()
    typo = copy.deepcopy(raycluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in e for e in kv.validate_object(typo))
    job = copy.deepcopy(rayjobs["pretrain"])
    job["spec"]["backoffLimit"] = 2  # the operator refuses this with clusterSelector
    assert any("backoffLimit" in e for e in kv.validate_object(job))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    assert kv.validate_object(svc)


def test_every_container_is_hardened() -> None:
    workloads = [o for o in objects() if any(True for _ in kv.pod_templates(o))]
    assert {o["kind"] for o in workloads} == {"RayCluster", "RayJob"}
    errors = [e for o in workloads for e in kv.security_errors(o)]
    assert not errors, "\n".join(errors)


def test_gpu_worker_group_targets_rtx4090(raycluster: dict) -> None:
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    for part in ("requests", "limits"):
        assert worker["resources"][part]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = kv.volumes_of(pod)[kv.mounts_of(worker)["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True
    assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]


def test_ray_dashboard_token_auth(raycluster: dict) -> None:
    assert raycluster["spec"]["authOptions"]["mode"] == "token"
    assert kv._version_tuple(raycluster["spec"]["rayVersion"]) >= kv.MIN_TOKEN_AUTH_RAY
    assert raycluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_one_rayjob_per_stage_on_the_shared_cluster(raycluster: dict, rayjobs: dict[str, dict]) -> None:
    assert set(rayjobs) == set(STAGES)
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    gpus_per_pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    for stage, (script, workers, gpus) in STAGES.items():
        spec = rayjobs[stage]["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
        assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
        assert spec["submitterConfig"]["backoffLimit"] >= 1
        argv = spec["entrypoint"].split()
        assert argv[:2] == ["python", f"/app/ray_jobs/{script}"]
        assert argv[argv.index("--config") + 1] == "/etc/qbert/config.yaml"
        assert re.match(r"^(s3://|/)", argv[argv.index("--out") + 1])
        if stage == "extract-features":  # Ray Data GPU actors, one GPU each
            actors, per_actor = int(argv[argv.index("--actors") + 1]), float(argv[argv.index("--num-gpus") + 1])
            assert per_actor == 1 and actors * per_actor <= group["maxReplicas"] * gpus_per_pod
        if workers is None:
            assert "--workers" not in argv
        else:
            assert int(argv[argv.index("--workers") + 1]) == workers
            assert int(argv[argv.index("--gpus-per-worker") + 1]) == gpus
            assert workers * gpus <= group["maxReplicas"] * gpus_per_pod, f"{stage} cannot be scheduled"


def test_config_and_env_come_from_configmaps(raycluster: dict) -> None:
    configmaps = {o["metadata"]["name"]: o for o in objects("ConfigMap", "base")}
    yaml.safe_load(configmaps["qbert-config"]["data"]["config.yaml"])
    for label, c, pod in kv.containers(raycluster):
        if label.endswith("autoscaler"):
            continue
        config_volume = kv.volumes_of(pod)[kv.mounts_of(c)["/etc/qbert"]]
        assert config_volume["configMap"]["name"] in configmaps
        refs = [s["configMapRef"]["name"] for s in c.get("envFrom", [])]
        assert refs and all(r in configmaps for r in refs)
    env = configmaps["qbert-env"]["data"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")


def test_secrets_only_by_reference(raycluster: dict, rayjobs: dict[str, dict]) -> None:
    (example,) = objects("Secret", "examples")
    assert all(v == "REPLACE_ME" for v in example["stringData"].values())
    assert len(objects("Secret")) == 1, "Secrets belong in examples/ only, never with real data"
    refs = kv.secret_refs(raycluster)
    assert refs == {(example["metadata"]["name"], k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert set(example["stringData"]) == {k for _, k in refs}
    for job in rayjobs.values():  # the submitter gets the token from the operator, nothing else
        assert not kv.secret_refs(job)


def test_minio_overlay_adds_both_endpoint_variables() -> None:
    base = {o["metadata"]["name"]: o for o in objects("ConfigMap", "base")}
    overlay = yaml.safe_load((K8S / "overlays/minio/kustomization.yaml").read_text())
    for patch in overlay["patches"]:
        (doc,) = kv.load_manifest_file(K8S / "overlays/minio" / patch["path"])
        target = base[doc["metadata"]["name"]]
        merged = copy.deepcopy(target)
        merged["data"].update(doc["data"])
        assert not kv.validate_object(merged)
        assert merged["data"]["AWS_ENDPOINT_URL_S3"] == merged["data"]["MLFLOW_S3_ENDPOINT_URL"]


def test_kustomizations_reference_existing_files() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        paths = k.get("resources", []) + [p["path"] for p in k.get("patches", [])]
        assert paths, kfile
        for rel in paths:
            assert (kfile.parent / rel).exists(), f"{kfile}: {rel} does not exist"
    base = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    listed = {(K8S / "base" / r).resolve() for r in base["resources"]}
    assert listed == {p.resolve() for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"}
    (binding,) = [o for o in objects("RoleBinding", "base")]
    assert all(s["namespace"] == base["namespace"] for s in binding["subjects"])


def test_rbac_is_minimal_and_bound_to_the_head(raycluster: dict) -> None:
    (role,) = objects("Role", "base")
    (binding,) = objects("RoleBinding", "base")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs == {("", "pods"): {"get", "list", "watch", "patch"}, ("", "pods/resize"): {"patch"},
                     ("ray.io", "rayclusters"): {"get", "patch"}}
    assert not objects("ClusterRole") and not objects("ClusterRoleBinding")
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == head["serviceAccountName"] == role["metadata"]["name"]
    for group in raycluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False


def test_versions_match_image_and_project(raycluster: dict, rayjobs: dict[str, dict]) -> None:
    project = tomllib.loads((kv.REPO / "pyproject.toml").read_text())["project"]
    base = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    (image,) = base["images"]
    assert image["newTag"] == project["version"]
    dockerfile = (kv.REPO / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert raycluster["spec"]["rayVersion"] == ray_version
    expected = f"{image['name']}:{image['newTag']}"
    for obj in [raycluster, *rayjobs.values()]:
        for label, c, _ in kv.containers(obj):
            if "image" in c:
                assert c["image"] == expected, label
