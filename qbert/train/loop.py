"""One training loop for every stage.

A stage supplies a model, an optimizer, a function that yields the batches of an epoch, a
step function (batch -> loss and logged scalars) and optionally an evaluation function.
The loop owns the rest: epochs, gradient clipping, early stopping on a monitored metric,
restoring the best weights, an optional exponential moving average (EMA) of the weights,
checkpoints that allow resuming, progress bars, and callbacks.
Platform adapters (Ray Train reporting, MLflow logging) are callbacks: the loop itself
imports neither Ray nor MLflow.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from qbert.config import Config
from qbert.train.optim import Precision, autocast
from qbert.utils.io import atomic_path, load_weights

log = logging.getLogger(__name__)


class LoopConfig(Config):
    """How long to train and when to stop."""

    epochs: int = 50
    patience: int = 10  # epochs without improvement of `monitor` before stopping; 0 disables
    monitor: str = "NDCG@10"  # a key of the evaluation dict, or "loss" (training loss)
    mode: str = "max"  # "max" or "min"
    eval_every: int = 1
    grad_clip: float | None = 1.0
    progress: bool = True
    # > 0: evaluate, select and return an EMA of the weights (Polyak averaging) instead of the
    # raw ones. The decay at step t is min(ema_decay, (1 + t) / (ema_ramp + t)): the average
    # covers about the last t / (ema_ramp - 1) steps until the cap 1 / (1 - ema_decay) steps
    # binds, near t = (ema_ramp - 1) / (1 - ema_decay). ema_ramp 10 (TensorFlow's) binds 0.999 only
    # after ~9,000 steps; 2 averages every step so far until then; 1 is a constant decay
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    ema_ramp: float = Field(10.0, ge=1.0)
    precision: Precision = "fp32"  # the step's autocast (qbert.train.optim); evaluation is the caller's

    @classmethod
    def fixed_epochs(cls, epochs: int) -> "LoopConfig":
        """Train exactly ``epochs`` and keep the final weights.

        For stages with no validation signal (fusion, RQ-VAE): their total training loss is no
        model-selection criterion (its codebook/ponder terms move with the scale of the
        representation), so ``monitor`` names no logged metric and no best epoch is tracked.
        """
        return cls(epochs=epochs, patience=0, monitor="none", mode="min", progress=False)


StepFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class LoopState:
    epoch: int = 0
    step: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    train_seconds: float = 0.0  # over every epoch so far, including those before a resume
    samples: int = 0


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    stopped_early: bool
    train_seconds: float
    samples_per_second: float


class Callback:
    """Hooks for adapters; every method is optional."""

    def on_fit_start(self, model: nn.Module, state: LoopState) -> None: ...

    def on_train_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float]) -> None:
        """After an epoch's last step, before evaluation: ``metrics`` (the training losses) may be
        changed in place, e.g. averaged over data-parallel ranks."""

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float],
                     checkpoint: Path | None) -> None: ...

    def on_fit_end(self, model: nn.Module, state: LoopState, result: FitResult) -> None: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP / compile wrapper."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


class WeightAverage:
    """EMA of a model's parameters, swapped in for evaluation.

    Why: with a high learning rate the weights of the last steps scatter around a better point;
    their average ranks better than any one of them and is a cheap regulariser (no extra pass).
    """

    def __init__(self, model: nn.Module, decay: float, shadow: list[torch.Tensor] | None = None,
                 ramp: float = 10.0):
        if ramp < 1.0:
            raise ValueError(f"ema ramp must be >= 1, got {ramp}")
        self.params = [p for p in unwrap(model).parameters()]
        self.decay = decay
        self.ramp = ramp
        self.shadow = [p.detach().clone() for p in self.params] if shadow is None else \
            [s.to(p.device, p.dtype) for s, p in zip(shadow, self.params, strict=True)]
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (self.ramp + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def swap_in(self, keep_trained: bool = True) -> None:
        """Put the averaged weights into the model (``swap_out`` restores the trained ones)."""
        self._saved = [p.detach().clone() for p in self.params] if keep_trained else None
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._saved is not None:
            for p, s in zip(self.params, self._saved):
                p.copy_(s)
            self._saved = None


def rng_states(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random state a training step draws from: the global CPU (dropout) and CUDA
    generators and a stage's own ``generators`` (e.g. the RQ-VAE's dead-code reseeding)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in generators]}


def set_rng_states(states: dict[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for g, st in zip(generators, states.get("generators", []), strict=False):
        g.set_state(st)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
                    best_state: dict[str, torch.Tensor] | None, scheduler: Any = None,
                    ema: WeightAverage | None = None, generators: Iterable[torch.Generator] = ()) -> None:
    payload = {
        "rng": rng_states(generators),
        "ema": [t.detach().cpu() for t in ema.shadow] if ema is not None else None,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "loop": state.__dict__,
        "best_model": best_state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


class Batches:
    """One epoch's batches with their count known in advance, so progress bars show a total and
    an ETA. ``batches(epoch)`` may return one of these or any iterable."""

    def __init__(self, items: Iterable[Any], count: int):
        self._items, self._count = items, int(count)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return self._count


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterable[Any]],
        step: StepFn, cfg: LoopConfig, evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
        scheduler: Any = None, callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
        resume: bool = True, desc: str = "train", batch_size_of: Callable[[Any], int] | None = None,
        generators: Iterable[torch.Generator] = ()) -> FitResult:
    """Train ``model``; return the best epoch's metrics with the best weights loaded into ``model``.

    ``batches(epoch)`` yields the batches of one epoch (so samplers can reshuffle per epoch and
    distributed adapters can shard). ``step(model, batch)`` returns the loss, or the loss and a
    dict of extra scalars to log. With ``checkpoint_dir`` the loop writes ``last.pt`` after each
    epoch and, when ``resume`` is set and one exists, continues from it. With ``cfg.ema_decay``
    every evaluation, the best weights and the returned model are those of the EMA.
    """
    callbacks = list(callbacks)
    generators = list(generators)
    state = LoopState()
    best_state: dict[str, torch.Tensor] | None = None
    ema_shadow: list[torch.Tensor] | None = None
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.parent.is_dir():  # writes a killed run left half-done
        for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if ckpt_path is not None and resume and ckpt_path.is_file():
        payload = load_weights(ckpt_path, "training checkpoint")
        unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        state = LoopState(**payload["loop"])
        best_state = payload.get("best_model")
        ema_shadow = payload.get("ema")
        if payload.get("rng") is not None:  # so the resumed epochs draw what they would have drawn
            set_rng_states(payload["rng"], generators)
    ema = WeightAverage(model, cfg.ema_decay, ema_shadow, cfg.ema_ramp) if cfg.ema_decay > 0 else None
    for cb in callbacks:
        cb.on_fit_start(model, state)

    size_of = batch_size_of or _default_batch_size
    device = next(iter(unwrap(model).parameters())).device
    params = [p for p in model.parameters() if p.requires_grad]
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch
        model.train()
        t0 = time.perf_counter()
        # running sums stay on the device: no host synchronisation inside a step (one every 20 steps
        # for the finiteness check and the progress bar)
        tot_loss, n_steps, extras = torch.zeros((), device=device), 0, {}
        epoch_batches = batches(epoch)
        total = len(epoch_batches) if hasattr(epoch_batches, "__len__") else None
        bar = tqdm(epoch_batches, total=total, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not cfg.progress, leave=False)
        for batch in bar:
            with autocast(device, cfg.precision):
                out = step(model, batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(state.step)
            state.step += 1
            n_steps += 1
            state.samples += size_of(batch)
            tot_loss += loss.detach().float()
            for k, v in logs.items():
                extras[k] = extras.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else float(v))
            if n_steps % 20 == 0:
                _check_finite(tot_loss, desc, epoch, state.step)
                bar.set_postfix(loss=f"{float(tot_loss) / n_steps:.4f}")
        _check_finite(tot_loss, desc, epoch, state.step)
        epoch_time = time.perf_counter() - t0
        state.train_seconds += epoch_time
        metrics: dict[str, float] = {"loss": float(tot_loss) / max(n_steps, 1), "epoch_time_s": epoch_time}
        metrics.update({k: float(v) / max(n_steps, 1) for k, v in extras.items()})
        for cb in callbacks:
            cb.on_train_epoch_end(model, state, metrics)
        if ema is not None:
            ema.swap_in()  # evaluation and the best-weights copy below see the average
        if evaluate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            model.eval()
            metrics.update(evaluate(model, epoch))
        metrics["epoch"] = epoch + 1
        state.history.append(metrics)
        value = metrics.get(cfg.monitor)
        if value is not None:
            if _is_better(value, state.best_value, cfg.mode):
                state.best_value, state.best_epoch, state.bad_epochs = float(value), epoch + 1, 0
                state.best_metrics = dict(metrics)
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
            else:
                state.bad_epochs += 1
                if cfg.patience and state.bad_epochs >= cfg.patience:
                    state.stopped_early = True
        if ema is not None:
            ema.swap_out()
        state.epoch += 1
        log.info("%s epoch %d/%d: %s", desc, epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("epoch",) and isinstance(v, float)))
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, model, optimizer, state, best_state, scheduler, ema, generators)
        for cb in callbacks:
            cb.on_epoch_end(model, state, metrics, ckpt_path)

    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    elif ema is not None:
        ema.swap_in(keep_trained=False)  # no monitored best: return the final average
    if best_state is None and state.history:
        state.best_metrics, state.best_epoch = dict(state.history[-1]), len(state.history)
    result = FitResult(
        best_epoch=state.best_epoch,
        best_metrics=state.best_metrics,
        history=state.history,
        stopped_early=state.stopped_early,
        train_seconds=state.train_seconds,
        samples_per_second=state.samples / state.train_seconds if state.train_seconds > 0 else 0.0,
    )
    for cb in callbacks:
        cb.on_fit_end(model, state, result)
    return result


def _check_finite(total_loss: torch.Tensor, desc: str, epoch: int, step: int) -> None:
    """Raise once the running loss sum is NaN/inf (it stays so once any step's loss was)."""
    if not bool(torch.isfinite(total_loss)):
        raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch + 1}, by step {step} (the training "
                                 "diverged: lower the learning rate, or use precision fp32)")


def _default_batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
    return 1
