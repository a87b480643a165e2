"""One Ray Train adapter for every stage: run ``stage_fn`` under a ``TorchTrainer`` with N DDP workers.

A stage function has the shape ``stage_fn(cfg, ds, out_dir, callbacks=(), shard=(rank, world),
**kwargs)`` and trains through :func:`qbert.train.fit`. The adapter adds, as ``Callback``s:

* :class:`GradSyncCallback` — data parallelism without touching the stage: parameters are
  broadcast from rank 0 at fit start, and at the end of every backward pass all gradients are
  averaged with one coalesced ``all_reduce`` (what DDP does, done with an autograd
  end-of-backward hook). It runs before the loop's gradient clipping, so clipping sees the
  global gradient exactly as in a 1-worker run. Early stopping is taken from rank 0 so every
  rank leaves the loop at the same epoch (a mismatch would deadlock the collectives).
* :class:`RayReportCallback` — ``ray.train.report`` of each epoch's metrics (averaged over
  ranks) with rank 0's ``last.pt`` as a ``Checkpoint``.
* an :class:`~qbert.platform.tracking.MLflowCallback` on rank 0 when a run is attached.

The global batch stays the same: with ``shard=(rank, world)`` the stage gives each rank
``1/world`` of every global batch (a stage whose signature has no ``shard`` gets the full data on
every rank: still correct, just not faster). Restarts (``FailureConfig``) copy the last
reported checkpoint back to where the stage looks for ``last.pt``, so training continues from
the last finished epoch. At the end rank 0 reports its whole output directory as the final
checkpoint, which is how stage outputs reach ``storage_path`` (local or ``s3://``) from any node.
Backend: gloo on CPU, nccl on GPU (Ray's ``TorchConfig`` default).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from qbert.config import Config
from qbert.platform.ray_callbacks import CKPT_META, GradSyncCallback, KillOnceCallback, RayReportCallback
from qbert.train.loop import Callback

log = logging.getLogger(__name__)

FINAL_MARK = "qbert_stage_done.json"
NOT_SHIPPED = ("ray_storage", "mlflow.db", "mlartifacts")  # never copy storage into itself


class RayScalingConfig(Config):
    """What ``ScalingConfig``/``FailureConfig`` get: the same keys in the local, job and KubeRay configs."""

    num_workers: int = 1
    use_gpu: bool | str = "auto"  # "auto": GPUs when the cluster has any
    resources_per_worker: dict[str, float] | None = None
    max_failures: int = 0
    storage_path: str | None = None  # local dir or s3://...; default: <out_dir>/ray_storage


@dataclass
class StageRunResult:
    """What a Ray stage run gives back to the driver."""

    value: Any
    metrics: dict[str, Any]
    out_dir: Path
    checkpoint_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- worker body
@dataclass
class _Spec:
    stage_fn: Callable[..., Any] | None
    cfg: Any
    dataset: Any  # a SeqDataset or a zero-argument callable returning one
    out_dir: str
    stage: str
    stage_kwargs: dict[str, Any]
    tracking: dict[str, Any] | None  # {"tracking_uri", "run_id", "experiment_id", "retry": RetryConfig dict}
    log_model: bool
    use_gpu: bool
    fail_at_epoch: int | None = None
    inputs: dict[str, bytes] = field(default_factory=dict)  # files the stage reads from out_dir
    per_rank_batch_keys: tuple[str, ...] = ()  # dotted batch-size keys divided by the world size


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _drop_stale_checkpoints(out_dir: Path) -> None:
    """Under Ray the reported checkpoint is the only resume point: a ``last.pt`` left in rank 0's
    directory by a crashed attempt may be newer than it, and ranks resuming from different
    epochs would wait on each other's collectives forever."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _restore_checkpoint(out_dir: Path) -> int | None:
    """Copy the last reported checkpoint (if any) to where the stage resumes from; return its epoch."""
    meta = _restore_files(out_dir)
    return None if meta is None else int(meta["epoch"])


def _restore_files(out_dir: Path) -> dict[str, Any] | None:
    """Copy ``last.pt`` and the carried files of the last reported checkpoint into ``out_dir``; return its meta."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        meta_path = Path(d) / CKPT_META
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        for rel in [meta["relpath"], *meta.get("files", [])]:
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(d) / rel, dst)
        return meta


def _worker_setup(spec: Any) -> tuple[int, int, Path]:
    """Rank, world size and this rank's run directory (rank 0 writes the real one)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.use_gpu and torch.cuda.is_available():
        import ray.train.torch as rtt

        torch.cuda.set_device(rtt.get_device())
    out_dir = Path(spec.out_dir) if rank == 0 else Path(tempfile.mkdtemp(prefix=f"qbert-rank{rank}-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    _drop_stale_checkpoints(out_dir)
    return rank, world, out_dir


def _worker(spec: _Spec) -> Any:
    rank, world, out_dir = _worker_setup(spec)
    _write_inputs(spec, out_dir)
    resumed = _restore_checkpoint(out_dir)
    if resumed is not None:
        log.info("rank %d: resuming stage %s from epoch %d", rank, spec.stage, resumed)
    ds = spec.dataset() if callable(spec.dataset) else spec.dataset

    callbacks: list[Callback] = [GradSyncCallback(), RayReportCallback(rank, out_dir, spec.stage)]
    if spec.fail_at_epoch is not None and rank == world - 1:
        callbacks.append(KillOnceCallback(spec.fail_at_epoch, Path(spec.out_dir) / f".fault_{spec.stage}"))
    if spec.tracking and rank == 0:
        from qbert.platform.retry import RetryConfig
        from qbert.platform.tracking import MLflowCallback, attach_run

        t = spec.tracking
        run = attach_run(t["tracking_uri"], t["run_id"], t["experiment_id"], RetryConfig.from_dict(t.get("retry")))
        callbacks.append(MLflowCallback(run, prefix=f"{spec.stage}/", model_name=spec.stage if spec.log_model else None))
    kwargs = dict(spec.stage_kwargs)
    cfg = per_rank_config(spec.cfg, spec.per_rank_batch_keys, world) if _accepts(spec.stage_fn, "shard") else spec.cfg
    if _accepts(spec.stage_fn, "shard"):
        kwargs["shard"] = (rank, world)
    elif world > 1:
        log.warning("stage %s takes no shard=: every rank trains on the full data", spec.stage)
    value = spec.stage_fn(cfg, ds, out_dir, callbacks=callbacks, **kwargs)

    # Final report: rank 0's outputs become the last checkpoint so they reach storage_path from any node.
    final = {"stage": spec.stage, "done": True, "resumed_from_epoch": -1 if resumed is None else resumed}
    _report_final(rank, out_dir, final)
    return value if rank == 0 else None


def _write_inputs(spec: _Spec, out_dir: Path) -> None:
    """The files the stages read from the run directory, for ranks on other nodes (and rank > 0)."""
    for rel, blob in spec.inputs.items():
        target = out_dir / rel
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)


def _report_final(rank: int, out_dir: Path, final: dict[str, Any]) -> None:
    """Rank 0's outputs become the last checkpoint, so they reach storage_path from any node."""
    import ray.train

    if rank == 0:
        (out_dir / FINAL_MARK).write_text(json.dumps(final))
        with tempfile.TemporaryDirectory(prefix="qbert-out-") as tmp:
            shutil.copytree(out_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(final)
        shutil.rmtree(out_dir, ignore_errors=True)


def per_rank_config(cfg: Any, keys: tuple[str, ...], world: int) -> Any:
    """Same global batch on N workers: each rank's batch size is the global one divided by N."""
    if world == 1 or not keys:
        return cfg
    flat = cfg.flat()
    updates = {}
    for k in keys:
        global_bs = int(flat[k])
        if global_bs % world:
            raise ValueError(f"{k}={global_bs} is not divisible by {world} workers: the global batch would change")
        updates[k] = global_bs // world
    return cfg.override(updates)


# --------------------------------------------------------------------------- driver
def resolve_use_gpu(use_gpu: bool | str) -> bool:
    if isinstance(use_gpu, bool):
        return use_gpu
    if use_gpu != "auto":
        raise ValueError(f"use_gpu must be true, false or 'auto', got {use_gpu!r}")
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def run_stage_on_ray(stage_fn: Callable[..., Any] | None, cfg: Any, dataset: Any, out_dir: str | os.PathLike, *,
                     scaling: RayScalingConfig | None = None, name: str, stage: str | None = None,
                     stage_kwargs: dict[str, Any] | None = None, tracking: dict[str, Any] | None = None,
                     log_model: bool = True, fail_at_epoch: int | None = None,
                     input_files: tuple[str, ...] = (), per_rank_batch_keys: tuple[str, ...] = (),
                     worker: Callable[[_Spec], Any] | None = None) -> StageRunResult:
    """Run ``stage_fn`` as a ``TorchTrainer`` job; rank 0 writes ``out_dir`` (copied back if on another node).

    ``name`` must be unique per run: Ray resumes a run with the same ``storage_path`` + ``name``
    (that is how a re-submitted job continues). ``tracking`` is an attached MLflow run's identity
    (see :func:`tracking_handle`), logged to by rank 0 only. ``fail_at_epoch`` kills the last
    worker once after that epoch (fault drills; ``QBERT_FAIL_AT_EPOCH`` sets it from outside).
    ``input_files`` (relative to ``out_dir``) are shipped to every worker; ``per_rank_batch_keys``
    (dotted config keys) are divided by the number of workers so the global batch is unchanged.
    ``worker`` replaces the default worker body (``stage_fn`` may then be None: the pipeline's
    worker runs the registered stages itself).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from qbert.platform.storage import ray_storage_path

    scaling = scaling or RayScalingConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    use_gpu = resolve_use_gpu(scaling.use_gpu)
    storage = ray_storage_path(scaling.storage_path or out_dir / "ray_storage")
    if fail_at_epoch is None and os.environ.get("QBERT_FAIL_AT_EPOCH"):
        fail_at_epoch = int(os.environ["QBERT_FAIL_AT_EPOCH"])
    inputs = {}
    for rel in input_files:
        if (out_dir / rel).is_file():
            inputs[rel] = (out_dir / rel).read_bytes()
    spec = _Spec(stage_fn, cfg, dataset, str(out_dir), stage or name, stage_kwargs or {}, tracking, log_model, use_gpu,
                 fail_at_epoch, inputs, tuple(per_rank_batch_keys))
    body = worker or _worker
    # rank 0 marks out_dir when it wrote there (same node); a mark left by an earlier trainer of
    # this run would hide that this one's rank 0 ran elsewhere and its outputs must be copied back
    (out_dir / FINAL_MARK).unlink(missing_ok=True)
    trainer = TorchTrainer(
        lambda: body(spec),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=scaling.resources_per_worker),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures)),
    )
    result = trainer.fit()
    ckpt = result.checkpoint
    if ckpt is not None and not (out_dir / FINAL_MARK).is_file():  # rank 0 ran on another node
        with ckpt.as_directory() as d:
            shutil.copytree(d, out_dir, dirs_exist_ok=True)
    history: list[dict[str, Any]] = []
    df = getattr(result, "metrics_dataframe", None)
    if df is not None:
        history = df.to_dict("records")
    return StageRunResult(value=result.return_value, metrics=dict(result.metrics or {}), out_dir=out_dir,
                          checkpoint_path=ckpt.path if ckpt is not None else None, history=history)


def tracking_handle(run: Any) -> dict[str, Any]:
    """The picklable identity of a :class:`~qbert.platform.tracking.TrackedRun` for workers."""
    return {"tracking_uri": run.tracking_uri, "run_id": run.run_id, "experiment_id": run.experiment_id,
            "retry": run.retry.to_dict()}


# --------------------------------------------------------------------------- the whole pipeline
def _broadcast_files(out_dir: Path, rels: tuple[str, ...], rank: int) -> None:
    """Rank 0 sends the files the next stage reads to every rank (works across nodes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    payload = [{r: (out_dir / r).read_bytes() for r in rels if (out_dir / r).is_file()} if rank == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    if rank != 0:
        for rel, blob in payload[0].items():
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / rel).write_bytes(blob)


def _pipeline_worker(spec: _Spec) -> Any:
    """All four stages in one worker group: one Ray Train start-up instead of four.

    Checkpoints carry the finished stages' outputs and reports, so a restart skips them and
    resumes the current stage from its ``last.pt``.
    """

    from qbert import pipeline as P

    rank, world, out_dir = _worker_setup(spec)
    _write_inputs(spec, out_dir)  # reused or earlier stages' outputs, wherever rank 0 runs
    meta = _restore_files(out_dir) or {}
    reports: dict[str, Any] = {**spec.stage_kwargs.get("reused", {}), **meta.get("reports", {})}
    done_files: list[str] = list(meta.get("files", []))
    resumed = {"stage": meta.get("stage"), "epoch": meta.get("epoch")} if meta else None
    data = spec.dataset() if callable(spec.dataset) else spec.dataset
    run = None
    if spec.tracking and rank == 0:
        from qbert.platform.retry import RetryConfig
        from qbert.platform.tracking import attach_run

        t = spec.tracking
        run = attach_run(t["tracking_uri"], t["run_id"], t["experiment_id"], RetryConfig.from_dict(t.get("retry")))
    for stage in spec.stage_kwargs.get("stages", P.STAGES):
        if stage in reports:
            continue
        _broadcast_files(out_dir, P.REGISTRY[stage].reads, rank)
        carry = lambda: (list(done_files), {"reports": reports})  # noqa: E731
        callbacks: list[Callback] = [GradSyncCallback(), RayReportCallback(rank, out_dir, stage, carry)]
        if spec.fail_at_epoch is not None and rank == world - 1 and stage == os.environ.get("QBERT_FAIL_STAGE", "finetune"):
            callbacks.append(KillOnceCallback(spec.fail_at_epoch, Path(spec.out_dir) / f".fault_{stage}"))
        if run is not None:
            from qbert.platform.tracking import MLflowCallback

            callbacks.append(MLflowCallback(run, prefix=f"{stage}/",
                                            model_name=stage if spec.log_model and stage == P.MODEL_STAGE else None))
        fn = P.REGISTRY[stage].run
        kwargs = {}
        cfg = spec.cfg
        if _accepts(fn, "shard"):
            kwargs["shard"] = (rank, world)
            cfg = per_rank_config(spec.cfg, P.REGISTRY[stage].batch_keys, world)
        reports[stage] = fn(cfg, data, out_dir, callbacks=callbacks, **kwargs)
        if rank == 0:
            done_files += [f for f in P.REGISTRY[stage].writes if (out_dir / f).is_file()]
    final = {"stage": "pipeline", "done": True, "resumed": json.dumps(resumed)}
    _report_final(rank, out_dir, final)
    return reports if rank == 0 else None


def stage_scaling(cfg: Any, stage: str, base: RayScalingConfig | None = None) -> RayScalingConfig:
    """``stage``'s workers and per-worker resources from the config's ``resources`` section, with
    ``base``'s failure budget and storage path."""
    res = getattr(cfg.resources, stage)
    base = base or RayScalingConfig()
    return base.model_copy(update={"num_workers": res.workers, "use_gpu": res.use_gpu,
                                   "resources_per_worker": res.ray_resources()})


def stage_groups(cfg: Any, stages: list[str], scaling: RayScalingConfig | None,
                 per_stage: bool = False, base: RayScalingConfig | None = None
                 ) -> list[tuple[list[str], RayScalingConfig]]:
    """The stages in order, cut into runs of consecutive stages that ask for the same resources
    (each run is one ``TorchTrainer``); every stage its own with ``per_stage``. ``scaling`` given:
    it applies to every stage (command-line workers override the config); else each stage's
    :func:`stage_scaling` with ``base``'s failure budget and storage."""
    groups: list[tuple[list[str], RayScalingConfig]] = []
    for stage in stages:
        sc = scaling if scaling is not None else stage_scaling(cfg, stage, base)
        if groups and not per_stage and groups[-1][1] == sc:
            groups[-1][0].append(stage)
        else:
            groups.append(([stage], sc))
    return groups


class RayExecutor:
    """Runs the pipeline's stages on Ray Train workers, for :func:`qbert.pipeline.run_pipeline`.

    Resources: ``scaling`` for every stage when given (command-line flags), else each stage's
    ``resources`` section of the config. Consecutive stages with the same resources run in one
    ``TorchTrainer`` (one worker group, one start-up; a restart skips the finished stages), so
    the default config runs all four in one; ``trainer_per_stage`` gives each stage its own
    (``<name>-<stage>``). A trainer of only some stages is named ``<name>-<stage>-...``. Re-
    submitting with the same name resumes from the last reported checkpoint. Reused and earlier
    stages' artifacts (copied in by the driver) are shipped to every worker.
    """

    def __init__(self, scaling: RayScalingConfig | None = None, name: str = "qbert", tracked_run: Any = None,
                 log_model: bool = True, trainer_per_stage: bool = False,
                 failure: RayScalingConfig | None = None):
        self.scaling = scaling
        self.failure = failure  # max_failures / storage_path when resources come from the config
        self.name, self.tracked_run, self.log_model = name, tracked_run, log_model
        self.trainer_per_stage = trainer_per_stage

    def run(self, cfg: Any, out: Path, data: Any, stages: list[str], reports: dict[str, Any]) -> dict[str, float]:
        import functools

        from qbert import pipeline as P

        if not stages:
            return {}
        handle = tracking_handle(self.tracked_run) if self.tracked_run is not None else None
        load = functools.partial(P.load_data, cfg)  # each worker loads the data itself
        timings: dict[str, float] = {}
        groups = stage_groups(cfg, stages, self.scaling, self.trainer_per_stage, self.failure)
        for group, sc in groups:
            shipped = tuple(f for stage in P.STAGES[: P.STAGES.index(group[0])] for f in P.REGISTRY[stage].writes
                            if (out / f).is_file())  # reused or earlier stages' outputs, for every worker
            # a trainer of some stages gets a name of its own: Ray resumes a run by name
            whole = set(group) | set(reports) == set(P.STAGES) and len(groups) == 1
            name = self.name if whole else f"{self.name}-{'-'.join(group)}"
            log.info("stages %s on Ray: %d workers x %s", ",".join(group), sc.num_workers, sc.resources_per_worker)
            t0 = time.perf_counter()
            res = run_stage_on_ray(None, cfg, load, out, scaling=sc, name=name, stage="pipeline",
                                   tracking=handle, log_model=self.log_model, worker=_pipeline_worker,
                                   stage_kwargs={"reused": dict(reports), "stages": list(group)}, input_files=shipped)
            reports.update(res.value)
            timings["pipeline" if whole else "-".join(group)] = time.perf_counter() - t0
        return timings

    def describe(self) -> dict[str, Any]:
        return {"ray": {"num_workers": self.scaling.num_workers if self.scaling else "per stage (config resources)",
                        "name": self.name}}


def run_pipeline_on_ray(cfg: Any, out_dir: str | os.PathLike, *, scaling: RayScalingConfig | None = None,
                        name: str = "qbert", tracked_run: Any = None, log_model: bool = True,
                        trainer_per_stage: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """A launcher: :func:`qbert.pipeline.run_pipeline` (the one driver) with a :class:`RayExecutor`;
    same checks, run directory, artifacts and ``metrics.json`` as a local run."""
    from qbert.pipeline import run_pipeline

    return run_pipeline(cfg, out_dir, overwrite=overwrite,
                        executor=RayExecutor(scaling, name, tracked_run, log_model, trainer_per_stage))
