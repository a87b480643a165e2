"""Batched full-ranking evaluation over the whole catalogue (no sampled negatives)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from qbert.eval.metrics import metrics_from_ranks, target_ranks

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def history_mask(hist: torch.Tensor, num_items: int, pad: int = 0, shift: int = 0) -> torch.Tensor:
    """bool [B, num_items]: True for the items in each history row (stored as item + ``shift``)."""
    out = torch.zeros(len(hist), num_items, dtype=torch.bool, device=hist.device)
    real = hist != pad
    rows = torch.arange(len(hist), device=hist.device).unsqueeze(1).expand_as(hist)
    out[rows[real], hist[real] - shift] = True
    return out


@torch.no_grad()
def evaluate_ranking(score_fn: ScoreFn, histories: np.ndarray, targets: np.ndarray, num_items: int,
                     batch_size: int = 1024, exclude_history: bool = False, history_pad: int = 0,
                     history_shift: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Rank every item for every user; return HR@{1,5,10}, NDCG@{5,10} and the user count.

    ``score_fn`` maps a history batch [B, L] (as given) to scores [B, num_items].
    With ``exclude_history`` the items of the history (stored as ``item + history_shift``,
    ``history_pad`` for padding) are removed from the ranking; the default keeps them, as
    RecBole's full-sort evaluation of sequential models does. Every user counts exactly once.
    """
    device = torch.device(device)
    ranks = []
    n = len(targets)
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        hist = torch.as_tensor(histories[lo : lo + batch_size], device=device)
        tgt = torch.as_tensor(targets[lo : lo + batch_size], device=device)
        scores = score_fn(hist)
        if scores.shape != (len(tgt), num_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(len(tgt), num_items)}")
        exclude = history_mask(hist, num_items, history_pad, history_shift) if exclude_history else None
        ranks.append(target_ranks(scores, tgt, exclude).cpu())
    r = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    out = metrics_from_ranks(r)
    out["users"] = int(len(r))
    return out
