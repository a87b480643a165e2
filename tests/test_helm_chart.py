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
                                "ray": {"auth": {"enabled": False, "allowUnauthenticated": True},
                                        "autoscaler": {"enabled": False}},
                                "s3": {"existingSecret": "", "endpoint": "https://s3.example"}},
    "mlflow-auth+jobs": {"mlflow": {"auth": {"enabled": True}}, **stages_on("finetune")},
    "mlflow-auth-emptydir+minio+postgres-no-netpol": {
        "mlflow": {"auth": {"enabled": True, "persistence": {"enabled": False}, "defaultPermission": "NO_PERMISSIONS"}},
        "minio": {"enabled": True}, "postgresql": {"enabled": True}, "networkPolicy": {"enabled": False}},
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
    auth = v["mlflow"]["auth"]
    login = {(auth["existingSecret"], auth[k]) for k in ("adminUsernameKey", "adminPasswordKey")} \
        if auth["enabled"] and v["mlflow"]["enabled"] else set()
    allowed |= login | ({(auth["existingSecret"], auth["flaskSecretKeyKey"])} if login else set())
    refs = set().union(*(kv.secret_refs(o) for o in objs(key)))
    assert refs <= allowed, refs - allowed
    assert all(name for name, _ in refs), "a secretKeyRef without a Secret name"
    s3 = v["s3"]["existingSecret"]
    expected_ray = {(s3, v["s3"][k]) for k in ("accessKeyIdKey", "secretAccessKeyKey")} if s3 else set()
    ray_refs = set().union(*(kv.secret_refs(o) for o in objs(key) if o["kind"] in kv.RAY_KINDS))
    assert ray_refs == expected_ray | login  # the Ray pods get exactly the S3 credentials (and the MLflow login)


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
        mounted = "--base" if stage.get("sweepConfig") else "--config"  # a sweep runs a shipped sweep file over it
        assert argv[argv.index(mounted) + 1] == "/etc/qbert/config.yaml"
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
    # the pipeline job's GPUs come from the mounted config's resources section
    big = "resources:\n  pretrain: {workers: 16, gpus_per_worker: 1}\n"
    with pytest.raises(helm_python.HelmError, match=r"resources.pretrain needs 16 GPUs"):
        render({"qbertConfig": big, **stages_on("pipeline")})
    with pytest.raises(helm_python.HelmError, match=r"resources.finetune.gpus_per_worker=2 exceeds"):
        render({"qbertConfig": "resources: {finetune: {gpus_per_worker: 2}}\n", **stages_on("pipeline")})
    cpu_stage = "resources: {quantize: {workers: 8, gpus_per_worker: 0}, finetune: {gpus_per_worker: 0.5}}\n"
    assert render({"qbertConfig": cpu_stage, **stages_on("pipeline")})  # 0 GPUs is not "auto"
    fits = render({"qbertConfig": "resources: {pretrain: {workers: 4, gpus_per_worker: 1}}\n", **stages_on("pipeline")})
    (job,) = [o for o in fits if o["kind"] == "RayJob"]
    assert "--workers" not in _argv(job)  # the job runs what the config says
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


# ----------------------------------------------------------------------------- network policy
def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def _pod_labels(key: str) -> dict[str, dict[str, str]]:
    """component -> pod labels, read from every workload the value set renders."""
    pods = {}
    for o in objs(key):
        spec = o.get("spec", {})
        if o["kind"] == "RayCluster":
            templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        elif o["kind"] == "RayJob":
            templates = [spec["submitterPodTemplate"]]
        elif o["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates = [spec["template"]]
        else:
            continue
        for t in templates:
            labels = t["metadata"]["labels"]
            pods[labels["app.kubernetes.io/component"]] = labels
    return pods


def _reaches(key: str, src: dict[str, str], dst: str, port: int, namespace: str = NAMESPACE) -> bool:
    """Whether a pod with labels ``src`` in ``namespace`` may open ``port`` on the ``dst`` component's pods."""
    dst_labels = _pod_labels(key)[dst]
    policies = [p for p in objs(key, "NetworkPolicy") if _selects(p["spec"]["podSelector"], dst_labels)]
    assert policies, f"no NetworkPolicy selects {dst}"
    for p in policies:
        for rule in p["spec"]["ingress"]:
            ports = [q["port"] for q in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule["from"]:
                ns_labels = {"kubernetes.io/metadata.name": namespace}
                ns_ok = namespace == NAMESPACE if "namespaceSelector" not in peer else \
                    _selects(peer["namespaceSelector"], ns_labels)
                if ns_ok and _selects(peer.get("podSelector", {}), src):
                    return True
    return False


def test_network_policies_let_each_component_reach_only_what_it_must() -> None:
    key = "minio+postgres+jobs"
    pods = _pod_labels(key)
    assert {"ray-head", "ray-worker", "ray-job-submitter", "mlflow", "minio", "minio-bucket", "postgresql"} <= set(pods)
    head, worker, sub, mlflow = pods["ray-head"], pods["ray-worker"], pods["ray-job-submitter"], pods["mlflow"]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    stranger = {"app": "something-else"}
    other_release = {**head, "app.kubernetes.io/instance": "other"}
    port = merged(key)["mlflow"]["port"]
    assert _reaches(key, worker, "ray-head", 6379) and _reaches(key, head, "ray-worker", 12345)
    assert _reaches(key, sub, "ray-head", 8265) and not _reaches(key, sub, "ray-head", 6379)
    assert _reaches(key, operator, "ray-head", 8265, namespace="kuberay-system")
    assert not _reaches(key, operator, "ray-head", 8265, namespace="attacker")  # a look-alike pod elsewhere
    assert not _reaches(key, stranger, "ray-head", 8265) and not _reaches(key, other_release, "ray-worker", 6379)
    assert not _reaches(key, sub, "ray-worker", 8265) and not _reaches(key, mlflow, "ray-worker", 6379)
    assert _reaches(key, head, "mlflow", port) and _reaches(key, worker, "mlflow", port)
    assert not _reaches(key, sub, "mlflow", port) and not _reaches(key, stranger, "mlflow", port)
    for src in (head, worker, mlflow, pods["minio-bucket"]):
        assert _reaches(key, src, "minio", 9000)
    assert not _reaches(key, sub, "minio", 9000) and not _reaches(key, head, "minio", 9001)
    assert _reaches(key, mlflow, "postgresql", 5432) and not _reaches(key, head, "postgresql", 5432)
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in objs(key, "NetworkPolicy"))  # egress open (S3)

    extra = {"podSelector": {"matchLabels": {"app": "ingress-nginx"}}}
    rendered = render({"networkPolicy": {"dashboardClients": [extra], "mlflowClients": [extra]}})
    for suffix in ("-ray-head", "-mlflow"):
        (pol,) = [o for o in rendered if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith(suffix)]
        assert extra in [peer for rule in pol["spec"]["ingress"] for peer in rule["from"]]
    assert not objs("mlflow-auth-emptydir+minio+postgres-no-netpol", "NetworkPolicy")
    assert {o["metadata"]["name"].rsplit("-", 1)[-1] for o in objs("defaults", "NetworkPolicy")} == {"head", "worker",
                                                                                                     "mlflow"}


def test_ray_auth_off_is_refused_unless_acknowledged_and_then_warned() -> None:
    with pytest.raises(helm_python.HelmError, match="allowUnauthenticated"):
        chart().render({"ray": {"auth": {"enabled": False}}}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = _render("external-mlflow-no-auth")[0][f"{CHART_DIR.name}/templates/NOTES.txt"]
    assert "WARNING: Ray token auth is OFF" in notes and "UNAUTHENTICATED" in notes
    assert "WARNING" not in _render("defaults")[0][f"{CHART_DIR.name}/templates/NOTES.txt"]


def test_mlflow_basic_auth_option() -> None:
    key = "mlflow-auth+jobs"
    auth = merged(key)["mlflow"]["auth"]
    (c,) = one(key, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = kv.env_of(c)
    secret = auth["existingSecret"]
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == {"secretKeyRef": {"name": secret, "key": auth["adminUsernameKey"]}}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"secretKeyRef": {"name": secret, "key": auth["adminPasswordKey"]}}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == {"secretKeyRef": {"name": secret, "key": auth["flaskSecretKeyKey"]}}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == mounts["auth-config"] + "/basic_auth.ini"
    cm = one(key, "ConfigMap", "-mlflow-auth")
    ini = cm["data"]["basic_auth.ini"]
    assert "default_permission = READ" in ini and f"sqlite:///{mounts['auth-data']}/basic_auth.db" in ini
    assert "password" not in ini  # credentials only from the Secret
    volumes = {v["name"]: v for v in one(key, "Deployment", "-mlflow")["spec"]["template"]["spec"]["volumes"]}
    pvc = one(key, "PersistentVolumeClaim", "-mlflow-auth")
    assert volumes["auth-data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    spec = one(key, "RayCluster")["spec"]
    for pod in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        ray_env = kv.env_of(pod["spec"]["containers"][0])
        assert ray_env["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"]["key"] == auth["adminUsernameKey"]
        assert ray_env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["key"] == auth["adminPasswordKey"]
    notes = _render(key)[0][f"{CHART_DIR.name}/templates/NOTES.txt"]
    assert f"{secret} (MLflow login)" in notes

    key = "mlflow-auth-emptydir+minio+postgres-no-netpol"
    assert not [o for o in objs(key, "PersistentVolumeClaim") if o["metadata"]["name"].endswith("-auth")]
    assert "default_permission = NO_PERMISSIONS" in one(key, "ConfigMap", "-mlflow-auth")["data"]["basic_auth.ini"]
    head = kv.env_of(one("defaults", "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "MLFLOW_TRACKING_USERNAME" not in head and not objs("defaults", "ConfigMap")[1:]
    with pytest.raises(helm_python.HelmError, match="mlflow.enabled is false"):
        chart().render({"mlflow": {"enabled": False, "auth": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE)


def test_the_sweep_job_runs_a_shipped_sweep_file_over_the_mounted_config() -> None:
    from qbert.bundled import bundled_names, resolve_config
    from qbert.platform.tune import load_sweep

    (job,) = [o for o in objs("ephemeral-jobs", "RayJob") if o["metadata"]["labels"]["qbert.dev/stage"] == "sweep"]
    argv = _argv(job)
    sweep = argv[argv.index("--config") + 1]
    assert argv[argv.index("--base") + 1] == "/etc/qbert/config.yaml"
    assert sweep in bundled_names() and load_sweep(resolve_config(sweep)).grids  # ships in the image's package
    (pre,) = [o for o in objs("ephemeral-jobs", "RayJob") if o["metadata"]["labels"]["qbert.dev/stage"] == "pretrain"]
    assert _argv(pre)[_argv(pre).index("--config") + 1] == "/etc/qbert/config.yaml" and "--base" not in _argv(pre)
