"""Vectorised training rows and batches for the sequence models.

Rows are built once per run as index arithmetic over the dataset's CSR arrays; an epoch is a
permutation plus per-batch fancy indexing, never per-sample Python. Rows are left-padded, so a
batch is trimmed to its longest row (see ``layers.trim_left_padding``); length bucketing makes
that trimming pay off on short-sequence data (Instruments: median 4 training items).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qbert.data.split import LeaveOneOutSplit, windows


def chunk_rows(split: LeaveOneOutSplit, width: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of windows of ``width`` items tiling each user's training part from the end.

    Consecutive windows of a user overlap by ``overlap`` items, so every training target is
    covered exactly once: ``overlap=1`` for next-item training (a window of ``max_len + 1``
    items holds ``max_len`` input/target pairs), ``overlap=0`` for masked-item training.
    """
    stride = width - overlap
    us, te = split.train_start, split.train_end
    units = np.maximum(te - us - overlap, 0)
    n_chunks = -(-units // stride)  # ceil
    owner = np.repeat(np.arange(len(us)), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    j = np.arange(int(n_chunks.sum())) - first[owner]
    ends = te[owner] - j * stride
    starts = np.maximum(us[owner], ends - width)
    return starts, ends


def next_item_rows(split: LeaveOneOutSplit, mode: str = "positions", max_len: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [M, L], targets [M, L]) for causal next-item training; items shifted by +1, pad 0.

    ``targets`` holds the 0-based item to predict after each input column and -1 where there is
    none. Both modes cover exactly the training targets of RecBole's ``*.train.inter``:
    - ``windows``: one row per prefix (RecBole's rows), only the last column is a target;
    - ``positions``: one row per user (more for users longer than ``max_len``), every column a
      target (SASRec's original per-position training; ~5x fewer tokens on Instruments).
    """
    L = max_len or split.max_len
    flat = split.train_items
    if mode == "windows":
        hist, tgt = split.train_windows(pad=0, shift=1, max_len=L)
        targets = np.full(hist.shape, -1, dtype=np.int64)
        targets[:, -1] = tgt
        return hist, targets
    if mode != "positions":
        raise ValueError(f"unknown next-item training mode {mode!r}; use 'positions' or 'windows'")
    starts, ends = chunk_rows(split, L + 1, overlap=1)
    w = windows(flat, starts, ends, L + 1, pad=0, shift=1)
    inputs, targets = w[:, :-1], w[:, 1:] - 1
    targets = np.where(inputs > 0, targets, -1)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def masked_item_rows(split: LeaveOneOutSplit, mode: str = "positions", max_len: int | None = None) -> np.ndarray:
    """[M, L] rows (items +1, pad 0, left-padded) for masked-item training.

    - ``positions``: each user's training part tiled into windows, every item once;
    - ``windows``: RecBole's rows, one per training target: its history with the target
      appended in the last column (so every target is once the always-masked last item).
    """
    L = max_len or split.max_len
    if mode == "windows":
        ends = split.train_target_positions() + 1
        starts = split.train_start[split.train_owner(ends - 1)]
    elif mode == "positions":
        starts, ends = chunk_rows(split, L, overlap=0)
    else:
        raise ValueError(f"unknown masked-item training mode {mode!r}; use 'positions' or 'windows'")
    return windows(split.train_items, starts, ends, L, pad=0, shift=1)


def batch_indices(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool = True,
                  bucket_batches: int = 64) -> list[np.ndarray]:
    """Row indices of each batch of one epoch: a random permutation, optionally length-bucketed.

    With ``bucket``, rows are sorted by length inside random blocks of ``bucket_batches``
    batches, cut into batches, and the batch order is shuffled: every row still appears once
    per epoch, but a batch's rows have similar lengths so trimming removes most padding.
    """
    n = len(lengths)
    order = rng.permutation(n)
    if bucket and n > batch_size:
        block = np.arange(n) // (batch_size * bucket_batches)
        order = order[np.lexsort((lengths[order], block))]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_trimmed(arrays: tuple[np.ndarray, ...], lengths: np.ndarray, batches: list[np.ndarray]
                    ) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield each batch of every array, trimmed to the batch's longest row (left-padded rows)."""
    width = arrays[0].shape[1]
    for idx in batches:
        keep = max(int(lengths[idx].max()), 1)
        yield tuple(a[idx, width - keep :] for a in arrays)
