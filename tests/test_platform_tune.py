"""Ray Tune sweep over the real pipeline: a 2-trial grid on tiny synthetic data, tables, plots,
MLflow parent/child runs; bad grids fail before any training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from qbert.cli import main as qbert_main  # noqa: E402
from qbert.config import ConfigError  # noqa: E402
from qbert.pipeline import PipelineConfig  # noqa: E402
from qbert.platform.tune import SweepConfig, expand_trials, pipeline_trial, run_sweep, trial_config  # noqa: E402

TINY = {
    "data": {"source": "synthetic", "max_len": 8,
             "synthetic": {"num_users": 60, "num_items": 40, "num_clusters": 5, "min_len": 4, "max_len": 8,
                           "text_dim": 12, "image_dim": 8}},
    "fusion": {"dim": 16, "layers": 2, "heads": 2, "epochs": 1, "batch_size": 32},
    "quantize": {"levels": 2, "codebook_size": 16, "code_dim": 8, "hidden": [16], "epochs": 1, "batch_size": 32,
                 "kmeans_iters": 3},
    "model": {"hidden": 16, "layers": 1, "heads": 2},
    "pretrain": {"strategy": "none", "epochs": 0},
    "finetune": {"epochs": 1, "batch_size": 32, "patience": 0},
    "plots": False,
}


def _sweep_file(tmp_path: Path, grids: list[dict]) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    sweep = {"name": "tiny", "base_config": "tiny.yaml", "metric": "NDCG@10", "max_concurrent_trials": 1,
             "grids": grids}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grids_expand_and_bad_keys_fail_before_training(tmp_path):
    path = _sweep_file(tmp_path, [{"name": "layers", "params": {"model.layers": [1, 2, 3, 4]}},
                                  {"name": "mix", "params": {"model.dropout": [0.1, 0.2], "finetune.mask_ratio": [0.15, 0.3]}}])
    sweep = SweepConfig.load(path)
    trials = expand_trials(sweep)
    assert [t["overrides"]["model.layers"] for t in trials[:4]] == [1, 2, 3, 4]
    assert len(trials) == 4 + 4  # the second grid is a product
    per_grid = _sweep_file(tmp_path, [{"name": "m", "params": {"finetune.mask_ratio": [0.15, 0.2]},
                                       "overrides": {"finetune.epochs": 2, "model.dropout": 0.3}}])
    t = expand_trials(SweepConfig.load(per_grid))[1]
    cfg = trial_config(PipelineConfig.from_dict(TINY), {"finetune.epochs": 5, "seed": 7}, t)
    assert (cfg.finetune.mask_ratio, cfg.finetune.epochs, cfg.model.dropout, cfg.seed) == (0.2, 2, 0.3, 7)
    assert t["label"] == "mask_ratio=0.2"  # grid-wide overrides stay out of the row labels
    bad = _sweep_file(tmp_path, [{"name": "typo", "params": {"model.layerz": [1, 2]}}])
    with pytest.raises(ConfigError, match="layerz"):
        run_sweep(SweepConfig.load(bad), tmp_path / "out", pipeline_trial, PipelineConfig)
    for name in ("hyperparams", "ablations", "instruments-hparams"):  # shipped sweeps are valid against their base
        shipped = SweepConfig.load(Path(__file__).parents[1] / "configs" / "sweeps" / f"{name}.yaml")
        base = PipelineConfig.from_yaml(shipped.base_config)
        for t in expand_trials(shipped):
            trial_config(base, shipped.overrides, t)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_trial_sweep_writes_tables_plots_and_parent_child_runs(local_ray, tmp_path):
    from mlflow.tracking import MlflowClient

    path = _sweep_file(tmp_path, [{"name": "layers", "title": "Fig. 3", "params": {"model.layers": [1, 2]}}])
    out = tmp_path / "sweep"
    assert qbert_main(["sweep", "--config", str(path), "--out", str(out)]) == 0

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["label"] for r in rows] == ["layers=1", "layers=2"]
    assert sum(r["best"] == "True" for r in rows) == 1
    best = max(rows, key=lambda r: float(r["valid/NDCG@10"]))
    assert best["best"] == "True"  # selected on valid, not test
    for r in rows:
        assert 0.0 <= float(r["test/HR@10"]) <= 1.0
    md = (out / "results.md").read_text()
    assert "## Fig. 3" in md and "**layers=" in md
    assert (out / "plot_layers.png").read_bytes()[:4] == b"\x89PNG"
    for i in range(2):  # each trial ran the real pipeline with its override
        trial_cfg = yaml.safe_load((out / "trials" / f"layers-{i:02d}" / "config.yaml").read_text())
        assert trial_cfg["model"]["layers"] == i + 1
        assert (out / "trials" / f"layers-{i:02d}" / "metrics.json").is_file()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qbert").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.params["model.layers"] for c in children} == {"1", "2"}
    assert all("final/valid/NDCG_10" in c.data.metrics and "finetune/loss" in c.data.metrics for c in children)
    assert any(a.path == "results.md" for a in client.list_artifacts(parents[0].info.run_id))
