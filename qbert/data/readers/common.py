"""Helpers shared by the readers: file access with precise errors, filter warnings, CSR building.

Every reader reports bad input as :class:`DataError` naming the file and the line or field,
and every *documented filter* (dropping short users, k-core, items without text) as a
:class:`DataWarning` carrying the count, so a caller can see exactly what was removed.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from qbert.data.dataset import MIN_USER_INTERACTIONS
from qbert.data.errors import DataError

SHORT_USER_POLICIES = ("drop", "error")


class DataWarning(UserWarning):
    """A documented filter removed part of the input (the message gives the count)."""


def warn_filter(message: str) -> None:
    """Report a documented filter (the CLI prints these and records them in meta['filters'])."""
    warnings.warn(message, DataWarning, stacklevel=3)


def require_file(path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def open_text(path: Path):
    """Open a plain or gzip-compressed text file (by suffix) as UTF-8."""
    require_file(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _no_duplicate_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict]:
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise DataError(f"{path}: duplicate key {k!r} in JSON object")
            out[k] = v
        return out

    return hook


def load_json(path: Path) -> Any:
    """Parse a whole JSON document; syntax errors and duplicate keys name the file and line."""
    with open_text(path) as f:
        text = f.read()
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) of a JSON-lines file, skipping blank lines."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_id_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``original<TAB>integer`` map (LC-Rec ``X.item2id``); returns (orig ids, ints).

    Both columns must be unique and the integers the dense range 0..N-1 (in any order).
    """
    origs: list[str] = []
    ids: list[int] = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise DataError(f"{path}: line {lineno}: expected 'original_id<TAB>integer_id', got {line[:80]!r}")
            try:
                ids.append(int(parts[1]))
            except ValueError:
                raise DataError(f"{path}: line {lineno}: integer id expected, got {parts[1]!r}") from None
            origs.append(parts[0])
    if not ids:
        raise DataError(f"{path}: empty id map")
    arr = np.asarray(ids, dtype=np.int64)
    orig = np.asarray(origs, dtype=object)
    order = np.argsort(arr, kind="stable")
    sorted_ids = arr[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        v = int(sorted_ids[dup[0]])
        lines = (np.flatnonzero(arr == v) + 1).tolist()
        raise DataError(f"{path}: duplicate integer id {v} (lines {lines[:5]})")
    _, first, counts = np.unique(orig.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        o = origs[int(first[np.flatnonzero(counts > 1)[0]])]
        raise DataError(f"{path}: duplicate original id {o!r}")
    if sorted_ids[0] != 0 or sorted_ids[-1] != len(arr) - 1:
        missing = np.setdiff1d(np.arange(len(arr)), sorted_ids)
        raise DataError(f"{path}: integer ids must be dense 0..{len(arr) - 1}; missing e.g. {missing[:5].tolist()}")
    return orig[order], sorted_ids


def csr_from_pairs(user: np.ndarray, item: np.ndarray, num_users: int,
                   time: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, items) grouped by user, ordered by time then input order (stable ties)."""
    user = np.asarray(user, dtype=np.int64)
    keys = (np.arange(len(user)),) + ((np.asarray(time),) if time is not None else ()) + (user,)
    order = np.lexsort(keys)
    counts = np.bincount(user, minlength=num_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, np.asarray(item, dtype=np.int64)[order]


def apply_short_user_policy(offsets: np.ndarray, flat: np.ndarray, user_ids: np.ndarray, policy: str,
                            source: str, min_len: int = MIN_USER_INTERACTIONS
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop (with a warning and count) or reject users with fewer than ``min_len`` interactions."""
    if policy not in SHORT_USER_POLICIES:
        raise DataError(f"short_users must be one of {SHORT_USER_POLICIES}, got {policy!r}")
    lengths = np.diff(offsets)
    short = lengths < min_len
    if not short.any():
        return offsets, flat, user_ids
    n = int(short.sum())
    first = int(np.flatnonzero(short)[0])
    if policy == "error":
        raise DataError(
            f"{source}: {n} user(s) have fewer than {min_len} interactions (first: user "
            f"{str(user_ids[first])!r} with {int(lengths[first])}); leave-one-out needs at least {min_len} "
            f"(use short_users='drop' to filter them)")
    if n == len(lengths):
        raise DataError(f"{source}: empty dataset: all {n} user(s) have fewer than {min_len} interactions")
    warn_filter(f"{source}: dropped {n} user(s) with fewer than {min_len} interactions "
                f"({int(lengths[short].sum())} interactions)")
    keep = ~short
    owner = np.repeat(np.arange(len(lengths)), lengths)
    new_flat = flat[keep[owner]]
    new_offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
    return new_offsets, new_flat, np.asarray(user_ids)[keep]


def clean_text(value: Any) -> str | None:
    """Text field -> one line of text (lists joined, HTML entities unescaped, whitespace collapsed)."""
    import html

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = " ".join(html.unescape(str(value)).split())
    return text or None
