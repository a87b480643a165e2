"""``qbert pipeline``: stage 1 -> 2 -> 3 -> evaluation from one config; prints the metrics.

Also ``qbert pretrain`` / ``qbert finetune``: run one stage-3 step inside an existing run
directory (after ``qbert pipeline``, e.g. to try another fine-tuning config on the same
semantic IDs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from qbert.cli import positive_int
from qbert.config import parse_overrides


def _add_common(p: argparse.ArgumentParser, out_help: str, config_help: str) -> None:
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, dotted (e.g. --set finetune.epochs=5 --set data.max_len=50); "
                        "VALUE is parsed as YAML; repeatable")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on when stderr is a terminal)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run fusion -> RQ-VAE -> pretrain -> finetune -> evaluation",
                       description="Run the whole Q-BERT4Rec method and write every artifact under RUN_DIR "
                                   "(config.yaml, fused_embeddings.parquet, rqvae.pt, semantic_ids.parquet, "
                                   "checkpoints/, metrics.json, summary.json, plots/).")
    _add_common(p, "run directory to write (RUN_DIR)",
                "PipelineConfig YAML, or a bundled config name (`qbert configs list`; default: the built-in synthetic "
                "quick start = configs/synthetic.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of another config in RUN_DIR (default: refuse; a run of the same config resumes)")
    p.add_argument("--ray", action="store_true",
                   help="run the stages on Ray Train workers with each stage's resources section of the config "
                        "(the cluster in RAY_ADDRESS, else a local Ray); N workers compute what one does "
                        "(docs/platform.md, 'Exact data parallelism')")
    p.set_defaults(func=pipeline_cmd)
    for stage in ("pretrain", "finetune"):
        q = sub.add_parser(stage, help=f"run only the stage-3 {stage} step inside an existing run directory",
                           description=f"Run the {stage} stage with the config given (default: RUN_DIR/config.yaml), "
                                       "reading the semantic IDs of a previous `qbert pipeline` run in RUN_DIR.")
        _add_common(q, "existing run directory (holds semantic_ids.parquet)",
                    "PipelineConfig YAML (default: RUN_DIR/config.yaml)")
        q.set_defaults(func=stage_cmd, stage=stage)


def load_config(path: str | Path | None, overrides: list[str]):
    from qbert.pipeline import PipelineConfig, quickstart_config

    from qbert.bundled import resolve_config

    cfg = PipelineConfig.from_yaml(resolve_config(path)) if path is not None else quickstart_config()
    return cfg.override(parse_overrides(overrides)) if overrides else cfg


def _setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _with_progress(cfg, args: argparse.Namespace):
    show = (cfg.progress or sys.stderr.isatty()) if args.progress is None else args.progress
    return cfg.override({"progress": show}) if show != cfg.progress else cfg


def pipeline_cmd(args: argparse.Namespace) -> int:
    from qbert.pipeline import run_pipeline

    _setup(args)
    cfg = load_config(args.config, args.overrides)
    cfg = _with_progress(cfg, args)
    name = Path(args.out).resolve().name or "qbert"

    def executor(run):
        if not args.ray:
            from qbert.pipeline import LocalExecutor

            if run is None:
                return LocalExecutor()
            from qbert.platform.tracking import stage_callbacks

            return LocalExecutor(stage_callbacks(run))
        import ray

        from qbert.platform.ray_train import RayExecutor

        if not ray.is_initialized():
            ray.init()
        return RayExecutor(None, name, run)  # each stage's resources from the config

    if os.environ.get("MLFLOW_TRACKING_URI"):  # the same MLflow logging as the Ray entry points
        from qbert.platform.tracking import tracked_pipeline

        metrics = tracked_pipeline(cfg, args.out, name, lambda run: run_pipeline(
            cfg, args.out, executor=executor(run), overwrite=args.overwrite))
    else:
        metrics = run_pipeline(cfg, args.out, overwrite=args.overwrite, executor=executor(None))
    print(json.dumps({"test": metrics["test"], "valid": metrics["valid"], "best_epoch": metrics["best_epoch"],
                      "run": str(Path(args.out) / "metrics.json")}, indent=2))
    return 0


def stage_cmd(args: argparse.Namespace) -> int:
    from qbert.pipeline import run_pipeline

    _setup(args)
    out = Path(args.out)
    if not (out / "semantic_ids.parquet").is_file():
        raise FileNotFoundError(f"{out / 'semantic_ids.parquet'} not found: run `qbert pipeline --out {out}` first")
    cfg = load_config(args.config or out / "config.yaml", args.overrides)
    cfg = _with_progress(cfg, args)
    report = run_pipeline(cfg, out, stages=[args.stage])[args.stage]  # the one driver, this stage only
    report.pop("history", None)
    print(json.dumps(report, indent=2, default=str))
    return 0
