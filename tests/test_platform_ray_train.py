"""Ray Train adapter: N-worker DDP equals 1 worker at the same global batch; a killed worker resumes.

One local Ray instance (2 CPUs, no dashboard) is shared by the module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402  (Ray ships its own copy)

from qbert.platform.ray_train import RayScalingConfig, run_stage_on_ray  # noqa: E402
from qbert.train.loop import LoopConfig, fit  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "integration"))
from servers import S3_ENV, start_moto_s3  # noqa: E402

# Workers cannot import this test module by name: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GLOBAL_BATCH = 16
EPOCHS = 4
CFG = {"seed": 3, "epochs": EPOCHS}


def toy_stage(cfg, ds, out_dir, callbacks=(), shard=(0, 1)):
    """A stage with the real protocol: fit() with a checkpoint dir; shard = rows of each global batch."""
    rank, world = shard
    x, y = ds
    torch.manual_seed(cfg["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def batches(epoch):
        order = np.random.default_rng(cfg["seed"] + epoch).permutation(len(x))
        for i in range(0, len(x), GLOBAL_BATCH):
            idx = order[i:i + GLOBAL_BATCH][rank::world]
            yield x[idx], y[idx]

    def evaluate(m, epoch):
        with torch.no_grad():
            return {"mse": float(((m(x) - y) ** 2).mean())}

    res = fit(model, opt, batches, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
              LoopConfig(epochs=cfg["epochs"], monitor="mse", mode="min", patience=0, progress=False,
                         grad_clip=0.5),
              evaluate=evaluate, callbacks=callbacks, checkpoint_dir=Path(out_dir) / "checkpoints")
    torch.save(model.state_dict(), Path(out_dir) / "model.pt")
    return {"best_mse": res.best_metrics["mse"], "epochs_run": len(res.history)}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = torch.sin(x @ torch.randn(5, 1, generator=g))
    return x, y


@pytest.fixture(scope="module")
def local_ray():
    # workers write checkpoints to S3 themselves (the s3:// storage test), so they get the
    # (dummy) credentials of the local moto server
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": S3_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(local_ray, tmp_path_factory):
    """The 1-worker and 2-worker runs of one config, shared by the tests."""
    root = tmp_path_factory.mktemp("ray_train")
    one = run_stage_on_ray(toy_stage, CFG, _data(), root / "w1", name="w1", scaling=RayScalingConfig(num_workers=1, use_gpu=False))
    two = run_stage_on_ray(toy_stage, CFG, _data(), root / "w2", name="w2", scaling=RayScalingConfig(num_workers=2, use_gpu=False))
    return root, one, two


def test_two_workers_match_one_worker_at_same_global_batch(runs):
    root, one, two = runs
    assert one.value["epochs_run"] == two.value["epochs_run"] == EPOCHS
    w1 = torch.load(root / "w1" / "model.pt")
    w2 = torch.load(root / "w2" / "model.pt")
    # Tolerance: float32 reduction order only (mean of two half-batch means vs one full-batch mean).
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert two.value["best_mse"] == pytest.approx(one.value["best_mse"], rel=1e-4)
    assert one.value["best_mse"] < 0.5  # it trained at all
    assert two.checkpoint_path is not None and two.metrics["done"]


def test_killed_worker_resumes_from_last_checkpoint(runs, tmp_path):
    _, _, two = runs
    out = run_stage_on_ray(toy_stage, CFG, _data(), tmp_path / "f", name="fault",
                           scaling=RayScalingConfig(num_workers=2, use_gpu=False, max_failures=1), fail_at_epoch=2)
    assert (tmp_path / "f" / ".fault_fault").is_file()  # the worker really died once
    # Restarted from a reported checkpoint, not from 0 (epoch 2's report may lose the race with the death).
    assert 1 <= out.metrics["resumed_from_epoch"] <= 2
    assert out.value["epochs_run"] == EPOCHS
    # The resumed run ends where an uninterrupted one does.
    assert out.value["best_mse"] == pytest.approx(two.value["best_mse"], rel=1e-4)


def test_s3_storage_path_holds_checkpoints_and_a_killed_worker_resumes_from_them(runs, tmp_path, monkeypatch):
    """RunConfig.storage_path on a real S3-compatible server (moto, 127.0.0.1): every checkpoint
    is an object in the bucket, and the restart after a worker's death reads it back from there."""
    import boto3

    _, _, two = runs
    server = start_moto_s3(tmp_path)
    try:
        server.wait()
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL_S3": server.url}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=server.url)
        s3.create_bucket(Bucket="qbert-train")
        out = run_stage_on_ray(toy_stage, CFG, _data(), tmp_path / "s3run", name="s3run",
                               scaling=RayScalingConfig(num_workers=2, use_gpu=False, max_failures=1,
                                                        storage_path="s3://qbert-train/ray"),
                               fail_at_epoch=2)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="qbert-train", Prefix="ray/s3run/").get("Contents", [])]
    finally:
        server.stop()
    assert (tmp_path / "s3run" / ".fault_s3run").is_file()  # the worker really died once
    assert 1 <= out.metrics["resumed_from_epoch"] <= 2  # resumed from a checkpoint read back from S3
    assert out.value["epochs_run"] == EPOCHS
    assert out.value["best_mse"] == pytest.approx(two.value["best_mse"], rel=1e-4)
    assert out.checkpoint_path is not None and out.checkpoint_path.startswith("qbert-train/ray/s3run/")
    final = out.checkpoint_path.split("qbert-train/", 1)[1]
    assert f"{final}/model.pt" in keys  # rank 0's outputs are an object in the bucket
    ckpts = {part for k in keys for part in k.split("/") if part.startswith("checkpoint_")}
    assert len(ckpts) >= 2, keys  # epoch checkpoints + the final one


TINY_PIPELINE = {
    "data.synthetic.num_users": 60, "data.synthetic.num_items": 40, "data.synthetic.num_clusters": 5,
    "data.synthetic.max_len": 8, "data.max_len": 8,
    "fusion.dim": 16, "fusion.layers": 2, "fusion.epochs": 1, "fusion.batch_size": 32,
    "quantize.levels": 2, "quantize.codebook_size": 16, "quantize.code_dim": 8, "quantize.hidden": [16],
    "quantize.epochs": 1, "quantize.batch_size": 32, "quantize.kmeans_iters": 3,
    "model.hidden": 16, "model.layers": 1, "pretrain.epochs": 1, "pretrain.batch_size": 32,
    "finetune.epochs": 3, "finetune.batch_size": 32, "finetune.patience": 0, "plots": False,
}


def test_real_pipeline_on_two_workers_survives_a_killed_worker(local_ray, tmp_path, monkeypatch):
    """All four real stages in one TorchTrainer, 2 DDP workers; a worker dies after fine-tuning epoch 1."""
    import json

    from qbert.pipeline import PipelineConfig
    from qbert.platform.ray_train import run_pipeline_on_ray

    cfg = PipelineConfig.from_yaml(Path(__file__).parents[1] / "configs" / "synthetic.yaml").override(TINY_PIPELINE)
    monkeypatch.setenv("QBERT_FAIL_AT_EPOCH", "1")  # fine-tuning is the stage that gets the fault
    metrics = run_pipeline_on_ray(cfg, tmp_path / "run", scaling=RayScalingConfig(num_workers=2, use_gpu=False, max_failures=1),
                                  name="pipe")
    assert (tmp_path / "run" / ".fault_finetune").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "semantic_ids.parquet").is_file()
    resumed = json.loads(json.loads((tmp_path / "run" / "qbert_stage_done.json").read_text())["resumed"])
    # Restarted from a reported checkpoint (normally fine-tuning's epoch 1; an earlier stage's if the
    # controller had not registered that report yet), never from the start of the pipeline.
    assert resumed is not None and resumed["stage"] in ("fusion", "quantize", "pretrain", "finetune")
    assert metrics["epochs_run"] == 3
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]  # no epoch repeated from 0
    assert 0.0 <= metrics["test"]["NDCG@10"] <= 1.0


def test_pipeline_on_ray_reuses_finished_stages_on_every_worker(local_ray, tmp_path):
    """reuse.stages on the Ray path: the driver copies the artifacts in and ships them to both
    workers, which fine-tune from the reused pretraining without running the earlier stages."""
    from qbert.pipeline import PipelineConfig, run_pipeline
    from qbert.platform.ray_train import run_pipeline_on_ray

    cfg = PipelineConfig.from_yaml(Path(__file__).parents[1] / "configs" / "synthetic.yaml").override(TINY_PIPELINE)
    run_pipeline(cfg, tmp_path / "src")
    reuse = cfg.override({"reuse.from_run": str(tmp_path / "src"), "reuse.stages": ["fusion", "quantize", "pretrain"],
                          "finetune.mask_ratio": 0.2})
    metrics = run_pipeline_on_ray(reuse, tmp_path / "dst", scaling=RayScalingConfig(num_workers=2, use_gpu=False),
                                  name="reuse")
    for name in ("semantic_ids.parquet", "pretrain.pt"):
        assert (tmp_path / "dst" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert {s for s, r in metrics["stages"].items() if "reused_from" in r} == {"fusion", "quantize", "pretrain"}
    assert metrics["stages"]["finetune"]["init"].startswith("pretrained") and metrics["epochs_run"] == 3
