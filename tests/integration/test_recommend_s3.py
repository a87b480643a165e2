"""`qbert recommend` with its run directory and its output on S3 (moto's standalone server on
127.0.0.1): the same recommendations as from the local run; an unreachable S3 exits 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import S3_ENV, closed_port, start_moto_s3  # noqa: E402
from test_ray_job_submit import TINY  # noqa: E402

from qbert.cli import main  # noqa: E402
from qbert.platform.storage import upload_dir  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_recommend_reads_an_s3_run_and_writes_to_s3(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["pipeline", "--out", str(run), "--threads", "1",
                 *[a for o in TINY for a in ("--set", o)], "--set", "plots=false"]) == 0
    assert main(["recommend", "--run", str(run), "--out", str(tmp_path / "local.parquet"), "--k", "5"]) == 0
    s3 = start_moto_s3(tmp_path)
    try:
        s3.wait()
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3.url}.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
        client.create_bucket(Bucket="runs")
        upload_dir(run, "s3://runs/exp/run1")
        assert main(["recommend", "--run", "s3://runs/exp/run1", "--out", "s3://runs/exp/recs.parquet",
                     "--k", "5"]) == 0
        client.download_file("runs", "exp/recs.parquet", str(tmp_path / "from_s3.parquet"))
        capsys.readouterr()
        assert main(["evaluate", "--run", str(run), "--split", "valid"]) == 0
        local_eval = json.loads(capsys.readouterr().out)
        assert main(["evaluate", "--run", "s3://runs/exp/run1", "--split", "valid"]) == 0
        s3_eval = json.loads(capsys.readouterr().out)
        assert s3_eval["run"] == "s3://runs/exp/run1" and s3_eval["NDCG@10"] == local_eval["NDCG@10"]
        assert pq.read_table(tmp_path / "from_s3.parquet").equals(pq.read_table(tmp_path / "local.parquet"))
        capsys.readouterr()
        assert main(["recommend", "--run", "s3://no-such-bucket/run1", "--out", str(tmp_path / "x.parquet")]) == 2
        assert "no such bucket" in capsys.readouterr().err
        assert main(["recommend", "--run", str(run), "--out", "s3://no-such-bucket/recs.parquet"]) == 2
        assert "no such bucket" in capsys.readouterr().err
        # no credentials anywhere (a fresh process: boto3 caches credentials per process): a clear error
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
        r = subprocess.run([sys.executable, "-c", "import sys; from qbert.cli import main; sys.exit(main())",
                            "recommend", "--run", "s3://runs/exp/run1", "--out", str(tmp_path / "x.parquet")],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "no S3 credentials" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert main(["recommend", "--run", "s3://runs/exp/nothing", "--out", str(tmp_path / "x.parquet")]) == 2
        assert "model.pt missing" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()
    finally:
        s3.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    assert main(["recommend", "--run", "s3://runs/exp/run1", "--out", str(tmp_path / "y.parquet")]) == 3
    assert "error: " in capsys.readouterr().err
