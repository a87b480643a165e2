"""Per-stage resources: the config section, how executors group stages, and the job flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from qbert.config import ConfigError
from qbert.pipeline import PipelineConfig
from qbert.pipeline.runs import config_differences
from qbert.platform.ray_train import RayScalingConfig, stage_groups, stage_scaling

STAGES = ["fusion", "quantize", "pretrain", "finetune"]


def test_defaults_one_worker_gpus_when_the_cluster_has_them() -> None:
    cfg = PipelineConfig()
    sc = stage_scaling(cfg, "pretrain")
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker) == (1, "auto", {"CPU": 1.0})
    # equal resources everywhere: one trainer for the whole pipeline
    assert [g for g, _ in stage_groups(cfg, STAGES, None)] == [STAGES]
    assert [g for g, _ in stage_groups(cfg, STAGES, None, per_stage=True)] == [[s] for s in STAGES]


def test_each_stage_gets_its_resources_and_consecutive_equals_share_a_trainer() -> None:
    cfg = PipelineConfig.from_dict({"resources": {"pretrain": {"workers": 4, "gpus_per_worker": 1},
                                                  "finetune": {"workers": 4, "gpus_per_worker": 1},
                                                  "quantize": {"gpus_per_worker": 0, "cpus_per_worker": 4}}})
    groups = stage_groups(cfg, STAGES, None)
    assert [g for g, _ in groups] == [["fusion"], ["quantize"], ["pretrain", "finetune"]]
    _, quantize = groups[1]
    assert quantize.use_gpu is False and quantize.resources_per_worker == {"CPU": 4.0}
    _, train = groups[2]
    assert (train.num_workers, train.use_gpu, train.resources_per_worker) == (4, True, {"CPU": 1.0, "GPU": 1.0})
    # command-line scaling overrides the config for every stage
    flat = RayScalingConfig(num_workers=2, use_gpu=False)
    assert stage_groups(cfg, STAGES, flat) == [(STAGES, flat)]
    # the failure budget and storage come from the job, not the config
    base = RayScalingConfig(max_failures=3, storage_path="s3://b/ray")
    assert stage_scaling(cfg, "pretrain", base).max_failures == 3


@pytest.mark.parametrize("bad, field", [
    ({"pretrain": {"workers": 0}}, "resources.pretrain.workers"),
    ({"fusion": {"gpus_per_worker": -1}}, "resources.fusion.gpus_per_worker"),
    ({"finetune": {"gpus_per_worker": "many"}}, "resources.finetune.gpus_per_worker"),
    ({"features": {"workers": 2}}, "resources.features"),
])
def test_bad_resources_name_the_field(bad, field) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PipelineConfig.from_dict({"resources": bad})


def test_resources_do_not_make_another_run(tmp_path: Path) -> None:
    """N workers compute what one does: a run resumes (or is reused) under other resources."""
    PipelineConfig().to_yaml(tmp_path / "config.yaml")
    moved = PipelineConfig.from_dict({"resources": {"pretrain": {"workers": 8}}})
    assert config_differences(tmp_path / "config.yaml", moved) == []
    assert config_differences(tmp_path / "config.yaml", moved.override({"finetune.lr": 0.5})) == ["finetune.lr"]


def _job_args(*argv: str) -> argparse.Namespace:
    sys.path.insert(0, str(Path(__file__).parents[1] / "ray_jobs"))
    import _common

    return _common.build_parser("test").parse_args(["--config", "synthetic", "--out", "x", *argv])


def test_job_flags_override_every_stage_or_defer_to_the_config() -> None:
    assert _common_scaling() is None
    sc = _common_scaling("--workers", "4", "--gpus-per-worker", "1", "--max-failures", "2")
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker, sc.max_failures) == (4, True, {"CPU": 1.0, "GPU": 1.0}, 2)
    assert _common_scaling("--workers", "2").use_gpu == "auto"
    with pytest.raises(ConfigError, match="--gpus-per-worker and --cpus-per-worker go with --workers"):
        _common_scaling("--gpus-per-worker", "1")


def _common_scaling(*argv: str):
    args = _job_args(*argv)
    import _common

    return _common.scaling_from_args(args)
