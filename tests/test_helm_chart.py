"""helm/qbert-stack rendered offline with the Helm v4 SDK (helm-python-sdk) for several value
sets: lint clean, every object schema-valid and hardened, and the values reach the objects."""

from __future__ import annotations

import copy
import re
import tomllib
from functools import lru_cache
from typing import Any

import helm_python
import pytest
import yaml

import k8s_validation as kv

CHART_DIR = kv.REPO / "helm" / "qbert-stack"
RELEASE, NAMESPACE = "qb", "ml"
ALL_STAGES = ["extractFeatures", "fusion", "quantize", "pretrain", "finetune", "pipeline", "sweep"]


def stages_on(*names: str) -> dict[str, Any]:
    return {"jobs": {"stages": {n: {"enabled": True} for n in names}}}


VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "minio": {"minio": {"enabled": True}},
    "postgres": {"postgresql": {"enabled": True}},
    "minio+postgres+jobs": {"minio": {"enabled": True}, "postgresql": {"enabled": True}, **stages_on(*ALL_STAGES)},
    "external-db+minio-emptydir": {"mlflow": {"externalDatabase": {"existingSecret": "mlflow-db"}},
                               "minio": {"enabled": True, "persistence": {"enabled": False}}},
    "sqlite-pvc": {"mlflow": {"sqlite": {"persistence": {"enabled": True}}}},
    "ephemeral-jobs": {"jobs": {"clusterMode": "ephemeral", "activeDeadlineSeconds": 86400,
                                "stages": {"pretrain": {"enabled": True}, "sweep": {"enabled": True}}}},
    "image-tag": {"image": {"repository": "registry.local/qbert", "tag": "1.2.3-rc1"},
                  **stages_on("finetune")},
    "external-mlflow-no-auth": {"mlflow": {"enabled": False, "externalTrackingUri": "http://mlflow.example:5000"},
                                "ray": {"auth": {"enabled": False}, "autoscaler": {"enabled": False}},
                                "s3": {"existingSecret": "", "endpoint": "https://s3.example"}},
}


@lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART_DIR)


@lru_cache(maxsize=None)
def _render(key: str) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    files = chart().render(VALUE_SETS[key], name=RELEASE, namespace=NAMESPACE, is_install=True)
    objs = tuple(d for name, text in files.items() if not name.endswith("NOTES.txt") for d in kv.load_docs(text))
    return files, objs


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    files = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for name, text in files.items() if not name.endswith("NOTES.txt") for d in kv.load_docs(text)]


def objs(key: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [copy.deepcopy(o) for o in _render(key)[1] if kind in (None, o["kind"])]


def merged(key: str) -> dict[str, Any]:
    return chart().merge_values(VALUE_SETS[key])


def one(key: str, kind: str, name_suffix: str = "") -> dict[str, Any]:
    (obj,) = [o for o in objs(key, kind) if o["metadata"]["name"].endswith(name_suffix)]
    return obj


def test_lint_is_clean_for_every_value_set() -> None:
    for key, values in VALUE_SETS.items():
        report = helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE,
                                  kube_version=f"v{kv.K8S_VERSION}")
        assert report["errors"] == [] and report["messages"] == [], (key, report)


def test_chart_versions_follow_the_project() -> None:
    meta = chart().metadata
    project = tomllib.loads((kv.REPO / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"]
    dockerfile = (kv.REPO / "Dockerfile").read_text()
    assert chart().values["ray"]["version"] == re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    # kuberay-operator is a documented prerequisite, not an unvendored (offline-breaking) dependency
    assert not meta.get("dependencies")


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_rendered_objects_validate_and_are_hardened(key: str) -> None:
    rendered = objs(key)
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered]
    assert len(names) == len(set(names)), "duplicate objects"
    assert "Secret" not in {o["kind"] for o in rendered}, "the chart must only reference Secrets"
    assert not {"ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in rendered}
    core = [o for o in rendered if o["kind"] not in kv.RAY_KINDS]
    errors = [e for o in rendered for e in kv.security_errors(o)]
    errors += [e for o in core for e in kv.validate_object(o)]
    assert not errors, "\n".join(errors)
    kv.crd_validators()  # the Ray kinds need ../shared/schemas/kuberay: skip (with reason) without it
    errors = [e for o in rendered if o["kind"] in kv.RAY_KINDS for e in kv.validate_object(o)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_secret_references_are_the_configured_names(key: str) -> None:
    v = merged(key)
    allowed = {(v["s3"]["existingSecret"], v["s3"]["accessKeyIdKey"]),
               (v["s3"]["existingSecret"], v["s3"]["secretAccessKeyKey"]),
               (v["postgresql"]["existingSecret"], v["postgresql"]["passwordKey"]),
               (v["mlflow"]["externalDatabase"]["existingSecret"], v["mlflow"]["externalDatabase"]["uriKey"])}
    refs = set().union(*(kv.secret_refs(o) for o in objs(key)))
    assert refs <= allowed, refs - allowed
    assert all(name for name, _ in refs), "a secretKeyRef without a Secret name"
    s3 = v["s3"]["existingSecret"]
    expected_ray = {(s3, v["s3"][k]) for k in ("accessKeyIdKey", "secretAccessKeyKey")} if s3 else set()
    ray_refs = set().union(*(kv.secret_refs(o) for o in objs(key) if o["kind"] in kv.RAY_KINDS))
    assert ray_refs == expected_ray  # the Ray pods get exactly the S3 credentials


def test_gpu_worker_group_follows_values() -> None:
    spec = one("defaults", "RayCluster")["spec"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    for part in ("requests", "limits"):
        assert worker["resources"][part]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert kv.volumes_of(pod)[kv.mounts_of(worker)["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert (group["minReplicas"], group["maxReplicas"], spec["enableInTreeAutoscaling"]) == (0, 4, True)

    custom = {"ray": {"worker": {"maxReplicas": 8, "minReplicas": 1, "gpusPerWorker": 2,
                                 "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}}
    (rc,) = [o for o in render(custom) if o["kind"] == "RayCluster"]
    (group,) = rc["spec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 8)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_image_tag_comes_from_values() -> None:
    qbert_images = lambda key: {c["image"] for o in objs(key) if o["kind"] in kv.RAY_KINDS  # noqa: E731
                                for _, c, _ in kv.containers(o) if "image" in c}
    assert qbert_images("image-tag") == {"registry.local/qbert:1.2.3-rc1"}
    assert qbert_images("defaults") == {f"ghcr.io/example/qbert:{chart().metadata['appVersion']}"}


def test_token_auth_and_rbac() -> None:
    spec = one("defaults", "RayCluster")["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    (rc,) = [o for o in render({"ray": {"auth": {"existingSecret": "my-ray-token"}}}) if o["kind"] == "RayCluster"]
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "my-ray-token"}
    assert "authOptions" not in one("external-mlflow-no-auth", "RayCluster")["spec"]

    role, binding = one("defaults", "Role"), one("defaults", "RoleBinding")
    head_sa = spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert role["metadata"]["name"] == binding["metadata"]["name"] == head_sa
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": head_sa, "namespace": NAMESPACE}]
    assert all("*" not in rule["verbs"] + rule["resources"] for rule in role["rules"])
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"pods", "pods/resize", "rayclusters"}
    assert spec["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not objs("external-mlflow-no-auth", "Role")  # no autoscaler, no API access at all


def _argv(job: dict[str, Any]) -> list[str]:
    return job["spec"]["entrypoint"].split()


def test_stage_jobs_on_the_shared_cluster() -> None:
    values = merged("minio+postgres+jobs")
    jobs = {j["metadata"]["labels"]["qbert.dev/stage"]: j for j in objs("minio+postgres+jobs", "RayJob")}
    stages = values["jobs"]["stages"]
    assert set(jobs) == {stages[s]["name"] for s in ALL_STAGES}
    cluster = one("minio+postgres+jobs", "RayCluster")["metadata"]["name"]
    for key in ALL_STAGES:
        stage = stages[key]
        job = jobs[stage["name"]]
        argv = _argv(job)
        assert argv[:2] == ["python", f"/app/ray_jobs/{stage['script']}"]
        assert argv[argv.index("--config") + 1] == "/etc/qbert/config.yaml"
        assert argv[argv.index("--out") + 1] == f"s3://{values['s3']['bucket']}/runs/default"
        if "workers" in stage:
            assert argv[argv.index("--workers") + 1] == str(stage["workers"])
            assert argv[argv.index("--gpus-per-worker") + 1] == str(stage["gpusPerWorker"])
        else:
            assert "--workers" not in argv
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}
        assert "rayClusterSpec" not in job["spec"] and "backoffLimit" not in job["spec"]
        assert job["spec"]["submitterConfig"]["backoffLimit"] == values["jobs"]["submitterBackoffLimit"]
        if stage["args"]:
            assert argv[-len(stage["args"]):] == stage["args"]
    pretrain = _argv(jobs["pretrain"])
    assert pretrain[pretrain.index("--workers") + 1] == "4"
    extract = _argv(jobs["extract-features"])
    assert extract[extract.index("--actors") + 1] == "4" and extract[extract.index("--num-gpus") + 1] == "1"
    custom = {j["metadata"]["labels"]["qbert.dev/stage"]: _argv(j) for j in render({"jobs": {
        "runDir": "s3://b/r1", "stages": {"extractFeatures": {"enabled": True, "out": "s3://b/features"},
                                          "fusion": {"enabled": True}}}}) if j["kind"] == "RayJob"}
    assert custom["extract-features"][custom["extract-features"].index("--out") + 1] == "s3://b/features"
    assert custom["fusion"][custom["fusion"].index("--out") + 1] == "s3://b/r1"
    assert not objs("defaults", "RayJob"), "stage jobs are off unless switched on"


def test_ephemeral_jobs_carry_the_cluster_spec() -> None:
    assert not objs("ephemeral-jobs", "RayCluster")
    shared_spec = one("defaults", "RayCluster")["spec"]
    jobs = objs("ephemeral-jobs", "RayJob")
    assert {j["metadata"]["labels"]["qbert.dev/stage"] for j in jobs} == {"pretrain", "sweep"}
    for job in jobs:
        spec = job["spec"]
        assert spec["rayClusterSpec"] == shared_spec
        assert "clusterSelector" not in spec
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
        assert spec["activeDeadlineSeconds"] == 86400


def test_stage_needing_more_gpus_than_the_group_fails_clearly() -> None:
    with pytest.raises(helm_python.HelmError, match=r"pretrain needs 8 GPUs"):
        render({"jobs": {"stages": {"pretrain": {"enabled": True, "workers": 8}}}})
    with pytest.raises(helm_python.HelmError, match=r"gpusPerWorker=2 exceeds"):
        render({"jobs": {"stages": {"fusion": {"enabled": True, "gpusPerWorker": 2}}}})
    assert render({"jobs": {"stages": {"pretrain": {"enabled": True, "workers": 8}}},
                   "ray": {"worker": {"maxReplicas": 8}}})
    with pytest.raises(helm_python.HelmError, match=r"minio.enabled needs s3.existingSecret"):
        render({"minio": {"enabled": True}, "s3": {"existingSecret": ""}})


@pytest.mark.parametrize("bad", [
    {"podSecurityContext": {"runAsNonRoot": False}},
    {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
    {"ray": {"worker": {"resources": {"limits": None}}}},
    {"jobs": {"clusterMode": "sometimes"}},
    {"ray": {"version": "latest"}},
    {"mlflow": {"artifactsDestination": "/local/dir"}},
    {"unknownKey": 1},
], ids=lambda v: next(iter(v)))
def test_values_schema_rejects_unsafe_or_misspelt_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        chart().render(bad, name=RELEASE, namespace=NAMESPACE)


def test_mlflow_server_settings() -> None:
    deploy = one("defaults", "Deployment", "-mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    args = dict(a[2:].split("=", 1) for a in c["args"])
    svc = one("defaults", "Service", "-mlflow")
    port = svc["spec"]["ports"][0]["port"]
    assert args["artifacts-destination"] == "s3://qbert/mlflow"
    hosts = args["allowed-hosts"].split(",")
    name = svc["metadata"]["name"]
    assert {f"{name}:{port}", f"{name}.{NAMESPACE}.svc.cluster.local:{port}", f"localhost:{port}"} <= set(hosts)
    assert kv.env_of(c)["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////")
    assert not any("postgres" in a or "sqlite" in a for a in c["args"]), "no store URI in args"
    # the Ray pods track to exactly this Service
    head = one("defaults", "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert kv.env_of(head)["MLFLOW_TRACKING_URI"] == f"http://{name}:{port}"
    assert "AWS_ENDPOINT_URL_S3" not in kv.env_of(head)  # plain AWS by default


def test_postgres_backend_and_minio_wiring() -> None:
    key = "minio+postgres+jobs"
    (c,) = one(key, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"]
    env = kv.env_of(c)
    pg_svc = one(key, "Service", "-postgresql")["metadata"]["name"]
    assert re.fullmatch(rf"postgresql\+psycopg2://mlflow:\$\(PGPASSWORD\)@{pg_svc}:5432/mlflow",
                        env["MLFLOW_BACKEND_STORE_URI"])
    names = [e["name"] for e in c["env"]]
    assert names.index("PGPASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) expansion order
    sts = one(key, "StatefulSet", "-postgresql")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    minio_svc = one(key, "Service", "-minio")["metadata"]["name"]
    head = one(key, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for e in (kv.env_of(head), env):
        assert e["AWS_ENDPOINT_URL_S3"] == e["MLFLOW_S3_ENDPOINT_URL"] == f"http://{minio_svc}:9000"
    bucket_job = one(key, "Job", "-mkbucket")
    assert "post-install" in bucket_job["metadata"]["annotations"]["helm.sh/hook"]
    external = kv.env_of(one("external-db+minio-emptydir", "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0])
    assert external["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    assert not objs("external-db+minio-emptydir", "StatefulSet")
    assert {o["metadata"]["name"] for o in objs("sqlite-pvc", "PersistentVolumeClaim")} == {f"{RELEASE}-qbert-stack-mlflow"}


def test_external_tracking_server_without_mlflow_deployment() -> None:
    assert not objs("external-mlflow-no-auth", "Deployment")
    head = one("external-mlflow-no-auth", "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = kv.env_of(head)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert env["AWS_ENDPOINT_URL_S3"] == "https://s3.example" and "AWS_ACCESS_KEY_ID" not in env


def test_qbert_config_is_mounted_where_jobs_read_it() -> None:
    text = "fusion:\n  epochs: 3\n"
    rendered = render({"qbertConfig": text, **stages_on("fusion")})
    (cm,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    assert yaml.safe_load(cm["data"]["config.yaml"]) == {"fusion": {"epochs": 3}}
    (rc,) = [o for o in rendered if o["kind"] == "RayCluster"]
    for label, c, pod in kv.containers(rc):
        if label.endswith("autoscaler"):
            continue
        volume = kv.volumes_of(pod)[kv.mounts_of(c)["/etc/qbert"]]
        assert volume["configMap"]["name"] == cm["metadata"]["name"], label
        assert kv.env_of(c)["QBERT_CONFIG"] == "/etc/qbert/config.yaml"


def test_notes_explain_port_forward_submit_and_mlflow_ui() -> None:
    notes = _render("defaults")[0]["qbert-stack/templates/NOTES.txt"]
    cluster = one("defaults", "RayCluster")["metadata"]["name"]
    assert f"port-forward svc/{cluster}-head-svc 8265:8265" in notes
    assert "ray job submit --address http://127.0.0.1:8265" in notes
    assert f"get secret {cluster} -o jsonpath='{{.data.auth_token}}'" in notes
    assert f"port-forward svc/{RELEASE}-qbert-stack-mlflow 5000:5000" in notes
    assert "kuberay-operator" in notes


def test_stage_scripts_exist_once_ray_jobs_land() -> None:
    scripts = {s["script"] for s in chart().values["jobs"]["stages"].values()}
    present = {p.name for p in (kv.REPO / "ray_jobs").glob("*.py")}
    if not present:
        pytest.skip("ray_jobs/ has no entrypoints yet (issue 5 delivers them)")
    assert scripts <= present, f"missing ray_jobs entrypoints: {sorted(scripts - present)}"


def test_long_release_names_stay_within_kuberay_name_limits() -> None:
    files = chart().render({"jobs": {"clusterMode": "ephemeral", "stages": {"extractFeatures": {"enabled": True}}}},
                           name="a-rather-long-release-name-for-the-recsys-team", namespace=NAMESPACE)
    rendered = [d for n, t in files.items() if not n.endswith("NOTES.txt") for d in kv.load_docs(t)]
    (job,) = [o for o in rendered if o["kind"] == "RayJob"]
    assert not kv.kuberay_admission_errors(job)
    assert all(len(o["metadata"]["name"]) <= 63 for o in rendered)
