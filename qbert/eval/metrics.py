"""HR@k and NDCG@k from full-ranking scores (one relevant item per user, as in the paper).

Ties are broken pessimistically: the target's rank counts every other item whose score is
greater *or equal*. A model that outputs constant scores therefore scores zero instead of
being credited by item order, and the result never depends on the sort algorithm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

KS_HR = (1, 5, 10)
KS_NDCG = (5, 10)
METRIC_NAMES = tuple([f"HR@{k}" for k in KS_HR] + [f"NDCG@{k}" for k in KS_NDCG])


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items. scores [B, N], targets [B] -> [B] int64.

    ``exclude`` (bool [B, N]) removes items from the ranking (e.g. history items); the target
    itself is never excluded.
    """
    scores = scores.float()
    if exclude is not None:
        exclude = exclude.clone()
        exclude[torch.arange(len(targets), device=scores.device), targets] = False
        scores = scores.masked_fill(exclude, float("-inf"))
    target_score = scores.gather(1, targets.view(-1, 1))
    # >= counts the target itself once, hence the -1
    return (scores >= target_score).sum(dim=1) - 1


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor) -> dict[str, float]:
    r = torch.as_tensor(ranks).double()
    out: dict[str, float] = {}
    for k in KS_HR:
        out[f"HR@{k}"] = float((r < k).double().mean())
    gains = 1.0 / torch.log2(r + 2.0)
    for k in KS_NDCG:
        out[f"NDCG@{k}"] = float(torch.where(r < k, gains, torch.zeros_like(gains)).mean())
    return out


def ndcg_at(rank: int, k: int) -> float:
    """Scalar reference used by tests and docs: 1/log2(rank+2) if rank < k else 0."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0


def slice_metrics(ranks: np.ndarray | torch.Tensor, targets: np.ndarray, items: np.ndarray) -> dict[str, dict]:
    """Metrics of the users whose target is in ``items`` ("new") and of the others ("known"),
    with their counts: the cold-start protocol's two slices of one evaluation."""
    r = torch.as_tensor(ranks)
    new = torch.from_numpy(np.isin(np.asarray(targets), np.asarray(items)))
    return {name: {**(metrics_from_ranks(r[m]) if bool(m.any()) else {}), "users": int(m.sum())}
            for name, m in (("new", new), ("known", ~new))}


def target_concentration(ranks: np.ndarray | torch.Tensor, targets: np.ndarray, items: np.ndarray,
                         k: int = 10) -> dict[str, Any]:
    """How far single target items carry the HR@k of the users whose target is in ``items``.

    A slice such as cold-start targets can hold a few popular items, and its HR@k then mostly says
    whether one of them reaches the top k. Returns the slice's users, hits and distinct target
    items; its most frequent target (item, users, hits); the target with the most hits (item,
    users, hits; None without hits; ties go to the lowest item id, as for the most frequent); and
    the item-macro HR@k and NDCG@k (each target item's users averaged first,
    then the items: every item counts once however many users it has).
    """
    r = ranks.double().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks, dtype=np.float64)
    t = np.asarray(targets)
    m = np.isin(t, np.asarray(items))
    r, t = r[m], t[m]
    if not r.size:
        return {"users": 0, "hits": 0, "distinct_targets": 0}
    hit = (r < k).astype(np.float64)
    gain = np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)
    uniq, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=hit).astype(np.int64)
    item = lambda i: {"item": int(uniq[i]), "users": int(counts[i]), "hits": int(hits[i])}  # noqa: E731
    return {"users": int(r.size), "hits": int(hits.sum()), "distinct_targets": int(uniq.size),
            "most_frequent_target": item(int(np.argmax(counts))),
            "most_hit_target": item(int(np.argmax(hits))) if hits.any() else None,
            "item_macro": {f"HR@{k}": float((hits / counts).mean()),
                           f"NDCG@{k}": float((np.bincount(inverse, weights=gain) / counts).mean())}}
