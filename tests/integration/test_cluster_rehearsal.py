"""A cluster rehearsal on 127.0.0.1: what ``helm install`` would run, run for real.

The chart is rendered (Helm SDK) with the pipeline RayJob on and the dataset in S3. Then, with
real servers only: moto's S3 server at the chart's ``s3.endpoint`` holding the dataset and the run
directory; an MLflow server with the ``--artifacts-destination`` the chart's MLflow Deployment
renders; a Ray head (token auth) and two worker nodes (``ray start --address``) whose environment
is the rendered RayCluster containers' (the S3 credentials the Secret would give, the S3 endpoint,
the tracking URI). The RayJob's rendered entrypoint and runtime environment are submitted with
``ray job submit``. The only translations are of names that exist inside the cluster: the MLflow
Service's URL (-> the local server) and two pod paths (``/app`` = the image's checkout,
``/etc/qbert/config.yaml`` = the rendered ConfigMap). The job must succeed with the config's per-stage resources (2 Ray
Train workers for stage 3), and the run directory and the MLflow run must be where NOTES.txt
says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from servers import (S3_ENV, start_mlflow, start_moto_s3, start_ray_head, start_ray_worker,  # noqa: E402
                     wait_nodes)

helm_python = pytest.importorskip("helm_python")
import k8s_validation as kv  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "qbert"  # the chart's default s3.bucket
DATASET = f"s3://{BUCKET}/datasets/tiny"
POD_PATHS = ("HOME", "TMPDIR")  # container filesystem paths, meaningless on this machine

QBERT_CONFIG = f"""\
data:
  source: {DATASET}
  max_len: 8
  modalities: [text, image, id]
fusion: {{dim: 16, layers: 2, epochs: 2, batch_size: 32}}
quantize: {{levels: 2, codebook_size: 16, code_dim: 8, hidden: [16], epochs: 2, batch_size: 32, kmeans_iters: 5}}
model: {{hidden: 16, layers: 1, heads: 2}}
pretrain: {{epochs: 1, batch_size: 32}}
finetune: {{epochs: 2, batch_size: 32}}
resources:
  pretrain: {{workers: 2, gpus_per_worker: 0}}
  finetune: {{workers: 2, gpus_per_worker: 0}}
seed: 42
"""


def _render(values: dict) -> tuple[list[dict], str]:
    files = helm_python.Chart.load(REPO / "helm" / "qbert-stack").render(values, name="qb", namespace="ml",
                                                                            is_install=True)
    notes = next(text for name, text in files.items() if name.endswith("NOTES.txt"))
    objs = [d for name, text in files.items() if not name.endswith("NOTES.txt") for d in kv.load_docs(text)]
    return objs, notes


def _container_env(cluster: dict, services: dict[str, str]) -> dict[str, str]:
    """The head container's environment as this machine can give it: literal values as rendered
    (in-cluster Service URLs by ``services``' local ones), Secret references by the credentials of
    the local S3 server, pod paths left out."""
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {}
    for e in head.get("env", []):
        if e["name"] in POD_PATHS:
            continue
        if "value" in e:
            env[e["name"]] = services.get(e["value"], e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = S3_ENV[e["name"]]  # what Secret qbert-s3 holds in the cluster
    return env


@pytest.fixture()
def servers(tmp_path):
    """Started servers, stopped in reverse order however the test ends."""
    started: list = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def _s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


def test_rendered_pipeline_rayjob_runs_on_a_three_node_ray_cluster(servers, tmp_path):
    work = tmp_path
    s3 = start_moto_s3(work)
    servers.append(s3)
    values = {"jobs": {"stages": {"pipeline": {"enabled": True}}},
              "qbertConfig": QBERT_CONFIG,
              "s3": {"endpoint": s3.url}}  # the chart's S3 endpoint value (MinIO or AWS in a cluster)
    objs, notes = _render(values)
    (job,) = [o for o in objs if o["kind"] == "RayJob"]
    (cluster,) = [o for o in objs if o["kind"] == "RayCluster"]
    (configmap,) = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    (mlflow_deploy,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-mlflow")]
    server_args = mlflow_deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    destination = next(a.split("=", 1)[1] for a in server_args if a.startswith("--artifacts-destination="))
    mlflow = start_mlflow(work, destination, s3.url)
    servers.append(mlflow)
    s3.wait()
    _s3_client(s3.url).create_bucket(Bucket=BUCKET)
    mlflow.wait()
    service_uri = re.search(r"MLflow experiment '[^']+' at\s+(\S+?),", notes).group(1)
    pod_env = _container_env(cluster, {service_uri: mlflow.url})
    assert pod_env["MLFLOW_TRACKING_URI"] == mlflow.url and pod_env["AWS_ENDPOINT_URL_S3"] == s3.url

    # The user's upload of the dataset (docs/kubernetes.md): qbert data prepare --out s3://...
    client_env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL_S3": s3.url}
    prep = subprocess.run([sys.executable, "-m", "qbert", "data", "prepare", "synthetic:users=80,items=48,clusters=6",
                           "--max-len", "8", "--out", DATASET], env=client_env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert prep.returncode == 0, prep.stderr[-2000:]

    # Three Ray nodes with the pods' environment.
    head = start_ray_head(num_cpus=1, env=pod_env)
    servers.append(head)
    head.wait()  # worker nodes join a running head (their `ray start --address` gives up otherwise)
    workers = []
    for nodes in (2, 3):  # one at a time: nodes starting together on one host race for socket names
        workers.append(start_ray_worker(head, num_cpus=1, env=pod_env))
        servers.append(workers[-1])
        try:
            wait_nodes(head, nodes, timeout=240)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{workers[-1].log.read_text()[-2000:]}") from None

    # The RayJob as rendered: its entrypoint (pod paths translated) and runtime environment.
    config_file = work / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    argv = [str(config_file) if a == "/etc/qbert/config.yaml" else re.sub(r"^/app/", "", a)
            for a in job["spec"]["entrypoint"].split()]
    assert argv[:2] == ["python", "ray_jobs/pipeline.py"] and "--workers" not in argv
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    sid = "qbert-rehearsal"
    cmd = ["ray", "job", "submit", "--address", head.url, "--submission-id", sid, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", *argv]
    env = {**os.environ, **head.env}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=700, cwd=REPO)
    req = urllib.request.Request(f"{head.url}/api/jobs/{sid}",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        status = json.loads(r.read())
    assert status["status"] == "SUCCEEDED", (status.get("message"), proc.stdout[-4000:], proc.stderr[-3000:])

    # NOTES.txt says where the run directory and the MLflow run are.
    run_dir = re.search(r"--out (s3://\S+)", notes).group(1)
    experiment = re.search(r"MLflow experiment '([^']+)'", notes).group(1)
    artifacts = re.search(r"artifacts in (s3://\S+)", notes).group(1).rstrip(".")
    client = _s3_client(s3.url)
    bucket, _, prefix = run_dir[len("s3://"):].partition("/")
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/metrics.json")["Body"].read()
    metrics = json.loads(body)
    assert 0.0 <= metrics["test"]["NDCG@10"] <= 1.0
    # the config's resources placed the stages: fusion + RQ-VAE on 1 worker, stage 3 on 2
    assert set(metrics["timing"]["stage_seconds"]) == {"fusion-quantize", "pretrain-finetune"}

    with urllib.request.urlopen(f"{mlflow.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}",
                                timeout=30) as r:
        exp = json.loads(r.read())["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")  # proxied by the server ...
    req = urllib.request.Request(f"{mlflow.url}/api/2.0/mlflow/runs/search",
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        (run,) = json.loads(r.read())["runs"]
    assert run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]
    a_bucket, _, a_prefix = artifacts[len("s3://"):].partition("/")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=a_bucket, Prefix=a_prefix)
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/metrics.json") for k in keys), keys[:20]  # ... into the bucket
