"""Leave-one-out split (test target = last item, valid target = second to last).

All views are index arithmetic over the dataset's CSR arrays: no per-user Python loop.
Histories keep the most recent ``max_len`` items and are left-padded, so the newest item
is always in the last column.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from qbert.config import Config
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


class ColdStartConfig(Config):
    """The cold-start protocol (docs/method.md, "Cold-start items"): ``fraction`` of the catalogue
    is "new"; every interaction with a new item is removed from all training and pretraining
    inputs and targets, while stages 1-2 still see its content and valid/test stay real. 0 = off."""

    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0

    def apply(self, split: "LeaveOneOutSplit") -> "LeaveOneOutSplit":
        """``split`` with the new items withheld from training (itself when off)."""
        if self.fraction == 0:
            return split
        return split.withhold(cold_start_items(split.num_items, self.fraction, self.seed))


def cold_start_items(num_items: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The cold-start protocol's "new" items: ``round(fraction * num_items)`` of the catalogue, drawn
    uniformly without replacement from ``numpy.random.default_rng(seed)``, sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"cold-start fraction must lie in [0, 1), got {fraction}")
    n = int(round(fraction * num_items))
    return np.sort(np.random.default_rng(seed).choice(num_items, size=n, replace=False)).astype(np.int64)


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
        self.valid_pos = off[1:] - 2  # flat position of each user's valid target
        self.valid_targets = self.dataset.seq_items[off[1:] - 2]
        self.test_targets = self.dataset.seq_items[off[1:] - 1]
        # the training parts: user u's items are train_items[train_start[u]:train_end[u]]. By default
        # the dataset's own array (every item before the valid target); :meth:`withhold` compacts them
        self.train_items = self.dataset.seq_items
        self.train_start = self.user_start
        self.train_end = self.valid_pos  # exclusive end of each user's training part
        self.withheld = np.zeros(0, dtype=np.int64)

    def withhold(self, items: np.ndarray) -> "LeaveOneOutSplit":
        """The same split whose *training* views never contain ``items`` (the cold-start protocol):
        every interaction with them is removed from each user's training part (inputs and targets);
        valid and test histories and targets stay the real ones."""
        items = np.unique(np.asarray(items, dtype=np.int64))
        if items.size and (items[0] < 0 or items[-1] >= self.num_items):
            raise ValueError(f"withheld items must lie in [0, {self.num_items}), got [{items[0]}, {items[-1]}]")
        new = np.zeros(self.num_items, dtype=bool)
        new[items] = True
        flat, off = self.dataset.seq_items, self.dataset.seq_offsets
        owner = np.repeat(np.arange(self.num_users), np.diff(off))
        keep = (np.arange(len(flat)) < self.valid_pos[owner]) & ~new[flat]
        counts = np.bincount(owner[keep], minlength=self.num_users)
        out = copy.copy(self)
        out.train_items = flat[keep]
        out.train_end = np.cumsum(counts)
        out.train_start = out.train_end - counts
        out.withheld = items
        return out

    def train_counts(self) -> np.ndarray:
        """[N] how often each item occurs in the training parts (withheld items: never)."""
        lengths = self.train_end - self.train_start
        owner = np.repeat(np.arange(self.num_users), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = self.train_start[owner] + within
        return np.bincount(self.train_items[pos], minlength=self.num_items)

    def train_owner(self, positions: np.ndarray) -> np.ndarray:
        """The user of each position of ``train_items``."""
        return np.searchsorted(self.train_start, positions, side="right") - 1

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    @property
    def num_users(self) -> int:
        return self.dataset.num_users

    # --- evaluation views ------------------------------------------------------
    def history(self, which: str, pad: int = 0, shift: int = 0, max_len: int | None = None) -> np.ndarray:
        """[U, max_len] histories for ``which`` in {'valid', 'test'}: the items before the target."""
        ends = {"valid": self.valid_pos, "test": self.valid_pos + 1}[which]
        return windows(self.dataset.seq_items, self.user_start, ends, max_len or self.max_len, pad, shift)

    def targets(self, which: str) -> np.ndarray:
        return {"valid": self.valid_targets, "test": self.test_targets}[which]

    # --- training views --------------------------------------------------------
    def train_target_positions(self) -> np.ndarray:
        """Flat positions of every training target: each training-part item but a user's first.

        This is the row set of RecBole/MQL4GRec ``*.train.inter`` (prefix augmentation).
        """
        lengths = self.train_end - self.train_start
        n = int(np.maximum(lengths - 1, 0).sum())
        owner = np.repeat(np.arange(self.num_users), np.maximum(lengths - 1, 0))
        first = np.cumsum(np.maximum(lengths - 1, 0)) - np.maximum(lengths - 1, 0)
        within = np.arange(n) - first[owner] + 1
        return self.train_start[owner] + within

    def train_windows(self, pad: int = 0, shift: int = 0, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(histories [M, max_len], targets [M]) for next-item training on every prefix."""
        pos = self.train_target_positions()
        owner = self.train_owner(pos)
        hist = windows(self.train_items, self.train_start[owner], pos, max_len or self.max_len, pad, shift)
        return hist, self.train_items[pos]

    def train_sequences(self, pad: int = 0, shift: int = 0, max_len: int | None = None) -> np.ndarray:
        """[U, max_len] most recent training-part items of each user (for masked-item training)."""
        return windows(self.train_items, self.train_start, self.train_end, max_len or self.max_len, pad, shift)
