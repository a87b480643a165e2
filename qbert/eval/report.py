"""What every model's evaluation reports, from per-user target ranks: metrics under both ranking
protocols, the cold-start protocol's slices, and the per-user ranks file. Shared by the pipeline
and the ID baselines, so their rows are computed the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from qbert.eval.metrics import metrics_from_ranks, slice_metrics
from qbert.utils.io import atomic_write_parquet

PROTOCOL_KEYS = {"kept": "history_kept", "excluded": "history_excluded"}


def by_protocol(ranks: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{history_kept | history_excluded: metrics} of one split's ranks per protocol."""
    return {PROTOCOL_KEYS[p]: metrics_from_ranks(r) for p, r in ranks.items()}


def cold_start_slices(ranks: dict[str, dict[str, torch.Tensor]], targets: dict[str, np.ndarray],
                      new_items: np.ndarray) -> dict[str, Any]:
    """{split: {protocol: {"new": metrics, "known": metrics}}}: users whose target is a new item vs the rest."""
    return {which: {PROTOCOL_KEYS[p]: slice_metrics(r, targets[which], new_items) for p, r in per.items()}
            for which, per in ranks.items()}


def cold_start_report(split, ranks: dict[str, dict[str, torch.Tensor]], protocol_cfg: Any = None) -> dict[str, Any]:
    """A run's ``cold_start`` entry from its ranks (``{split: {protocol: ranks}}``): empty unless
    ``split`` (a :class:`~qbert.data.split.LeaveOneOutSplit`) withholds items; ``protocol_cfg`` (a
    ``ColdStartConfig``) adds the fraction and seed that chose them."""
    if not split.withheld.size:
        return {}
    setting = {"fraction": protocol_cfg.fraction, "seed": protocol_cfg.seed} if protocol_cfg is not None else {}
    return {**setting, "new_items": int(split.withheld.size),
            "slices": cold_start_slices(ranks, {w: split.targets(w) for w in ranks}, split.withheld)}


def write_ranks(path: str | Path, targets: np.ndarray, ranks: dict[str, torch.Tensor]) -> None:
    """Per-user target ranks (0-based, each protocol) beside the run, so slices such as cold-start
    targets are computed from the one test evaluation instead of a second one."""
    cols = {"user": pa.array(np.arange(len(targets), dtype=np.int64)),
            "target": pa.array(np.asarray(targets, dtype=np.int64))}
    cols.update({f"rank_{PROTOCOL_KEYS[p]}": pa.array(r.numpy().astype(np.int64)) for p, r in ranks.items()})
    atomic_write_parquet(path, pa.table(cols))
