"""Stage 1 runner: validate features, train the fusion model with the shared loop, export
the fused embeddings (hard early exit) and the report of paper Fig. 7 / Sec. 4.5."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from qbert.data.dataset import fixed_list_to_numpy, numpy_to_fixed_list
from qbert.data.errors import DataError
from qbert.fusion.config import FEATURE_MODALITIES, FusionConfig
from qbert.fusion.losses import BatchShard, fusion_loss
from qbert.fusion.modules import FusionModel
from qbert.train import Batches, Callback, FitResult, LoopConfig, fit
from qbert.train.distributed import rank_world
from qbert.train.optim import build_optimizer
from qbert.utils.io import atomic_path, atomic_write_json
from qbert.utils.runtime import pick_device, seed_everything


@dataclass
class FusionResult:
    embeddings: np.ndarray  # [N, D] float32, hard early exit
    report: dict[str, Any]
    model: FusionModel
    depth: np.ndarray  # [N] int: activated layers per item
    fit: FitResult | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        """``embeddings.parquet``, ``fusion_report.json`` and ``fusion_model.pt`` under ``directory``."""
        d = Path(directory)
        write_fusion_embeddings(d / "embeddings.parquet", self.embeddings)
        atomic_write_json(d / "fusion_report.json", self.report)
        with atomic_path(d / "fusion_model.pt") as tmp:
            torch.save({"config": self.model.cfg.to_dict(), "num_items": self.model.num_items,
                        "state_dict": self.model.state_dict()}, tmp)
        return d


def validate_features(features: Mapping[str, Any], cfg: FusionConfig,
                      num_items: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Check the inputs before any training; return float32 [N, S, d] arrays of the enabled
    feature modalities and N. Every error names the modality (and item) at fault."""
    if not isinstance(features, Mapping):
        raise DataError(f"features must be a dict modality -> array, got {type(features).__name__}")
    for name in features:
        if name not in FEATURE_MODALITIES:
            hint = " ('id' is learned and takes no features)" if name == "id" else ""
            raise DataError(f"unknown feature modality '{name}'{hint}; expected one of {list(FEATURE_MODALITIES)}")
    out: dict[str, np.ndarray] = {}
    for m in cfg.feature_modalities:
        if m not in features or features[m] is None:
            raise DataError(f"modality '{m}' is enabled but no features were given (have: {sorted(features)})")
        out[m] = _check_array(m, features[m])
    rows = {m: a.shape[0] for m, a in out.items()}
    if num_items is not None:
        bad = {m: r for m, r in rows.items() if r != num_items}
        if bad:
            raise DataError(f"features have the wrong number of rows for {num_items} items: {bad}")
    elif len(set(rows.values())) > 1:
        raise DataError(f"feature modalities disagree on the number of items: {rows}")
    n = num_items if num_items is not None else (next(iter(rows.values())) if rows else None)
    if n is None:  # id only: take the count from any (disabled) features given
        given = [np.shape(v)[0] for v in features.values() if v is not None and np.ndim(v) >= 1]
        if not given:
            raise DataError("with only the 'id' modality, pass num_items (no features to count items from)")
        n = given[0]
    if n < 2:
        raise DataError(f"need at least 2 items to train fusion, got {n}")
    return out, int(n)


def _check_array(m: str, value: Any) -> np.ndarray:
    try:
        a = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise DataError(f"features of modality '{m}' have inconsistent dimensions: {e}") from None
    if a.dtype == object:
        raise DataError(f"features of modality '{m}' have inconsistent dimensions (ragged rows)")
    if a.dtype.kind not in "fiub":
        raise DataError(f"features of modality '{m}' must be numeric, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or min(a.shape) == 0:
        raise DataError(f"features of modality '{m}' must be [items, dim] or [items, set, dim] and non-empty, "
                        f"got shape {np.shape(value)}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    finite = np.isfinite(a).reshape(a.shape[0], -1).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"features of modality '{m}' contain NaN/inf for {bad.size} items (first: item {bad[0]})")
    empty = ~(a != 0).reshape(a.shape[0], -1).any(1)
    if empty.any():
        bad = np.flatnonzero(empty)
        raise DataError(f"{bad.size} items have no features (all zeros) for enabled modality '{m}' "
                        f"(first: item {bad[0]})")
    return a


def default_loop_config(cfg: FusionConfig) -> LoopConfig:
    return LoopConfig.fixed_epochs(cfg.epochs)


def train_fusion(features: Mapping[str, Any], cfg: FusionConfig, loop_cfg: LoopConfig | None = None,
                 callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
                 num_items: int | None = None, shard: tuple[int, int] | None = None) -> FusionResult:
    """Train stage 1 on ``features`` ({"text": [N, d] or [N, S, d], "image": ...}).

    Items are the samples: each batch is a random set of item indices. ``loop_cfg`` (default:
    ``cfg.epochs`` epochs, final weights kept) overrides how long to train. With only
    the ``id`` modality there is no content signal, so nothing is trained and the embeddings
    are the (seeded, random) ID vectors. ``shard`` (rank, world): ``cfg.batch_size`` is this
    rank's part of a global batch of ``batch_size * world`` items, drawn identically on every
    rank; rank r takes items ``r::world`` and the loss is exactly the global batch's
    (:class:`~qbert.fusion.losses.BatchShard`). Global batches of fewer than ``max(2, world)``
    items are skipped (InfoNCE needs negatives, every rank needs an item).
    """
    feats, n = validate_features(features, cfg, num_items)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = FusionModel(cfg, n, {m: a.shape[-1] for m, a in feats.items()}).to(device)
    tensors = {m: torch.from_numpy(a).to(device) for m, a in feats.items()}
    loop_cfg = loop_cfg or default_loop_config(cfg)
    fit_result = None
    if model.transformer is not None and loop_cfg.epochs > 0:
        opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
        rank, world = rank_world(shard)
        bs = min(cfg.batch_size * world, n)  # the global batch
        smallest = max(2, world)  # InfoNCE needs negatives; every rank needs an item

        def epoch_batches(epoch: int):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # no rank: the global batch
            perm = torch.randperm(n, generator=g).to(device)  # one copy per epoch, none per step
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                if idx.numel() >= smallest:
                    part = BatchShard(idx.numel() / world, -(-idx.numel() // world)) if world > 1 else None
                    yield idx[rank::world], part

        per_epoch = sum(1 for i in range(0, n, bs) if min(bs, n - i) >= smallest)

        def batches(epoch: int) -> Batches:
            return Batches(epoch_batches(epoch), per_epoch)

        def step(m: FusionModel, batch: tuple[torch.Tensor, BatchShard | None]):
            idx, part = batch
            return fusion_loss(m(idx, {k: t[idx] for k, t in tensors.items()}), cfg, part)

        fit_result = fit(model, opt, batches, step, loop_cfg, callbacks=callbacks,
                         checkpoint_dir=checkpoint_dir, desc="fusion")
    emb, depth, mse = infer_fusion(model, tensors, n, cfg.infer_batch_size)
    report = fusion_report(cfg, model, depth, mse, fit_result)
    return FusionResult(emb, report, model, depth, fit_result)


@torch.no_grad()
def infer_fusion(model: FusionModel, tensors: dict[str, torch.Tensor], n: int,
                 batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Fused embeddings of all items with hard early exit; activated layers per item; and the
    mean squared error between each (L2-normalised) modality embedding and the fused one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    embs, depths = [], []
    sq = {m: 0.0 for m in [*model.modalities, *(["id"] if model.cfg.use_id else [])]}
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n), device=device)
        out = model(idx, {k: t[idx] for k, t in tensors.items()}, hard=True)
        h = F.normalize(out.fused, dim=-1)
        views = dict(out.aligned)
        if model.cfg.use_id:
            views["id"] = out.query
        for m, x in views.items():
            sq[m] += float(F.mse_loss(F.normalize(x, dim=-1), h, reduction="sum"))
        embs.append(out.fused.float().cpu())
        depths.append(out.depth.cpu())
    model.train(was_training)
    dim = model.cfg.dim
    mse = {m: v / (n * dim) for m, v in sq.items()}
    return torch.cat(embs).numpy(), torch.cat(depths).round().long().numpy(), mse


def fusion_report(cfg: FusionConfig, model: FusionModel, depth: np.ndarray, mse: dict[str, float],
                  fit_result: FitResult | None) -> dict[str, Any]:
    """Activated-layer distribution (paper Fig. 7), modality-vs-fused MSE (Sec. 4.5), losses."""
    L = cfg.layers
    counts = np.bincount(depth, minlength=L + 1)[1:L + 1]
    report: dict[str, Any] = {
        "num_items": int(depth.shape[0]),
        "variant": cfg.variant,
        "modalities": list(cfg.modalities),
        "trained": fit_result is not None,
        "activated_layer_counts": counts.tolist(),  # index 0 = exited after layer 1
        "activated_layers_median": float(np.median(depth)),
        "activated_layers_mean": float(depth.mean()),
        "modality_mse": mse,
        "tau": float(model.tau.detach().cpu()),
    }
    if fit_result is not None and fit_result.history:
        last = fit_result.history[-1]
        report["final_losses"] = {k: float(v) for k, v in last.items() if k not in ("epoch", "epoch_time_s")}
        report["best_epoch"] = fit_result.best_epoch
        report["epochs_run"] = len(fit_result.history)
        report["train_seconds"] = fit_result.train_seconds
        report["history"] = [{k: float(v) for k, v in h.items()} for h in fit_result.history]
    if model.transformer is None:
        report["note"] = "id only: no content signal, embeddings are the random ID vectors (untrained)"
    return report


def fusion_embeddings_table(embeddings: np.ndarray, item_ids: np.ndarray | None = None) -> pa.Table:
    """item_id (int64) + embedding (fixed_size_list<float32>[D]) for stage 2 and the artifact store."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise DataError(f"embeddings must be [items, dim], got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise DataError("embeddings contain NaN/inf")
    ids = np.arange(emb.shape[0], dtype=np.int64) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    if ids.shape != (emb.shape[0],):
        raise DataError(f"item_ids must have {emb.shape[0]} entries, got shape {ids.shape}")
    return pa.table({"item_id": pa.array(ids), "embedding": numpy_to_fixed_list(emb)})


def write_fusion_embeddings(path: str | Path, embeddings: np.ndarray, item_ids: np.ndarray | None = None) -> Path:
    """Atomically write the embeddings table to parquet."""
    table = fusion_embeddings_table(embeddings, item_ids)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_fusion_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids int64 [N], embeddings float32 [N, D]) sorted by item id, validated."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fusion embeddings not found: {p}")
    table = pq.read_table(p)
    for col in ("item_id", "embedding"):
        if col not in table.column_names:
            raise DataError(f"{p}: missing column '{col}' (has {table.column_names})")
    ids = table.column("item_id").to_numpy().astype(np.int64)
    emb = fixed_list_to_numpy(table.column("embedding"), f"{p}:embedding")
    if np.unique(ids).size != ids.size:
        raise DataError(f"{p}: duplicate item_id values")
    if not np.isfinite(emb).all():
        raise DataError(f"{p}: embedding column contains NaN/inf")
    order = np.argsort(ids, kind="stable")
    return ids[order], emb[order]
