"""Datasets on S3 (moto's standalone server on 127.0.0.1): `qbert data prepare --out s3://...`, then
`data.source: s3://...` in a pipeline config and `qbert data stats s3://...` read it like a local
directory, with the same fingerprint; a missing prefix is a named error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import S3_ENV, start_moto_s3  # noqa: E402
from test_ray_job_submit import TINY  # noqa: E402

from qbert.cli import main  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_prepare_to_s3_then_stats_and_pipeline_from_s3(tmp_path, monkeypatch, capsys):
    s3 = start_moto_s3(tmp_path)
    try:
        s3.wait()
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": s3.url}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket="data")
        spec = "synthetic:num_users=80,num_items=48,num_clusters=6,max_len=8"
        assert main(["data", "prepare", spec, "--out", str(tmp_path / "local")]) == 0
        local = json.loads(capsys.readouterr().out)
        assert main(["data", "prepare", spec, "--out", "s3://data/datasets/tiny"]) == 0
        uploaded = json.loads(capsys.readouterr().out)
        assert uploaded["out"] == "s3://data/datasets/tiny" and uploaded["fingerprint"] == local["fingerprint"]
        assert main(["data", "stats", "s3://data/datasets/tiny"]) == 0
        assert json.loads(capsys.readouterr().out)["fingerprint"] == local["fingerprint"]

        common = [*[a for o in TINY if not o.startswith("data.synthetic") for a in ("--set", o)], "--set", "plots=false",
                  "--threads", "1"]
        assert main(["pipeline", "--out", str(tmp_path / "from_s3"), "--set", "data.source=s3://data/datasets/tiny",
                     *common]) == 0
        assert main(["pipeline", "--out", str(tmp_path / "from_local"), "--set", f"data.source={tmp_path / 'local'}",
                     *common]) == 0
        a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("from_s3", "from_local"))
        assert a["test"] == b["test"]
        summary = json.loads((tmp_path / "from_s3" / "summary.json").read_text())
        assert summary["data"]["fingerprint"] == local["fingerprint"]

        capsys.readouterr()
        assert main(["data", "stats", "s3://data/datasets/nothing"]) == 2
        assert "no objects under this prefix" in capsys.readouterr().err
    finally:
        s3.stop()
