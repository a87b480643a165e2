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
from torch import nn

from qbert.config import Config
from qbert.train.loop import Callback, FitResult, LoopState, unwrap

log = logging.getLogger(__name__)

CKPT_META = "qbert_ray_ckpt.json"
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


# --------------------------------------------------------------------------- callbacks (in workers)
class GradSyncCallback(Callback):
    """Averages gradients over the process group at the end of each backward pass (manual DDP).

    Uneven shards (a rank with one batch fewer in an epoch) must not deadlock: every gradient
    all-reduce carries an "active" flag, and a rank that has run out of batches keeps joining
    the others' all-reduces with zeros (flag 0) at epoch end until no rank is active. A step in
    which some rank had no batch is skipped on every rank (gradients set to None, so the
    optimizer leaves parameters and state untouched) so all replicas stay identical.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._queued = False
        self._params: list[nn.Parameter] = []
        self.skipped_steps = 0

    @staticmethod
    def _active_group() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def on_fit_start(self, model: nn.Module, state: LoopState) -> None:
        if not self._active_group():
            return
        module = unwrap(model)
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)
        self._params = [p for p in module.parameters() if p.requires_grad]
        for p in self._params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _flat(self, active: bool) -> torch.Tensor:
        ref = self._params[0]
        if not active:
            return torch.zeros(sum(p.numel() for p in self._params) + 1, dtype=ref.dtype, device=ref.device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._params]
        return torch.cat(grads + [torch.ones(1, dtype=ref.dtype, device=ref.device)])

    def _all_reduce(self) -> None:
        self._queued = False
        flat = self._flat(active=True)
        dist.all_reduce(flat)
        active = int(round(float(flat[-1])))
        if active < dist.get_world_size():  # another rank ran out of batches: skip this step everywhere
            for p in self._params:
                p.grad = None
            self.skipped_steps += 1
            return
        flat /= active
        offset = 0
        for p in self._params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def _join(self) -> None:
        """Match the all-reduces of ranks that still have batches, until none has."""
        while True:
            flat = self._flat(active=False)
            dist.all_reduce(flat)
            if int(round(float(flat[-1]))) == 0:
                return

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if not self._active_group() or not self._params:
            return
        self._join()
        flag = torch.tensor([1.0 if state.stopped_early else 0.0], dtype=torch.float64, device=_coll_device())
        dist.broadcast(flag, src=0)
        state.stopped_early = bool(flag.item())

    def on_fit_end(self, model: nn.Module, state: LoopState, result: FitResult) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _coll_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_coll_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    out = dict(metrics)
    out.update({k: float(v) for k, v in zip(keys, t.tolist())})
    return out


class RayReportCallback(Callback):
    """``ray.train.report`` per epoch: metrics (mean over ranks) + rank 0's ``last.pt`` as checkpoint."""

    def __init__(self, rank: int, out_dir: Path, stage: str, carry: Callable[[], tuple[list[str], dict]] | None = None):
        self.rank, self.out_dir, self.stage = rank, Path(out_dir), stage
        self.carry = carry  # (files relative to out_dir, extra meta) to put into every checkpoint
        self.start_epoch = 0

    def on_fit_start(self, model: nn.Module, state: LoopState) -> None:
        self.start_epoch = state.epoch

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float], checkpoint: Path | None) -> None:
        import ray.train

        report = _mean_over_ranks(metrics)
        report.update(stage=self.stage, start_epoch=self.start_epoch, epochs_done=state.epoch, rank0_stopped=state.stopped_early)
        if self.rank != 0 or checkpoint is None or not Path(checkpoint).is_file():
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="qbert-ckpt-") as tmp:
            rel = _relative(Path(checkpoint), self.out_dir)
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint, dst)
            files, extra = self.carry() if self.carry else ([], {})
            for f in files:
                (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.out_dir / f, Path(tmp) / f)
            meta = {"relpath": rel.as_posix(), "epoch": state.epoch, "stage": self.stage, "files": files, **extra}
            (Path(tmp) / CKPT_META).write_text(json.dumps(meta, default=str))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class KillOnceCallback(Callback):
    """Fault injection for tests and drills: the process dies (``os._exit``) after epoch N, once per marker."""

    def __init__(self, epoch: int, marker: Path):
        self.epoch, self.marker = epoch, marker

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if state.epoch == self.epoch and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(os.getpid()))
            log.error("fault injection: killing worker pid %d after epoch %d", os.getpid(), state.epoch)
            time.sleep(3)  # let the controller register this epoch's report first: the drill tests resume, not races
            os._exit(17)


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:  # checkpoint outside the out dir: keep its name under a fixed folder
        return Path("_external") / path.name


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
    for rel, blob in spec.inputs.items():  # ranks on other nodes (and rank > 0) need the stage's inputs
        target = out_dir / rel
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
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
    for stage in P.STAGES:
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


def run_pipeline_on_ray(cfg: Any, out_dir: str | os.PathLike, *, scaling: RayScalingConfig | None = None,
                        name: str = "qbert", tracked_run: Any = None, log_model: bool = True,
                        trainer_per_stage: bool = False) -> dict[str, Any]:
    """``qbert.pipeline.run_pipeline`` on Ray Train: same artifacts and ``metrics.json``.

    Default: one ``TorchTrainer`` (run ``<name>``) runs the four stages in one worker group;
    ``trainer_per_stage`` gives each stage its own ``TorchTrainer`` (``<name>-<stage>``).
    Re-submitting with the same name resumes from the last checkpoint.
    """
    import functools
    import time

    from qbert import pipeline as P
    from qbert.utils.runtime import git_commit, seed_everything

    out = Path(out_dir).resolve()
    started = time.time()
    commit = git_commit()  # the code this run executes (the tree may change while it trains)
    seed_everything(cfg.seed)
    data = P.load_data(cfg)
    P.check_inputs(cfg, data)  # every input problem surfaces before a worker starts
    P.check_reuse(cfg)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    handle = tracking_handle(tracked_run) if tracked_run is not None else None
    # reused stages: the driver copies their artifacts in, and every worker gets them as inputs
    reused = {stage: P.reuse_stage(cfg, stage, out) for stage in cfg.reuse.stages}
    reused_files = tuple(f for stage in reused for f in P.REGISTRY[stage].writes if (out / f).is_file())
    reports: dict[str, Any] = dict(reused)
    timings: dict[str, float] = {}
    if not trainer_per_stage:
        t0 = time.perf_counter()
        res = run_stage_on_ray(None, cfg, functools.partial(P.load_data, cfg), out, scaling=scaling,
                               name=name, stage="pipeline", tracking=handle, log_model=log_model,
                               worker=_pipeline_worker, stage_kwargs={"reused": reused}, input_files=reused_files)
        reports = dict(res.value)
        timings["pipeline"] = time.perf_counter() - t0
    for stage in P.STAGES if trainer_per_stage else ():
        if stage in reused:
            continue
        t0 = time.perf_counter()
        log.info("stage %s on Ray (%d workers)", stage, (scaling or RayScalingConfig()).num_workers)
        st = P.REGISTRY[stage]
        res = run_stage_on_ray(st.run, cfg, functools.partial(P.load_data, cfg), out, scaling=scaling,
                               name=f"{name}-{stage}", stage=stage, tracking=handle,
                               log_model=log_model and st.model, input_files=st.reads,
                               per_rank_batch_keys=st.batch_keys)
        reports[stage] = res.value
        timings[stage] = time.perf_counter() - t0
    reports["finetune"] = dict(reports["finetune"])
    ray_info = {"ray": {"num_workers": (scaling or RayScalingConfig()).num_workers, "name": name}}
    return P.finish_run(cfg, out, data, reports, timings, started, commit, extra=ray_info)

