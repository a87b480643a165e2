"""Shared body of the ``ray job submit`` entrypoints: flags, config, storage, tracking, Ray.

Every entrypoint takes the same flags and the same config file as ``qbert pipeline`` and the
KubeRay RayJob::

    --config FILE           pipeline config (YAML)
    --out URI               run directory: a local path or s3://bucket/prefix
    --workers N             Ray Train workers of every stage (0: run in this process, no Ray Train;
                            default: each stage's ``resources`` section of the config)
    --gpus-per-worker G     GPUs per worker with --workers (0: CPU, gloo; >0: nccl; default: one
                            per worker when the cluster has GPUs)
    --set key=value         dotted config override, repeatable (value parsed as YAML)

``ray.init()`` without an address joins the cluster the job was submitted to (the job
supervisor sets ``RAY_ADDRESS``); run by hand it starts a local Ray. Stages write into a local
run directory; with an ``s3://`` ``--out`` it is staged under ``/tmp`` and uploaded at the end
(the S3 endpoint is checked first, with bounded retries). MLflow: ``MLFLOW_TRACKING_URI`` or
the embedded sqlite store in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence


# ``python ray_jobs/x.py`` puts ray_jobs/ (not the repo) on sys.path: make the working dir's qbert win.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.data.errors import DataError  # noqa: E402
from qbert.pipeline import STAGES  # noqa: E402

log = logging.getLogger("qbert.ray_jobs")
ALL_STAGES = STAGES  # the pipeline's registry (qbert.pipeline.REGISTRY) names them once


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="pipeline config YAML or bundled config name (same file as local runs and KubeRay)")
    p.add_argument("--out", required=True, help="run directory: local path or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers of every stage, overriding the config's resources section; "
                        "0 = in-process, no Ray Train (default: resources.<stage>.workers of the config)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker with --workers (0 = CPU; default: one when the cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker with --workers (default 1)")
    p.add_argument("--max-failures", type=int, default=1, help="Ray Train FailureConfig.max_failures per stage")
    p.add_argument("--trainer-per-stage", action="store_true",
                   help="pipeline: one TorchTrainer per stage (default: one for all four stages)")
    p.add_argument("--storage", default=None, help="RunConfig.storage_path (default <run dir>/ray_storage)")
    p.add_argument("--name", default=None, help="run name (Ray run names and MLflow run name); default from --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set finetune.epochs=2 (repeatable)")
    p.add_argument("--experiment", default=os.environ.get("QBERT_MLFLOW_EXPERIMENT", "qbert"), help="MLflow experiment")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--tracking-retries", type=int, default=5, help="attempts per MLflow/S3 call before failing")
    p.add_argument("--no-model", action="store_true", help="do not log the fine-tuned model to MLflow")
    return p


def load_config(args: argparse.Namespace) -> Any:
    from qbert.pipeline import PipelineConfig

    from qbert.bundled import resolve_config

    cfg = PipelineConfig.from_yaml(resolve_config(args.config))
    overrides = parse_overrides(args.overrides)
    return cfg.override(overrides) if overrides else cfg


def run_name(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    base = str(args.out).rstrip("/").rsplit("/", 1)[-1] or "qbert"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)


def scaling_from_args(args: argparse.Namespace) -> Any:
    """Every stage's scaling from ``--workers``/``--gpus-per-worker``/``--cpus-per-worker``; None
    without ``--workers`` (each stage then takes the config's ``resources`` section)."""
    from qbert.pipeline.config import StageResources
    from qbert.platform.ray_train import RayScalingConfig

    if args.workers is None:
        if args.gpus_per_worker is not None or args.cpus_per_worker is not None:
            raise ConfigError("--gpus-per-worker and --cpus-per-worker go with --workers; without it each stage "
                              "takes resources.<stage> of the config")
        return None
    res = StageResources(workers=max(args.workers, 1),
                         gpus_per_worker="auto" if args.gpus_per_worker is None else args.gpus_per_worker,
                         cpus_per_worker=1.0 if args.cpus_per_worker is None else args.cpus_per_worker)
    return RayScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=res.ray_resources(),
                            max_failures=args.max_failures, storage_path=args.storage)


def run_job(args: argparse.Namespace, stages: Sequence[str]) -> dict[str, Any]:
    """Run ``stages`` (all four = the pipeline) under tracking; return the metrics / stage reports."""
    from qbert.platform import storage
    from qbert.platform.retry import RetryConfig
    from qbert.platform.tracking import TrackingConfig

    retry = RetryConfig(attempts=max(args.tracking_retries, 1))
    cfg = load_config(args)
    name = run_name(args)
    remote = storage.is_s3(args.out)
    if remote:
        storage.check_reachable(args.out, retry)
        local = Path(tempfile.mkdtemp(prefix=f"qbert-{name}-"))
        if tuple(stages) != ALL_STAGES:  # a single stage reads earlier stages' outputs
            storage.download_dir(args.out, local, retry)
    else:
        local = Path(args.out).resolve()
        local.mkdir(parents=True, exist_ok=True)

    if args.no_tracking:
        result = _execute(cfg, local, stages, args, name, None)
    else:
        from qbert.platform.tracking import tracked_pipeline

        tags = {"qbert.stages": ",".join(stages), "qbert.out": str(args.out), "qbert.workers": "config resources" if args.workers is None else args.workers}
        result = tracked_pipeline(cfg, local, name, lambda run: _execute(cfg, local, stages, args, name, run),
                                  tracking=TrackingConfig(experiment=args.experiment, retry=retry), tags=tags)
    if remote:
        storage.upload_dir(local, args.out, retry)
    return result


def _execute(cfg: Any, local: Path, stages: Sequence[str], args: argparse.Namespace, name: str, run: Any) -> dict[str, Any]:
    """``stages`` through the one driver (``qbert.pipeline.run_pipeline``): in this process with
    ``--workers 0``, else on Ray Train workers. A single stage runs inside a directory that holds
    the earlier stages' outputs and returns its report."""
    from qbert import pipeline as P

    if args.workers == 0:  # in-process: the local executor with MLflow callbacks
        from qbert.platform.tracking import stage_callbacks

        executor = P.LocalExecutor(stage_callbacks(run, log_model=not args.no_model))
    else:
        import ray

        from qbert.platform.ray_train import RayExecutor

        if not ray.is_initialized():
            ray.init()
        from qbert.platform.ray_train import RayScalingConfig

        executor = RayExecutor(scaling_from_args(args), name, run, log_model=not args.no_model,
                               trainer_per_stage=args.trainer_per_stage,
                               failure=RayScalingConfig(max_failures=args.max_failures, storage_path=args.storage))
    if tuple(stages) == ALL_STAGES:
        return P.run_pipeline(cfg, local, executor=executor)
    out = P.run_pipeline(cfg, local, executor=executor, stages=list(stages))
    return out[stages[0]] if len(stages) == 1 and isinstance(out.get(stages[0]), dict) else out


def main(stages: Sequence[str], description: str, argv: list[str] | None = None) -> int:
    args = build_parser(description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_job(args, stages)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: result[k] for k in ("valid", "test") if k in result} or result
    print(json.dumps(summary, indent=2, default=str))
    return 0


def guarded_main(stages: Sequence[str], description: str) -> None:
    """Exit codes: 0 ok, 2 bad input/config, 3 a remote service (MLflow/S3) stayed unreachable."""
    from qbert.platform.retry import RemoteUnavailableError

    try:
        code = main(stages, description)
    except RemoteUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    sys.exit(code)
