"""The semantic-ID table: item_id -> K codes and the token string ``<a_12><b_3><c_200><d_7>``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qbert.data.errors import DataError
from qbert.quantize.config import LEVEL_LETTERS
from qbert.utils.io import atomic_write_parquet, read_parquet

_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def sid_strings(codes: np.ndarray) -> np.ndarray:
    """Token strings per item (vectorised numpy string ops); level l uses letter ``a`` + l."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] > len(LEVEL_LETTERS):
        raise ValueError(f"codes must be [items, K<= {len(LEVEL_LETTERS)}], got shape {codes.shape}")
    out = np.full(codes.shape[0], "", dtype=object)
    for level in range(codes.shape[1]):
        out = out + f"<{LEVEL_LETTERS[level]}_" + codes[:, level].astype(str).astype(object) + ">"
    return out


def parse_sid(sid: str) -> list[int]:
    """``<a_12><b_3>`` -> [12, 3]; letters must run a, b, c, ..."""
    tokens = _TOKEN.findall(sid)
    if not tokens or "".join(f"<{a}_{b}>" for a, b in tokens) != sid:
        raise DataError(f"malformed semantic ID string {sid!r}")
    for level, (letter, _) in enumerate(tokens):
        if letter != LEVEL_LETTERS[level]:
            raise DataError(f"semantic ID {sid!r}: level {level} must use letter '{LEVEL_LETTERS[level]}'")
    return [int(v) for _, v in tokens]


def semantic_id_table(codes: np.ndarray, item_ids: np.ndarray | None = None) -> pa.Table:
    """item_id (int64), code_0..code_{K-1} (int64), sid (string)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise DataError(f"codes must be an integer matrix [items, K], got {codes.dtype} {codes.shape}")
    if (codes < 0).any():
        raise DataError("codes must be non-negative")
    ids = np.arange(codes.shape[0], dtype=np.int64) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    if ids.shape != (codes.shape[0],):
        raise DataError(f"item_ids must have {codes.shape[0]} entries, got shape {ids.shape}")
    cols = {"item_id": pa.array(ids)}
    for level in range(codes.shape[1]):
        cols[f"code_{level}"] = pa.array(codes[:, level].astype(np.int64))
    cols["sid"] = pa.array(sid_strings(codes).tolist(), type=pa.string())
    return pa.table(cols)


def write_semantic_ids(path: str | Path, codes: np.ndarray, item_ids: np.ndarray | None = None,
                       codebook_sizes: list[int] | None = None, require_unique: bool = True,
                       columns: dict[str, Any] | None = None) -> Path:
    """Validate (unique IDs unless told otherwise, codes in range) and write the table atomically,
    with ``columns`` (name -> one value per item) appended."""
    table = semantic_id_table(codes, item_ids)
    for name, values in (columns or {}).items():
        table = table.append_column(name, values if isinstance(values, (pa.Array, pa.ChunkedArray))
                                    else pa.array(values))
    _validate(table, str(path), codebook_sizes, require_unique)
    atomic_write_parquet(path, table)
    return Path(path)


def read_semantic_id_table(path: str | Path, codebook_sizes: list[int] | None = None,
                           require_unique: bool = True) -> pa.Table:
    """The table as written (codes, sid and the item columns), validated; errors name the file."""
    table = read_parquet(path, "semantic-ID table")
    _validate(table, str(path), codebook_sizes, require_unique)
    return table


def read_semantic_ids(path: str | Path, codebook_sizes: list[int] | None = None,
                      require_unique: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids int64 [N], codes int64 [N, K]) sorted by item id; errors name the file and column."""
    table = read_semantic_id_table(path, codebook_sizes, require_unique)
    ids = table.column("item_id").to_numpy().astype(np.int64)
    K = _levels(table)
    codes = np.stack([table.column(f"code_{l}").to_numpy().astype(np.int64) for l in range(K)], 1)
    order = np.argsort(ids, kind="stable")
    return ids[order], codes[order]


def _levels(table: pa.Table) -> int:
    K = 0
    while f"code_{K}" in table.column_names:
        K += 1
    return K


def _validate(table: pa.Table, source: str, sizes: list[int] | None, require_unique: bool = True) -> None:
    for col in ("item_id", "sid"):
        if col not in table.column_names:
            raise DataError(f"{source}: missing column '{col}' (has {table.column_names})")
    K = _levels(table)
    if K == 0:
        raise DataError(f"{source}: no code_0.. columns")
    if sizes is not None and len(sizes) != K:
        raise DataError(f"{source}: {K} code levels but {len(sizes)} codebook sizes expected")
    for name in ("item_id", "sid", *(f"code_{l}" for l in range(K))):  # item columns (a title) may be
        if table.column(name).null_count:  # null: a domain of several may have none
            raise DataError(f"{source}: column '{name}' has null values")
    ids = table.column("item_id").to_numpy()
    if np.unique(ids).size != ids.size:
        raise DataError(f"{source}: duplicate item_id values")
    codes = np.stack([table.column(f"code_{l}").to_numpy() for l in range(K)], 1)
    for l in range(K):
        col = codes[:, l]
        hi = sizes[l] if sizes is not None else None
        if (col < 0).any() or (hi is not None and (col >= hi).any()):
            bad = int(np.flatnonzero((col < 0) | ((col >= hi) if hi is not None else False))[0])
            raise DataError(f"{source}: column 'code_{l}' value {int(col[bad])} at row {bad} out of range "
                            f"[0, {hi if hi is not None else 'inf'})")
    sids = np.asarray(table.column("sid").to_pylist(), dtype=object)
    expected = sid_strings(codes)
    mismatch = np.flatnonzero(sids != expected)
    if mismatch.size:
        r = int(mismatch[0])
        raise DataError(f"{source}: column 'sid' row {r} is {sids[r]!r} but the codes give {expected[r]!r}")
    if require_unique and np.unique(codes, axis=0).shape[0] != codes.shape[0]:
        raise DataError(f"{source}: semantic IDs are not unique")
