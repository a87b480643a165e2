"""Leave-one-out split (test target = last item, valid target = second to last).

All views are index arithmetic over the dataset's CSR arrays: no per-user Python loop.
Histories keep the most recent ``max_len`` items and are left-padded, so the newest item
is always in the last column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbert.data.dataset import SeqDataset

DEFAULT_MAX_LEN = 50


def windows(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int,
            pad: int = 0, shift: int = 0) -> np.ndarray:
    """Rows ``flat[max(start, end - max_len):end] + shift``, left-padded with ``pad`` to ``max_len``."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    length = np.minimum(ends - starts, max_len)
    cols = np.arange(max_len, dtype=np.int64)
    offset = max_len - length  # first real column of each row
    idx = (ends - length)[:, None] + (cols[None, :] - offset[:, None])
    valid = cols[None, :] >= offset[:, None]
    out = np.where(valid, flat[np.clip(idx, 0, max(len(flat) - 1, 0))] + shift, pad)
    return out.astype(np.int64, copy=False)


@dataclass
class LeaveOneOutSplit:
    """Per-user train part, valid and test targets of a :class:`SeqDataset`."""

    dataset: SeqDataset
    max_len: int = DEFAULT_MAX_LEN

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        off = self.dataset.seq_offsets
        self.user_start = off[:-1]
        self.train_end = off[1:] - 2  # exclusive end of each user's training part
        self.valid_targets = self.dataset.seq_items[off[1:] - 2]
        self.test_targets = self.dataset.seq_items[off[1:] - 1]

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    @property
    def num_users(self) -> int:
        return self.dataset.num_users

    # --- evaluation views ------------------------------------------------------
    def history(self, which: str, pad: int = 0, shift: int = 0, max_len: int | None = None) -> np.ndarray:
        """[U, max_len] histories for ``which`` in {'valid', 'test'}: the items before the target."""
        ends = {"valid": self.train_end, "test": self.train_end + 1}[which]
        return windows(self.dataset.seq_items, self.user_start, ends, max_len or self.max_len, pad, shift)

    def targets(self, which: str) -> np.ndarray:
        return {"valid": self.valid_targets, "test": self.test_targets}[which]

    # --- training views --------------------------------------------------------
    def train_target_positions(self) -> np.ndarray:
        """Flat positions of every training target: each training-part item but a user's first.

        This is the row set of RecBole/MQL4GRec ``*.train.inter`` (prefix augmentation).
        """
        lengths = self.train_end - self.user_start
        n = int(np.maximum(lengths - 1, 0).sum())
        owner = np.repeat(np.arange(self.num_users), np.maximum(lengths - 1, 0))
        first = np.cumsum(np.maximum(lengths - 1, 0)) - np.maximum(lengths - 1, 0)
        within = np.arange(n) - first[owner] + 1
        return self.user_start[owner] + within

    def train_windows(self, pad: int = 0, shift: int = 0, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(histories [M, max_len], targets [M]) for next-item training on every prefix."""
        pos = self.train_target_positions()
        owner = np.searchsorted(self.dataset.seq_offsets, pos, side="right") - 1
        hist = windows(self.dataset.seq_items, self.user_start[owner], pos, max_len or self.max_len, pad, shift)
        return hist, self.dataset.seq_items[pos]

    def train_sequences(self, pad: int = 0, shift: int = 0, max_len: int | None = None) -> np.ndarray:
        """[U, max_len] most recent training-part items of each user (for masked-item training)."""
        return windows(self.dataset.seq_items, self.user_start, self.train_end, max_len or self.max_len, pad, shift)
