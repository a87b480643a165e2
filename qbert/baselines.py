"""ID-only baselines (SASRec, BERT4Rec): config, training run, checkpoint reload and evaluation.

A run trains through :func:`qbert.train.fit` with early stopping on valid NDCG@10, restores the
best epoch's weights, evaluates valid and test by full ranking, and writes into ``out_dir``::

    metrics.json   test/valid metric dicts, best epoch, timings, params, config, git, data
    config.yaml    the resolved BaselineConfig
    model.pt       best weights + what is needed to rebuild the model (``load_run``)
    checkpoints/   the loop's last.pt (resume)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from qbert.config import Config, ConfigError
from qbert.data.dataset import SeqDataset
from qbert.data.split import ColdStartConfig, LeaveOneOutSplit
from qbert.eval import METRIC_NAMES
from qbert.eval.evaluator import rank_targets
from qbert.eval.metrics import metrics_from_ranks
from qbert.eval.report import PROTOCOL_KEYS, by_protocol, cold_start_report, write_ranks
from qbert.seqrec.batching import batch_indices, iterate_trimmed, masked_item_rows, next_item_rows
from qbert.seqrec.bert4rec import BERT4Rec, mask_items
from qbert.seqrec.sasrec import SASRec
from qbert.train.loop import Batches, FitResult, LoopConfig, fit
from qbert.train.optim import build_optimizer
from qbert.utils.io import atomic_path, atomic_write_json, load_weights
from qbert.utils.runtime import git_commit, machine_info, pick_device, seed_everything

log = logging.getLogger(__name__)

MODEL_DEFAULTS = {  # RecBole 1.2 defaults, the settings of the paper's baseline rows
    "sasrec": {"dropout": 0.5, "attn_dropout": 0.5},
    "bert4rec": {"dropout": 0.2, "attn_dropout": 0.2},
}


class BaselineConfig(Config):
    model: Literal["sasrec", "bert4rec"] = "sasrec"
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    inner: int = Field(256, ge=1)  # FFN width
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None -> model default (SASRec 0.5, BERT4Rec 0.2)
    attn_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    pre_ln: bool = False
    max_len: int = 50
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # RecBole clips nothing
    epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=0)  # epochs without a better valid NDCG@10; 0 = never stop early
    seed: int = 2020
    device: str = "auto"
    exclude_history: bool = False  # RecBole's full-sort of sequential models keeps history items
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    # Training rows. 'windows' = RecBole's rows (one per training target: its prefix history);
    # SASRec predicts the target, BERT4Rec gets the target appended as the always-masked last item.
    # 'positions' = one row per user (tiled when longer than max_len): SASRec predicts the next
    # item at every position (same targets per epoch, ~5x fewer tokens), BERT4Rec masks items.
    train_mode: Literal["positions", "windows"] = "windows"
    mask_prob: float = Field(0.2, ge=0.0, le=1.0)  # BERT4Rec
    bucket: bool = True  # length-bucketed batches (then trimmed): same rows per epoch, less padding
    eval_batch_size: int = 1024
    progress: bool = True
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)  # withhold "new" items from training

    def resolved(self) -> "BaselineConfig":
        """A copy with model-dependent defaults filled in (what the run actually used)."""
        d = self.to_dict()
        for k, v in MODEL_DEFAULTS[self.model].items():
            if d[k] is None:
                d[k] = v
        if d["max_len"] < 2:
            raise ConfigError(f"field 'max_len': must be >= 2, got {d['max_len']}")
        return BaselineConfig.from_dict(d)


def build_model(cfg: BaselineConfig, num_items: int) -> nn.Module:
    cfg = cfg.resolved()
    cls = {"sasrec": SASRec, "bert4rec": BERT4Rec}[cfg.model]
    return cls(num_items, max_len=cfg.max_len, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
               inner=cfg.inner, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, pre_ln=cfg.pre_ln)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


class Trainer:
    """Training rows, batches and the step of one baseline; ``batches(epoch)`` reshuffles per epoch."""

    def __init__(self, cfg: BaselineConfig, split: LeaveOneOutSplit, device: torch.device):
        self.cfg, self.split, self.device = cfg, split, device
        if cfg.model == "sasrec":
            self.inputs, self.targets = next_item_rows(split, cfg.train_mode, cfg.max_len)
            self.num_targets = int((self.targets >= 0).sum())
        else:
            self.inputs = masked_item_rows(split, cfg.train_mode, cfg.max_len)
            self.targets = None
            self.num_targets = int((self.inputs > 0).sum())
        self.lengths = (self.inputs > 0).sum(axis=1)

    def batches(self, epoch: int) -> Batches:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        idx = batch_indices(self.lengths, self.cfg.batch_size, rng, bucket=self.cfg.bucket)
        return Batches(self._epoch(idx, rng), len(idx))

    def _epoch(self, idx: list[np.ndarray], rng: np.random.Generator):
        if self.cfg.model == "sasrec":
            for inp, tgt in iterate_trimmed((self.inputs, self.targets), self.lengths, idx):
                yield torch.from_numpy(inp), torch.from_numpy(tgt)
        else:
            mask_token = self.split.num_items + 1
            for (rows,) in iterate_trimmed((self.inputs,), self.lengths, idx):
                inp, lab = mask_items(rows, mask_token, self.cfg.mask_prob, rng)
                yield torch.from_numpy(inp), torch.from_numpy(lab)

    def step(self, model: nn.Module, batch) -> torch.Tensor:
        inp, tgt = (t.to(self.device, non_blocking=True) for t in batch)
        return model.loss(inp, tgt)

    def rows_of(self, batch) -> int:
        """Samples counted for throughput: SASRec = training targets (RecBole's rows), BERT4Rec = sequences."""
        return int((batch[1] >= 0).sum()) if self.cfg.model == "sasrec" else int(batch[0].shape[0])


def history_for(model_kind: str, split: LeaveOneOutSplit, which: str, max_len: int) -> np.ndarray:
    """Evaluation histories in the model's token space (items +1, pad 0); BERT4Rec leaves room for [MASK]."""
    L = max_len - 1 if model_kind == "bert4rec" else max_len
    return split.history(which, pad=0, shift=1, max_len=L)


def evaluate_model(model: nn.Module, model_kind: str, split: LeaveOneOutSplit, which: str, max_len: int,
                   device: torch.device, exclude_history: bool = False, batch_size: int = 1024,
                   progress: bool = False) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``which`` ('valid' or 'test').

    Users are visited shortest-history first so that per-batch trimming removes padding; the
    metrics are means over users, so the order does not change them.
    """
    protocol = "excluded" if exclude_history else "kept"
    r = model_ranks(model, model_kind, split, which, max_len, device, batch_size, (protocol,), progress)[protocol]
    return {**metrics_from_ranks(r), "users": int(len(r))}


@torch.no_grad()
def model_ranks(model: nn.Module, model_kind: str, split: LeaveOneOutSplit, which: str, max_len: int,
                device: torch.device, batch_size: int = 1024, protocols: tuple[str, ...] = ("kept", "excluded"),
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-user 0-based target ranks of ``which`` under each protocol, from one scoring pass."""
    model.eval()
    return rank_targets(model.score, history_for(model_kind, split, which, max_len), split.targets(which),
                        split.num_items, batch_size, protocols, history_pad=0, history_shift=1, device=device,
                        progress=progress, desc=f"eval {which}")


def run_baseline(cfg: BaselineConfig, dataset: SeqDataset, out_dir: str | Path, data_source: str | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Train, early-stop on valid NDCG@10, evaluate the best epoch; write the run directory.

    ``cfg.num_threads`` applies for the duration of the run (torch's setting is process-wide).
    ``data_source`` is recorded in ``model.pt`` (a local path made absolute, so the run can be
    re-scored from any directory).
    """
    cfg = cfg.resolved()
    if data_source and Path(data_source).exists():
        data_source = str(Path(data_source).resolve())
    prev_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, dataset, Path(out_dir), data_source, resume)
    finally:
        torch.set_num_threads(prev_threads)


# where a run executes, and how long it may go on: not what its epochs train (a longer budget continues)
_NOT_TRAINED = ("device", "num_threads", "progress", "eval_batch_size", "epochs", "patience")


def _resumable(checkpoints: Path, cfg: BaselineConfig, dataset: SeqDataset) -> bool:
    """Record the settings and data a checkpoint in ``checkpoints`` is made with
    (``settings.json``); False when the checkpoint there was made with others: it is deleted, so
    training starts afresh and a later resume cannot continue it under these settings. A
    checkpoint written before the record existed counts as resumable."""
    settings = {**{k: v for k, v in cfg.to_dict().items() if k not in _NOT_TRAINED},
                "data_fingerprint": dataset.fingerprint()}
    record, last = checkpoints / "settings.json", checkpoints / "last.pt"
    same = not record.is_file() or json.loads(record.read_text()) == json.loads(json.dumps(settings))
    if last.is_file() and not same:
        log.warning("%s was made with other settings or data: deleted, training starts afresh", last)
        last.unlink()
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, settings)
    return same


def _run(cfg: BaselineConfig, dataset: SeqDataset, out: Path, data_source: str | None, resume: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    split = cfg.cold_start.apply(LeaveOneOutSplit(dataset, max_len=cfg.max_len))
    model = build_model(cfg, split.num_items).to(device)
    trainer = Trainer(cfg, split, device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, kind="adam")
    eval_times: list[float] = []

    def evaluate(m: nn.Module, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        res = evaluate_model(m, cfg.model, split, "valid", cfg.max_len, device, cfg.exclude_history, cfg.eval_batch_size)
        eval_times.append(time.perf_counter() - t0)
        log.info("%s epoch %d: valid %s", cfg.model, epoch + 1, {k: round(v, 4) for k, v in res.items()})
        return res

    loop_cfg = LoopConfig(epochs=cfg.epochs, patience=cfg.patience, monitor="NDCG@10", mode="max",
                          grad_clip=cfg.grad_clip, progress=cfg.progress)
    resume = _resumable(out / "checkpoints", cfg, dataset) and resume
    started = _dt.datetime.now(_dt.timezone.utc)
    result: FitResult = fit(model, optimizer, trainer.batches, trainer.step, loop_cfg, evaluate=evaluate,
                            checkpoint_dir=out / "checkpoints", resume=resume, desc=cfg.model,
                            batch_size_of=trainer.rows_of)
    t0 = time.perf_counter()
    ranks = {w: model_ranks(model, cfg.model, split, w, cfg.max_len, device, cfg.eval_batch_size)
             for w in ("valid", "test")}
    test_time = (time.perf_counter() - t0) / 2  # one pass over valid, one over test
    write_ranks(out / "test_ranks.parquet", split.targets("test"), ranks["test"])
    by_split = {w: by_protocol(r) for w, r in ranks.items()}
    test = by_split["test"][PROTOCOL_KEYS["excluded" if cfg.exclude_history else "kept"]]
    cold = cold_start_report(split, ranks, cfg.cold_start)
    valid = {k: result.best_metrics[k] for k in METRIC_NAMES if k in result.best_metrics}
    epoch_times = [h["epoch_time_s"] for h in result.history]
    metrics = {
        "model": cfg.model,
        "test": {k: test[k] for k in METRIC_NAMES},
        "valid": valid,
        "by_protocol": by_split,
        **({"cold_start": cold} if cold else {}),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "timing": {
            "train_seconds": result.train_seconds,
            "epoch_time_s_mean": float(np.mean(epoch_times)) if epoch_times else 0.0,
            "epoch_time_s_min": float(np.min(epoch_times)) if epoch_times else 0.0,
            "train_samples_per_s": result.samples_per_second,
            "train_samples_per_epoch": trainer.num_targets if cfg.model == "sasrec" else len(trainer.inputs),
            "train_sequences_per_epoch": int(len(trainer.inputs)),
            "eval_seconds_per_user": test_time / max(split.num_users, 1),
            "valid_eval_seconds_mean": float(np.mean(eval_times)) if eval_times else 0.0,
            "torch_threads": torch.get_num_threads(),
        },
        "params": count_parameters(model),
        "config": cfg.to_dict(),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "device": str(device),
        "data": {"source": data_source, "fingerprint": dataset.fingerprint(), "stats": dataset.stats()},
        "started_utc": started.isoformat(timespec="seconds"),
        "history": result.history,
    }
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": cfg.to_dict(),
                    "num_items": split.num_items, "data_fingerprint": dataset.fingerprint(),
                    "data_source": data_source}, tmp)
    cfg.to_yaml(out / "config.yaml")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[nn.Module, BaselineConfig, dict[str, Any]]:
    """(model with the best weights, its config, the raw checkpoint payload) of a baseline run."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished baseline run directory")
    payload = load_weights(path, "baseline model")
    cfg = BaselineConfig.from_dict(payload["config"], source=str(path))
    model = build_model(cfg, int(payload["num_items"]))
    model.load_state_dict(payload["model"])
    return model.to(pick_device(device)), cfg, payload


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (config, num_items, data source and fingerprint) without weights."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished baseline run directory")
    payload = load_weights(path, "baseline model")
    return {k: v for k, v in payload.items() if k != "model"}


def evaluate_run(run_dir: str | Path, dataset: SeqDataset, which: str = "test", exclude_history: bool | None = None,
                 device: str = "auto", progress: bool = False) -> dict[str, float]:
    """Re-evaluate a finished run's best checkpoint on ``dataset`` (must be the training data)."""
    model, cfg, payload = load_run(run_dir, device)
    fp = dataset.fingerprint()
    if payload.get("data_fingerprint") not in (None, fp):
        from qbert.data.errors import DataError

        raise DataError(f"dataset fingerprint {fp} differs from the run's {payload['data_fingerprint']}"
                        f" ({payload.get('data_source')}): evaluate on the data the model was trained on")
    split = LeaveOneOutSplit(dataset, max_len=cfg.max_len)
    excl = cfg.exclude_history if exclude_history is None else exclude_history
    dev = next(model.parameters()).device
    res = evaluate_model(model, cfg.model, split, which, cfg.max_len, dev, excl, cfg.eval_batch_size, progress)
    return res
