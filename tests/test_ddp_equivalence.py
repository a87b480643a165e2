"""Exact data parallelism: each stage on 2 Ray Train workers equals the same stage on 1 worker at
the same global batch (same inputs, same seed), on the real pipeline and the embedded dataset.

One 1-worker run of the whole pipeline gives every stage's reference output; each stage then runs
alone on 2 workers in a copy of that run directory (so it reads exactly the reference inputs),
and its output is compared with the reference. Dropout is off (the only randomness that differs
per rank by design) and stage 3 runs in fp32: under bf16 autocast (``precision: auto`` on CPUs
with bf16 units) a half batch rounds differently from a whole one. Tolerances are float32 reduction order (a sum of two half-batch
sums instead of one sum) carried through a few Adam steps: parameters whose true gradient is 0
(e.g. attention key biases) take lr-sized steps on rounding noise, so weights get atol 1e-4
while losses, embeddings and metrics are compared tighter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from qbert.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from qbert.platform.ray_train import RayExecutor, RayScalingConfig, run_pipeline_on_ray  # noqa: E402

pytestmark = pytest.mark.timeout(900)

CONFIG = {
    "data.synthetic.num_users": 150, "data.synthetic.num_items": 60, "data.synthetic.num_clusters": 6,
    "data.synthetic.max_len": 10, "data.max_len": 10,
    # odd global batches: the last batch of an epoch leaves one rank a row short (or none)
    "fusion.dim": 16, "fusion.layers": 2, "fusion.epochs": 2, "fusion.batch_size": 14, "fusion.dropout": 0.0,
    "quantize.levels": 2, "quantize.codebook_size": 16, "quantize.code_dim": 8, "quantize.hidden": [16],
    "quantize.epochs": 2, "quantize.batch_size": 32, "quantize.kmeans_iters": 3,
    "model.hidden": 16, "model.layers": 1, "model.dropout": 0.0,
    "pretrain.epochs": 2, "pretrain.batch_size": 24, "pretrain.precision": "fp32",
    "finetune.epochs": 2, "finetune.batch_size": 24, "finetune.patience": 0, "finetune.precision": "fp32",
    "plots": False,
}
STAGE_FILES = {"fusion": "fusion_model.pt", "quantize": "rqvae.pt", "pretrain": "pretrain.pt", "finetune": "model.pt"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    """The whole pipeline on one worker."""
    cfg = PipelineConfig.from_yaml(Path(__file__).parents[1] / "configs" / "synthetic.yaml").override(CONFIG)
    out = tmp_path_factory.mktemp("ddp") / "one"
    metrics = run_pipeline_on_ray(cfg, out, scaling=RayScalingConfig(num_workers=1, use_gpu=False), name="one")
    return cfg, out, metrics


def _two_workers(cfg: PipelineConfig, ref: Path, stage: str, tmp: Path) -> tuple[Path, dict]:
    """``stage`` alone on 2 workers in a copy of the reference run (its inputs are the reference's)."""
    out = tmp / f"two-{stage}"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("checkpoints", "ray_storage", ".qbert.lock"))
    reports = run_pipeline(cfg, out, stages=[stage],
                           executor=RayExecutor(RayScalingConfig(num_workers=2, use_gpu=False), name=f"two-{stage}"))
    return out, reports


def _weights(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    state = payload.get("state_dict") or payload.get("model") or payload
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _assert_same_weights(one: Path, two: Path, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    w1, w2 = _weights(one), _weights(two)
    assert w1 and w1.keys() == w2.keys()
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{one.name}:{k}: {m}")
        moved += 1
    assert moved


def test_fusion_two_workers_equal_one(reference, tmp_path):
    """InfoNCE over gathered negatives: the ranks' sharded loss is the global batch's."""
    from qbert.fusion.train import read_fusion_embeddings

    cfg, ref, metrics = reference
    out, reports = _two_workers(cfg, ref, "fusion", tmp_path)
    _assert_same_weights(ref / "fusion_model.pt", out / "fusion_model.pt")
    _, e1 = read_fusion_embeddings(ref / "fused_embeddings.parquet")
    _, e2 = read_fusion_embeddings(out / "fused_embeddings.parquet")
    np.testing.assert_allclose(e2, e1, rtol=1e-4, atol=1e-5)
    h1, h2 = metrics["stages"]["fusion"]["history"], reports["fusion"]["history"]
    assert [round(h["loss"], 4) for h in h2] == [round(h["loss"], 4) for h in h1]
    assert h1[-1]["loss"] < h1[0]["loss"] or len(h1) == 1  # it trained


def test_quantize_two_workers_equal_one(reference, tmp_path):
    """Sharded by item, k-means and dead-code re-seeding identical on every rank: bit-identical semantic IDs."""
    cfg, ref, _ = reference
    out, _ = _two_workers(cfg, ref, "quantize", tmp_path)
    _assert_same_weights(ref / "rqvae.pt", out / "rqvae.pt", rtol=1e-5, atol=1e-6)
    from qbert.quantize.semantic_ids import read_semantic_ids

    assert np.array_equal(read_semantic_ids(out / "semantic_ids.parquet")[1],
                          read_semantic_ids(ref / "semantic_ids.parquet")[1])


def test_pretrain_two_workers_equal_one(reference, tmp_path):
    """Masks drawn once per global batch; the masked-LM loss over the global count of masked items."""
    cfg, ref, metrics = reference
    out, reports = _two_workers(cfg, ref, "pretrain", tmp_path)
    _assert_same_weights(ref / "pretrain.pt", out / "pretrain.pt")
    l1 = [h["loss"] for h in metrics["stages"]["pretrain"]["history"]]
    l2 = [h["loss"] for h in reports["pretrain"]["history"]]
    np.testing.assert_allclose(l2, l1, rtol=1e-4)


def test_finetune_two_workers_equal_one(reference, tmp_path):
    """Fine-tuning from the same pretrained weights, with validation sharded by user and gathered."""
    cfg, ref, metrics = reference
    out, reports = _two_workers(cfg, ref, "finetune", tmp_path)
    _assert_same_weights(ref / "model.pt", out / "model.pt")
    for key in ("HR@10", "NDCG@10"):
        assert reports["finetune"]["valid"][key] == pytest.approx(metrics["valid"][key], abs=1e-6)
        assert reports["finetune"]["test"][key] == pytest.approx(metrics["test"][key], abs=1e-6)
    # the per-epoch validation each rank computed on half the users, gathered: every epoch's value
    v1 = [h["NDCG@10"] for h in metrics["history"]]
    v2 = [h["NDCG@10"] for h in reports["finetune"]["history"]]
    np.testing.assert_allclose(v2, v1, atol=1e-6)
    r1 = json.loads((ref / "metrics.json").read_text())["test"]
    assert r1 == metrics["test"]


def test_config_resources_place_each_stage_and_keep_the_result(reference, tmp_path):
    """No command-line workers: each stage takes ``resources.<stage>`` of the config. Stages with
    equal resources share one TorchTrainer; the result equals the 1-worker reference."""
    cfg, ref, metrics = reference
    placed = cfg.override({"resources.pretrain.workers": 2, "resources.finetune.workers": 2})
    out = run_pipeline(placed, tmp_path / "placed", executor=RayExecutor(None, name="placed"))
    assert set(out["timing"]["stage_seconds"]) == {"fusion-quantize", "pretrain-finetune"}
    for key in ("HR@10", "NDCG@10"):
        assert out["valid"][key] == pytest.approx(metrics["valid"][key], abs=1e-6)
        assert out["test"][key] == pytest.approx(metrics["test"][key], abs=1e-6)
    _assert_same_weights(ref / "model.pt", tmp_path / "placed" / "model.pt")
