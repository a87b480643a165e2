"""The canonical sequential-recommendation dataset and its parquet layout.

Every reader produces a :class:`SeqDataset`; every stage consumes one. On disk a dataset is a
directory::

    items.parquet      item_id (int64, dense 0..N-1), orig_id (string), optional text columns,
                       optional `domain` (string), optional `feat_<modality>` columns
                       (fixed_size_list<float32>[d])
    sequences.parquet  user_id (int64, dense 0..U-1), orig_user_id (string),
                       items (list<int64>, time-ordered)
    meta.json          name, counts, fingerprint, format version

In memory the sequences are CSR arrays (``seq_offsets``, ``seq_items``) so splitting,
batching and statistics are vectorised numpy, never Python loops over users.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qbert.data.errors import DataError
from qbert.utils.io import atomic_dir, read_parquet

FORMAT_VERSION = 1
FEATURE_PREFIX = "feat_"
MIN_USER_INTERACTIONS = 3  # leave-one-out needs >= 1 training item plus valid and test targets


class ItemFeatures:
    """The ``feat_*`` columns of an items table (``self.items``, named ``self.name``): shared by
    :class:`SeqDataset` and tables of items that have no sequences (``qbert ids assign``)."""

    name: str
    items: pa.Table

    @property
    def feature_names(self) -> list[str]:
        return [c[len(FEATURE_PREFIX) :] for c in self.items.column_names if c.startswith(FEATURE_PREFIX)]

    def feature(self, modality: str) -> np.ndarray:
        """The ``feat_<modality>`` column as a float32 matrix [num_items, d]."""
        col = FEATURE_PREFIX + modality
        if col not in self.items.column_names:
            raise DataError(f"dataset '{self.name}' has no feature column '{col}' (has: {self.feature_names})")
        return fixed_list_to_numpy(self.items.column(col), col)


@dataclass
class SeqDataset(ItemFeatures):
    """Items table plus time-ordered item sequences per user (CSR)."""

    name: str
    items: pa.Table
    seq_offsets: np.ndarray  # int64 [U + 1]
    seq_items: np.ndarray  # int64 [total interactions]
    user_ids: np.ndarray  # object/str [U]: original user ids
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seq_offsets = np.ascontiguousarray(self.seq_offsets, dtype=np.int64)
        self.seq_items = np.ascontiguousarray(self.seq_items, dtype=np.int64)
        self.user_ids = np.asarray(self.user_ids).astype(str)
        self.validate()

    # ----------------------------------------------------------------- basic views
    @property
    def num_items(self) -> int:
        return self.items.num_rows

    @property
    def num_users(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_interactions(self) -> int:
        return int(self.seq_items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.seq_items[self.seq_offsets[user] : self.seq_offsets[user + 1]]


    def with_feature(self, modality: str, matrix: np.ndarray) -> "SeqDataset":
        """A copy with ``feat_<modality>`` set (replacing an existing column)."""
        arr = np.ascontiguousarray(matrix, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != self.num_items:
            raise DataError(f"feature '{modality}' must have shape [{self.num_items}, d], got {arr.shape}")
        col = FEATURE_PREFIX + modality
        items = self.items
        if col in items.column_names:
            items = items.drop_columns([col])
        items = items.append_column(col, numpy_to_fixed_list(arr))
        return SeqDataset(self.name, items, self.seq_offsets, self.seq_items, self.user_ids, dict(self.meta))

    def stats(self) -> dict[str, Any]:
        n_u, n_i, n = self.num_users, self.num_items, self.num_interactions
        return {
            "name": self.name,
            "users": n_u,
            "items": n_i,
            "interactions": n,
            "avg_len": round(n / max(n_u, 1), 4),
            "sparsity": round(1.0 - n / max(n_u * n_i, 1), 6),
        }

    def fingerprint(self) -> str:
        """sha256 over the sequences and the items table: identifies the exact data of a run."""
        h = hashlib.sha256()
        h.update(self.seq_offsets.tobytes())
        h.update(self.seq_items.tobytes())
        items = _canonical_table(self.items)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, items.schema) as w:
            w.write_table(items)
        h.update(sink.getvalue().to_pybytes())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        src = self.meta.get("source", self.name)
        if self.num_users == 0 or self.num_items == 0:
            raise DataError(f"{src}: empty dataset ({self.num_users} users, {self.num_items} items)")
        if "item_id" not in self.items.column_names:
            raise DataError(f"{src}: items table lacks column 'item_id'")
        ids = self.items.column("item_id").to_numpy()
        if not np.array_equal(ids, np.arange(self.num_items)):
            raise DataError(f"{src}: items.item_id must be the dense range 0..{self.num_items - 1} in order")
        if self.seq_offsets[0] != 0 or self.seq_offsets[-1] != self.num_interactions or np.any(np.diff(self.seq_offsets) < 0):
            raise DataError(f"{src}: sequence offsets are inconsistent")
        if self.num_interactions and (self.seq_items.min() < 0 or self.seq_items.max() >= self.num_items):
            bad = int(np.flatnonzero((self.seq_items < 0) | (self.seq_items >= self.num_items))[0])
            user = int(np.searchsorted(self.seq_offsets, bad, side="right") - 1)
            raise DataError(f"{src}: user '{self.user_ids[user]}' references unknown item id {self.seq_items[bad]}")
        short = np.flatnonzero(self.lengths < MIN_USER_INTERACTIONS)
        if short.size:
            u = int(short[0])
            raise DataError(
                f"{src}: {short.size} user(s) have fewer than {MIN_USER_INTERACTIONS} interactions "
                f"(first: user '{self.user_ids[u]}' with {int(self.lengths[u])}); leave-one-out needs at least 3"
            )
        if len(self.user_ids) != self.num_users:
            raise DataError(f"{src}: {len(self.user_ids)} user ids for {self.num_users} sequences")
        if len(set(self.user_ids.tolist())) != self.num_users:
            raise DataError(f"{src}: duplicate user ids")
        for name in self.feature_names:
            m = self.feature(name)
            if not np.isfinite(m).all():
                row = int(np.flatnonzero(~np.isfinite(m).all(axis=1))[0])
                raise DataError(f"{src}: feature column 'feat_{name}' has NaN/inf values (first at item_id {row})")

    # ----------------------------------------------------------------- disk
    def save(self, directory: str | Path) -> Path:
        """Write atomically: the directory appears complete or not at all."""
        directory = Path(directory)
        seq_table = pa.table(
            {
                "user_id": pa.array(np.arange(self.num_users, dtype=np.int64)),
                "orig_user_id": pa.array(self.user_ids.tolist(), pa.string()),
                "items": pa.ListArray.from_arrays(pa.array(self.seq_offsets.astype(np.int32)), pa.array(self.seq_items)),
            }
        )
        meta = {**self.meta, **self.stats(), "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint()}
        with atomic_dir(directory) as tmp:
            pq.write_table(self.items, tmp / "items.parquet")
            pq.write_table(seq_table, tmp / "sequences.parquet")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SeqDataset":
        directory = Path(directory)
        for fname in ("items.parquet", "sequences.parquet", "meta.json"):
            if not (directory / fname).is_file():
                raise DataError(f"{directory}: not a canonical qbert dataset (missing {fname})")
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{directory / 'meta.json'}: invalid JSON: {e}") from e
        items, seqs = (read_parquet(directory / name) for name in ("items.parquet", "sequences.parquet"))
        if "items" not in seqs.column_names or "orig_user_id" not in seqs.column_names:
            raise DataError(f"{directory / 'sequences.parquet'}: needs columns 'items' and 'orig_user_id', "
                            f"has {seqs.column_names}")
        lists = seqs.column("items").combine_chunks()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        flat = lists.values.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        meta.setdefault("source", str(directory))
        try:
            return cls(meta.get("name", directory.name), items, offsets, flat,
                       seqs.column("orig_user_id").to_numpy(zero_copy_only=False), meta)
        except DataError as e:  # name the directory, not just the dataset's name
            raise DataError(f"{directory}: {e}") from None


def _canonical_table(table: pa.Table) -> pa.Table:
    """One chunk, no schema metadata, default list child names: the same data hashes the same
    whether built in memory or read back from parquet (which renames list children 'element')."""
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_fixed_size_list(t):
            t = pa.list_(t.value_type, t.list_size)
        elif pa.types.is_list(t):
            t = pa.list_(t.value_type)
        fields.append(pa.field(f.name, t))
    return table.cast(pa.schema(fields)).combine_chunks().replace_schema_metadata(None)


def is_canonical_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "items.parquet").is_file() and (p / "sequences.parquet").is_file() and (p / "meta.json").is_file()


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, name: str = "feature") -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_fixed_size_list(arr.type):
        raise DataError(f"column '{name}' must be fixed_size_list<float32>, got {arr.type}")
    if arr.null_count:
        raise DataError(f"column '{name}' has {arr.null_count} null rows")
    d = arr.type.list_size
    return arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)


def numpy_to_fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def from_sequences(name: str, sequences: list[list[int]] | list[np.ndarray], num_items: int,
                   user_ids: list[str] | None = None, items: pa.Table | None = None,
                   meta: dict[str, Any] | None = None) -> SeqDataset:
    """Build a dataset from Python lists (small data, tests). Readers of big files build CSR directly."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    if items is None:
        items = pa.table({"item_id": pa.array(np.arange(num_items, dtype=np.int64)),
                          "orig_id": pa.array([str(i) for i in range(num_items)], pa.string())})
    if user_ids is None:
        user_ids = [str(u) for u in range(len(sequences))]
    return SeqDataset(name, items, offsets, flat, np.asarray(user_ids), meta or {})
