"""A run exported as an MLflow pyfunc model: `mlflow models serve` on 127.0.0.1 answers a real
HTTP request with the same top-K as the Recommender; the server is stopped by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import Server, _spawn, free_port  # noqa: E402
from test_ray_job_submit import TINY  # noqa: E402

from qbert.cli import main  # noqa: E402
from qbert.recommend import Recommender  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_served_model_answers_with_the_recommenders_top_k(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pipeline", "--out", str(run), "--threads", "1",
                 *[a for o in TINY for a in ("--set", o)], "--set", "plots=false"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 2  # never overwrites
    rec = Recommender.from_run(run)
    items = list(rec.item_ids[:6])
    histories = {"a": items[:3], "b": items[3:6]}
    expected = rec.recommend(histories=histories, k=4).to_pylist()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(tmp_path / "model"), "-h", "127.0.0.1",
           "-p", str(port), "--env-manager", "local", "--workers", "1"]
    server = Server("mlflow-serve", _spawn(cmd, env, tmp_path / "serve.log"), f"http://127.0.0.1:{port}", "/ping",
                    tmp_path / "serve.log", 180)
    try:
        server.wait()
        body = {"dataframe_split": {"columns": ["user_id", "items"], "data": [[u, h] for u, h in histories.items()]},
                "params": {"k": 4}}
        req = urllib.request.Request(f"{server.url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            got = json.loads(r.read())["predictions"]
    finally:
        server.stop()
    assert [(g["user_id"], g["rank"], g["item_id"], g["sid"]) for g in got] == \
        [(e["user_id"], e["rank"], e["item_id"], e["sid"]) for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], rel=1e-5)
