"""End to end through real servers on 127.0.0.1: ``ray job submit`` of the synthetic pipeline to a
Ray head with token auth, tracked by an MLflow server whose artifact store is an S3 bucket on
moto's standalone server. Checks go through the MLflow REST API and boto3; every server is
torn down even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import S3_ENV, start_mlflow, start_moto_s3, start_ray_head  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUCKET = "qbert-it"
TINY = [  # the shipped synthetic config shrunk to seconds per stage
    "data.synthetic.num_users=80", "data.synthetic.num_items=48", "data.synthetic.num_clusters=6",
    "data.synthetic.max_len=8", "data.max_len=8",
    "fusion.dim=16", "fusion.layers=2", "fusion.epochs=2", "fusion.batch_size=32",
    "quantize.levels=2", "quantize.codebook_size=16", "quantize.code_dim=8", "quantize.hidden=[16]",
    "quantize.epochs=2", "quantize.batch_size=32", "quantize.kmeans_iters=5",
    "model.hidden=16", "model.layers=1", "pretrain.epochs=1", "pretrain.batch_size=32",
    "finetune.epochs=2", "finetune.batch_size=32",
]


def _rest(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def _artifacts(base: str, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run (recursive), via the REST API."""
    out = []
    for f in _rest(base, "artifacts/list", run_id=run_id, path=path).get("files", []):
        out += _artifacts(base, run_id, f["path"]) if f["is_dir"] else [f["path"]]
    return out


@pytest.fixture(scope="module")
def stack():
    """moto S3 + MLflow server (S3 artifacts) + Ray head (token auth), started concurrently."""
    import boto3

    work = Path(tempfile.mkdtemp(prefix="qbert-it-"))
    started = []
    try:
        s3 = start_moto_s3(work)
        started.append(s3)
        mlflow = start_mlflow(work, f"s3://{BUCKET}/mlflow", s3.url)
        started.append(mlflow)
        head = start_ray_head(num_cpus=2)
        started.append(head)
        s3.wait()
        boto3.client("s3", endpoint_url=s3.url, **_boto_kw()).create_bucket(Bucket=BUCKET)
        mlflow.wait()
        head.wait()
        yield {"s3": s3, "mlflow": mlflow, "ray": head, "work": work}
    finally:
        for server in reversed(started):
            server.stop()


def _boto_kw() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def test_pipeline_job_tracks_to_mlflow_with_s3_artifacts(stack):
    import boto3

    s3, mlflow, head = stack["s3"], stack["mlflow"], stack["ray"]
    job_env = {**S3_ENV, "MLFLOW_TRACKING_URI": mlflow.url, "AWS_ENDPOINT_URL_S3": s3.url,
               "MLFLOW_S3_ENDPOINT_URL": s3.url, "QBERT_MLFLOW_EXPERIMENT": "qbert-it"}
    sid = f"qbert-it-{uuid.uuid4().hex[:8]}"
    out_uri = f"s3://{BUCKET}/runs/{sid}"
    cmd = ["ray", "job", "submit", "--address", head.url, "--submission-id", sid, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
           "python", "ray_jobs/pipeline.py", "--config", "configs/synthetic.yaml", "--out", out_uri,
           "--workers", "1", "--name", sid, *[x for kv in TINY for x in ("--set", kv)]]
    env = {**os.environ, **head.env}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200, cwd=REPO)
    req = urllib.request.Request(f"{head.url}/api/jobs/{sid}",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:  # the job API itself requires the token
        job = json.loads(r.read())
    assert job["status"] == "SUCCEEDED", (job.get("message"), proc.stdout[-4000:], proc.stderr[-3000:])

    # Tracking server: the run, its params, per-epoch metrics and artifacts.
    exp = _rest(mlflow.url, "experiments/get-by-name", experiment_name="qbert-it")["experiment"]
    runs = _rest(mlflow.url, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["finetune.epochs"] == "2" and params["model.layers"] == "1"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["qbert.dataset_fingerprint"] and tags["qbert.git_commit"] and "qbert.model_uri.finetune" in tags
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0.0 <= metrics["final/test/NDCG_10"] <= 1.0
    # the fine-tuned model is registered under a name saying what it is, and carries its metrics
    assert tags["qbert.registered_model"] == "models:/qbert4rec-synthetic/1"
    version = _rest(mlflow.url, "model-versions/get", name="qbert4rec-synthetic", version="1")["model_version"]
    assert version["run_id"] == run_id
    model_id = tags["qbert.model_uri.finetune"].removeprefix("models:/")
    logged = _rest(mlflow.url, f"logged-models/{model_id}")["model"]
    linked = {m["key"]: m["value"] for m in logged["data"]["metrics"]}
    assert linked["final/test/NDCG_10"] == metrics["final/test/NDCG_10"]
    hist = _rest(mlflow.url, "metrics/get-history", run_id=run_id, metric_key="finetune/loss")["metrics"]
    assert sorted(int(m["step"]) for m in hist) == [1, 2]
    for stage in ("fusion", "quantize", "pretrain"):
        assert f"{stage}/loss" in metrics
    files = _artifacts(mlflow.url, run_id)
    for expected in ("config.yaml", "semantic_ids.parquet", "metrics.json", "plots/codebook_utilisation.png"):
        assert expected in files, files

    # The artifact store really is the bucket: run artifacts and the logged model are S3 objects.
    client = boto3.client("s3", endpoint_url=s3.url, **_boto_kw())
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/semantic_ids.parquet") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]  # mlflow.pytorch.log_model went to S3
    # And the run directory itself was uploaded to --out.
    run_keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{sid}/").get("Contents", [])}
    assert f"runs/{sid}/metrics.json" in run_keys and f"runs/{sid}/model.pt" in run_keys


def test_the_readme_ray_job_submit_example_runs_as_written(stack):
    """README.md's `ray job submit` block, run by bash as written; only the placeholders a reader
    fills in (the head's address and token, the MLflow and S3 endpoints, the S3 keys) are
    replaced by the local servers'. The job must succeed and log the README's config to MLflow."""
    import boto3

    s3, mlflow, head = stack["s3"], stack["mlflow"], stack["ray"]
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in readme.split("```bash\n")[1:] if "ray job submit --address" in b.split("```")[0]]
    assert blocks, "README.md has no `ray job submit` example"
    script = blocks[0].split("```")[0]
    filled = {"RAY_AUTH_TOKEN=...": f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}",
              "http://127.0.0.1:8265": head.url, "http://mlflow:5000": mlflow.url, "http://minio:9000": s3.url,
              '"AWS_ACCESS_KEY_ID": "..."': f'"AWS_ACCESS_KEY_ID": "{S3_ENV["AWS_ACCESS_KEY_ID"]}"',
              '"AWS_SECRET_ACCESS_KEY": "..."': f'"AWS_SECRET_ACCESS_KEY": "{S3_ENV["AWS_SECRET_ACCESS_KEY"]}"'}
    for placeholder, value in filled.items():
        assert placeholder in script, placeholder
        script = script.replace(placeholder, value)
    out_uri = re.search(r"--out (s3://\S+)", script).group(1)
    bucket = out_uri[len("s3://"):].split("/")[0]
    client = boto3.client("s3", endpoint_url=s3.url, **_boto_kw())
    if bucket != BUCKET:
        client.create_bucket(Bucket=bucket)
    sid = f"readme-{uuid.uuid4().hex[:8]}"
    script = script.replace("ray job submit ", f"ray job submit --submission-id {sid} ", 1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                          timeout=840, cwd=REPO)
    req = urllib.request.Request(f"{head.url}/api/jobs/{sid}",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        job = json.loads(r.read())
    assert proc.returncode == 0 and job["status"] == "SUCCEEDED", (job.get("message"), proc.stdout[-3000:],
                                                                   proc.stderr[-3000:])
    prefix = out_uri[len(f"s3://{bucket}/"):]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert f"{prefix}/metrics.json" in keys
    exp = _rest(mlflow.url, "experiments/get-by-name", experiment_name="qbert")["experiment"]
    runs = _rest(mlflow.url, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    (run,) = [r for r in runs if r["info"]["run_name"] == out_uri.rstrip("/").rsplit("/", 1)[-1]]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["qbert.git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                      cwd=REPO).stdout.strip()
