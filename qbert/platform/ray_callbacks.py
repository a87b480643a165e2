"""The callbacks a Ray Train worker adds to a stage's :func:`qbert.train.fit` (see
:mod:`qbert.platform.ray_train`): gradient averaging over the process group, per-epoch
``ray.train.report`` with rank 0's checkpoint, and fault injection for drills."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from qbert.train.distributed import collective_device, mean_over_ranks
from qbert.train.loop import Callback, FitResult, LoopState, unwrap

log = logging.getLogger(__name__)

CKPT_META = "qbert_ray_ckpt.json"  # beside every reported checkpoint: what it holds and where it goes


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

    def on_train_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float]) -> None:
        """Wait for every rank to finish the epoch's steps, then make the epoch's training losses
        the global batches' (the mean over ranks: a sharded step's loss is the rank's share times
        the world size), so history, monitor and early stopping agree on every rank."""
        if not self._active_group():
            return
        if self._params:
            self._join()
        metrics.update(mean_over_ranks(metrics))

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if not self._active_group() or not self._params:
            return
        flag = torch.tensor([1.0 if state.stopped_early else 0.0], dtype=torch.float64, device=collective_device())
        dist.broadcast(flag, src=0)
        state.stopped_early = bool(flag.item())

    def on_fit_end(self, model: nn.Module, state: LoopState, result: FitResult) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


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

        report = mean_over_ranks(metrics)
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


