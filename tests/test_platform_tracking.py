"""MLflow tracking callback, S3 storage and the retry budget, against real stores.

Embedded sqlite tracking store, a real moto S3 server process, closed ports for the fault cases.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from qbert.platform.retry import RemoteUnavailableError, RetryConfig, backoff_delays, with_retries
from qbert.platform.storage import check_reachable, download_dir, upload_dir
from qbert.platform.tracking import (MLflowCallback, TrackingConfig, attach_run, metric_key, param_value,
                                     resolve_tracking_uri, start_run, use_tracking_uri)
from qbert.train.loop import LoopConfig, fit

sys.path.insert(0, str(Path(__file__).parent / "integration"))
from servers import S3_ENV, closed_port, start_moto_s3  # noqa: E402

FAST = RetryConfig(attempts=3, base_delay=0.05, max_delay=0.1)


def _toy(run_dir: Path, callbacks, epochs: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 4)
    y = x.sum(1, keepdim=True)
    res = fit(model, opt, lambda e: [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)],
              lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
              LoopConfig(epochs=epochs, monitor="HR@10", mode="min", patience=0, progress=False),
              evaluate=lambda m, e: {"HR@10": float(((m(x) - y) ** 2).mean().detach())},
              callbacks=callbacks, checkpoint_dir=run_dir / "checkpoints")
    return model, x, res


def _client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(resolve_tracking_uri(TrackingConfig(), run_dir))


def test_callback_logs_params_metrics_tags_and_a_loadable_model(tmp_path):
    import mlflow.pytorch

    long = "x" * 7000
    cfg = {"model": {"layers": 2, "note": long}, "data": {"name": "toy"}}
    (tmp_path / "config.yaml").write_text("model: {layers: 2}\n")
    cb = MLflowCallback(tracking=TrackingConfig(), run_dir=tmp_path, config=cfg, dataset_fingerprint="fp123",
                        prefix="toy/", model_name="toy_model", artifacts=[tmp_path / "config.yaml"], end_run=True)
    model, x, _ = _toy(tmp_path, [cb])
    run = _client(tmp_path).get_run(cb.run.run_id)
    assert run.data.params["model.layers"] == "2" and run.data.params["data.name"] == "toy"
    assert len(run.data.params["model.note"]) <= 6000 and run.data.params["model.note"].endswith("[truncated]")
    assert run.data.tags["qbert.dataset_fingerprint"] == "fp123"
    assert run.data.tags["qbert.git_commit"]
    assert "qbert.sys.torch" in run.data.tags
    hist = _client(tmp_path).get_metric_history(cb.run.run_id, "toy/HR_10")
    assert [m.step for m in hist] == [1, 2, 3]
    assert "toy/best_HR_10" in run.data.metrics
    assert run.info.status == "FINISHED"
    assert any(a.path == "config.yaml" for a in _client(tmp_path).list_artifacts(cb.run.run_id))
    with use_tracking_uri(resolve_tracking_uri(TrackingConfig(), tmp_path)):
        loaded = mlflow.pytorch.load_model(cb.model_uri)
    torch.testing.assert_close(loaded(x), model(x))


def test_restart_reuses_the_stored_run_id(tmp_path):
    first = MLflowCallback(tracking=TrackingConfig(), run_dir=tmp_path, config={"a": 1}, prefix="s/")
    _toy(tmp_path, [first], epochs=2)
    second = MLflowCallback(tracking=TrackingConfig(), run_dir=tmp_path, config={"a": 1}, prefix="s/")
    _toy(tmp_path, [second], epochs=4)  # resumes from checkpoints/last.pt at epoch 2
    assert second.run.run_id == first.run.run_id
    client = _client(tmp_path)
    runs = client.search_runs([first.run.experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(first.run.run_id, "s/loss")] == [1, 2, 3, 4]
    assert runs[0].data.tags["qbert.resumed_at_epoch.s"] == "2"


def test_only_rank_zero_logs(tmp_path):
    cb = MLflowCallback(tracking=TrackingConfig(), run_dir=tmp_path, config={"a": 1}, rank=1)
    _toy(tmp_path, [cb], epochs=1)
    assert cb.run is None and not (tmp_path / "mlflow.db").exists()


def test_parent_and_child_runs(tmp_path):
    parent = start_run(TrackingConfig(), tmp_path, "sweep")
    child = start_run(TrackingConfig(tracking_uri=parent.tracking_uri), tmp_path / "trial", "trial",
                      parent_run_id=parent.run_id)
    assert _client(tmp_path).get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_unreachable_tracking_server_fails_clearly_and_keeps_the_checkpoint(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    run = attach_run(uri, "0" * 32, "0", FAST)
    cb = MLflowCallback(run, prefix="s/")
    t0 = time.monotonic()
    with pytest.raises(RemoteUnavailableError, match=r"MLflow .*127\.0\.0\.1.* after 3 attempts"):
        _toy(tmp_path, [cb], epochs=3)
    assert time.monotonic() - t0 < 60  # bounded, not MLflow's minutes of internal retries
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["loop"]["epoch"] == 1  # the epoch that finished before the failed log is on disk
    _, _, res = _toy(tmp_path, [], epochs=3)  # and training resumes from it
    assert len(res.history) == 3


def test_unreachable_tracking_server_on_start(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{closed_port()}", retry=FAST)
    with pytest.raises(RemoteUnavailableError, match="after 3 attempts"):
        start_run(cfg, tmp_path, "x")


def test_retry_budget_and_non_transient_errors():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert with_retries(flaky, "svc", RetryConfig(attempts=5, base_delay=1, max_delay=3), sleep=sleeps.append) == "ok"
    assert sleeps == [1, 2]
    assert backoff_delays(RetryConfig(attempts=5, base_delay=1, max_delay=3)) == [1, 2, 3, 3]

    def bad():
        calls.append(1)
        raise ValueError("invalid parameter value")

    calls.clear()
    with pytest.raises(ValueError):
        with_retries(bad, "svc", RetryConfig(attempts=5), sleep=sleeps.append)
    assert len(calls) == 1  # not retried


def test_keys_and_values_are_made_mlflow_safe():
    assert metric_key("valid/NDCG@10") == "valid/NDCG_10"
    assert param_value([1, 2]) == "[1, 2]"
    assert len(param_value("y" * 10_000)) == 6000


def test_s3_round_trip_on_a_real_moto_server(tmp_path, monkeypatch):
    import boto3

    server = start_moto_s3(tmp_path)
    try:
        server.wait()
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": server.url}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="qbert-test")
        src = tmp_path / "run"
        (src / "sub").mkdir(parents=True)
        (src / "a.json").write_text("{}")
        (src / "sub" / "b.txt").write_text("hello")
        check_reachable("s3://qbert-test/runs/1", FAST)
        keys = upload_dir(src, "s3://qbert-test/runs/1", FAST)
        assert sorted(keys) == ["runs/1/a.json", "runs/1/sub/b.txt"]
        back = download_dir("s3://qbert-test/runs/1", tmp_path / "back", FAST)
        assert (back / "sub" / "b.txt").read_text() == "hello"
    finally:
        server.stop()


def test_unreachable_s3_endpoint_fails_clearly(tmp_path, monkeypatch):
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port()}"}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(RemoteUnavailableError, match=r"upload s3://bucket/p/f.txt failed after 3 attempts"):
        upload_dir(tmp_path, "s3://bucket/p", FAST)
    with pytest.raises(RemoteUnavailableError, match="S3 bucket 'bucket'"):
        check_reachable("s3://bucket/p", FAST)
    assert (tmp_path / "f.txt").read_text() == "x"  # the local copy is untouched


def test_job_entrypoint_exits_clearly_when_tracking_or_s3_is_unreachable(tmp_path):
    """The `ray job submit` entrypoint: bounded retries, then exit code 3 naming the service."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, str(repo / "ray_jobs" / "pipeline.py"), "--config", str(repo / "configs" / "synthetic.yaml"),
            "--workers", "0", "--tracking-retries", "2"]
    env = {**os.environ, **S3_ENV, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    p = subprocess.run(base + ["--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "MLflow" in p.stderr and "after 2 attempts" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing trained against a dead tracker

    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port()}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(base + ["--out", "s3://nowhere/run"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "S3 bucket 'nowhere'" in p.stderr and "after 2 attempts" in p.stderr, p.stderr[-2000:]


@pytest.mark.timeout(600)
def test_qbert_pipeline_logs_to_the_tracking_uri_like_the_ray_jobs(tmp_path, monkeypatch, capsys):
    """One tracking path (#22): with MLFLOW_TRACKING_URI set, `qbert pipeline` creates the run with
    config params and provenance tags, per-stage metrics, the final metrics, the run directory as
    artifacts and the fine-tuned model, through the same helper as ray_jobs."""
    from mlflow.tracking import MlflowClient

    from qbert.cli import main as cli

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sets = ["data.synthetic.num_users=80", "data.synthetic.num_items=40", "data.synthetic.num_clusters=5",
            "fusion.epochs=1", "quantize.epochs=2", "quantize.codebook_size=8", "pretrain.epochs=1",
            "finetune.epochs=2", "plots=false"]
    rc = cli(["pipeline", "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    assert rc == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(TrackingConfig().experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["finetune.epochs"] == "2"
    assert run.data.tags["qbert.git_commit"] and run.data.tags["qbert.dataset_fingerprint"]
    assert "final/test/NDCG_10" in run.data.metrics and "finetune/NDCG_10" in run.data.metrics  # MLflow-safe keys
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in logged or any("metrics.json" in p for p in logged)
    # the fine-tuned model: registered under what it is, its LoggedModel carrying the final metrics
    assert run.data.tags["qbert.registered_model"] == "models:/qbert4rec-synthetic/1"
    version = client.get_model_version("qbert4rec-synthetic", "1")
    assert version.run_id == run.info.run_id and version.source == run.data.tags["qbert.model_uri.finetune"]
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    linked = {m.key: m.value for m in model.metrics}
    assert linked["final/test/NDCG_10"] == run.data.metrics["final/test/NDCG_10"]
