"""Batched full-ranking evaluation over the whole catalogue (no sampled negatives)."""

from __future__ import annotations

from typing import Callable, Iterator

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


def scored_batches(score_fn: ScoreFn, histories: np.ndarray, num_items: int, batch_size: int = 1024,
                   history_pad: int = 0, device: torch.device | str = "cpu", progress: bool = False,
                   desc: str = "score") -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """``(rows, history batch, scores [b, num_items])`` over every history, in order of history
    length, so each batch is trimmed to its own longest history rather than the longest overall.
    The one scoring loop of evaluation and recommendation."""
    device = torch.device(device)
    hist_all = np.asarray(histories)
    n = len(hist_all)
    order = np.argsort((hist_all != history_pad).sum(axis=1), kind="stable") if n else np.zeros(0, np.int64)
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[lo : lo + batch_size]
        hist = torch.as_tensor(hist_all[idx], device=device)
        scores = score_fn(hist)
        if scores.shape != (len(idx), num_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(len(idx), num_items)}")
        yield idx, hist, scores


@torch.no_grad()
def rank_targets(score_fn: ScoreFn, histories: np.ndarray, targets: np.ndarray, num_items: int,
                 batch_size: int = 1024, protocols: tuple[str, ...] = ("kept",), history_pad: int = 0,
                 history_shift: int = 0, device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "eval") -> dict[str, torch.Tensor]:
    """0-based rank of every user's target among all items, per protocol, in the users' order.

    ``protocols``: ``"kept"`` ranks history items too (RecBole's full sort, the paper's);
    ``"excluded"`` removes them (items stored as ``item + history_shift``, ``history_pad`` for
    padding). Both come from one scoring pass (:func:`scored_batches`).
    """
    unknown = set(protocols) - {"kept", "excluded"}
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of ('kept', 'excluded'), got {protocols}")
    tgt_all = np.asarray(targets)
    ranks = {p: torch.zeros(len(tgt_all), dtype=torch.long) for p in protocols}
    for idx, hist, scores in scored_batches(score_fn, histories, num_items, batch_size, history_pad, device,
                                            progress, desc):
        tgt = torch.as_tensor(tgt_all[idx], device=hist.device)
        where = torch.from_numpy(idx)
        if "kept" in ranks:
            ranks["kept"][where] = target_ranks(scores, tgt).cpu()
        if "excluded" in ranks:
            ranks["excluded"][where] = target_ranks(scores, tgt, history_mask(hist, num_items, history_pad,
                                                                               history_shift)).cpu()
    return ranks


@torch.no_grad()
def top_k(score_fn: ScoreFn, histories: np.ndarray, num_items: int, k: int = 10, batch_size: int = 1024,
          exclude_history: bool = False, history_pad: int = 0, history_shift: int = 0,
          device: torch.device | str = "cpu", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(items [U, k] int64, scores [U, k] float32) of the ``k`` best items for every history, best
    first, in the histories' order; ``exclude_history`` removes each history's own items."""
    k = min(int(k), num_items)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(histories)
    items, vals = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    for idx, hist, scores in scored_batches(score_fn, histories, num_items, batch_size, history_pad, device,
                                            progress, "recommend"):
        scores = scores.float()
        if exclude_history:
            scores = scores.masked_fill(history_mask(hist, num_items, history_pad, history_shift), float("-inf"))
        v, i = torch.topk(scores, k, dim=1)
        items[idx], vals[idx] = i.cpu().numpy(), v.cpu().numpy()
    return items, vals


def evaluate_ranking(score_fn: ScoreFn, histories: np.ndarray, targets: np.ndarray, num_items: int,
                     batch_size: int = 1024, exclude_history: bool = False, history_pad: int = 0,
                     history_shift: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Rank every item for every user; return HR@{1,5,10}, NDCG@{5,10} and the user count.

    ``score_fn`` maps a history batch [B, L] (as given) to scores [B, num_items].
    With ``exclude_history`` the items of the history are removed from the ranking; the
    default keeps them, as RecBole's full-sort evaluation of sequential models does. Every
    user counts exactly once.
    """
    protocol = "excluded" if exclude_history else "kept"
    r = rank_targets(score_fn, histories, targets, num_items, batch_size, (protocol,), history_pad,
                     history_shift, device, progress, desc)[protocol]
    out = metrics_from_ranks(r)
    out["users"] = int(len(r))
    return out
