"""Reader of the MQL4GRec / LC-Rec JSON layout (e.g. ``../shared/datasets/amazon-instruments``).

Files of a dataset ``X`` in one directory::

    X.inter.json        {user_int: [item_int, ...]}  each user's items in time order (required)
    X.item2id           original item id <TAB> item_int (defines the catalogue; optional:
                        without it the catalogue is 0..max id seen and orig_id is the integer)
    X.user2id           original user id <TAB> user_int (optional: else the user key)
    X.item.json         {item_int: {"title": ..., ...}} text fields -> string columns (optional)
    X.index_<name>.json {item_int: ["<a_12>", "<b_3>", ...]} semantic codes (optional); with
                        ``with_codes`` each becomes a multi-hot feature ``feat_<name>_codes``
                        (levels x codebook size dims; e.g. index_lemb -> feat_lemb_codes, 4x256)

Users are ordered by their integer id, so row ``u`` of the dataset is user ``u`` of the
shipped ``X.{train,valid,test}.inter`` files. The layout is already preprocessed (5-core), so
a user with fewer than 3 interactions is an error by default (``short_users='drop'`` filters
them with a warning instead).
"""

from __future__ import annotations

import itertools
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from qbert.data.dataset import FEATURE_PREFIX, SeqDataset, numpy_to_fixed_list
from qbert.data.errors import DataError
from qbert.data.readers.common import DataWarning, apply_short_user_policy, clean_text, load_json, read_id_map

INTER_SUFFIX = ".inter.json"
RESERVED_COLUMNS = {"item_id", "orig_id", "domain"}
_CODE = re.compile(r"<([A-Za-z]+)_(\d+)>")


def find_mql4grec_names(directory: Path) -> list[str]:
    return sorted(p.name[: -len(INTER_SUFFIX)] for p in Path(directory).glob(f"*{INTER_SUFFIX}"))


def _dataset_name(directory: Path, name: str | None) -> str:
    names = find_mql4grec_names(directory)
    if name is not None:
        if name not in names:
            raise DataError(f"{directory}: no {name}{INTER_SUFFIX} (found: {names or 'none'})")
        return name
    if not names:
        raise DataError(f"{directory}: no *{INTER_SUFFIX} file (MQL4GRec layout)")
    if len(names) > 1:
        raise DataError(f"{directory}: several datasets {names}; pass name=")
    return names[0]


def code_files(directory: Path, name: str) -> dict[str, Path]:
    """``{code name: path}`` of the ``X.index_<name>.json`` files next to ``X.inter.json``."""
    prefix = f"{name}.index_"
    return {p.name[len(prefix) : -len(".json")]: p for p in sorted(Path(directory).glob(f"{prefix}*.json"))}


def _int_key(key: str, path: Path, what: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} key {key!r} is not an integer id") from None


def read_code_file(path: str | Path, num_items: int | None = None, codebook_size: int | None = 256) -> np.ndarray:
    """Parse a semantic-code file into an int64 array [num_items, levels] of code indices.

    ``["<a_170>", "<b_224>", ...]`` -> ``[170, 224, ...]``. Every item 0..N-1 must be present
    with the same number of levels; level j's tokens carry the j-th letter (``a``, ``b``, ...; the image files: ``A``, ``B``, ...) and
    an index below ``codebook_size`` (MQL4GRec's files: 256; None: any index). Items that share a
    whole code tuple are allowed (Instruments' LLaMA file: 5,988 distinct tuples for 6,250 items) and
    warned about.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{item_id: [code tokens]}}")
    n = num_items if num_items is not None else len(data)
    keys = [_int_key(k, path, "item") for k in data]
    levels = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    if len(levels) != 1 or -1 in levels:
        bad = next(k for k, v in data.items() if not isinstance(v, list) or len(v) != len(next(iter(data.values()))))
        raise DataError(f"{path}: item {bad}: every item needs a list of the same number of code tokens")
    k = levels.pop()
    letters = [chr(ord("a") + j) for j in range(k)]
    out = np.full((n, k), -1, dtype=np.int64)
    for key, (raw, tokens) in zip(keys, data.items()):
        if not 0 <= key < n:
            raise DataError(f"{path}: unknown item id {raw!r} (catalogue has {n} items)")
        for j, tok in enumerate(tokens):
            m = _CODE.fullmatch(str(tok))
            if m is None:
                raise DataError(f"{path}: item {raw}: malformed code token {tok!r} (expected like '<a_12>')")
            if m.group(1).lower() != letters[j]:
                raise DataError(f"{path}: item {raw}: code token {tok!r} at level {j + 1} should carry the letter "
                                f"'{letters[j]}'")
            if codebook_size is not None and int(m.group(2)) >= codebook_size:
                raise DataError(f"{path}: item {raw}: code token {tok!r} is out of range (codebook_size "
                                f"{codebook_size}: indices 0..{codebook_size - 1}; set the reader option "
                                "codebook_size for larger codebooks)")
            out[key, j] = int(m.group(2))
    missing = np.flatnonzero(out[:, 0] < 0)
    if missing.size:
        raise DataError(f"{path}: {missing.size} item(s) have no codes (first: item {int(missing[0])})")
    _, first, counts = np.unique(out, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        shared = int(counts[counts > 1].sum())
        example = int(first[np.argmax(counts > 1)])
        same = np.flatnonzero((out == out[example]).all(1))
        warnings.warn(f"{path}: {shared} items share their whole code tuple with another item (first: items "
             f"{int(same[0])} and {int(same[1])})", DataWarning, stacklevel=2)
    return out


def codes_to_multi_hot(codes: np.ndarray, codebook_size: int | None = None) -> np.ndarray:
    """[N, K] code indices -> float32 [N, K * C] multi-hot (one 1 per level)."""
    n, k = codes.shape
    c = int(codes.max()) + 1 if codebook_size is None else int(codebook_size)
    if codes.max() >= c:
        raise DataError(f"code index {int(codes.max())} exceeds codebook_size {c}")
    out = np.zeros((n, k * c), dtype=np.float32)
    out[np.arange(n)[:, None], np.arange(k)[None, :] * c + codes] = 1.0
    return out


def _read_sequences(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user keys [U] sorted, offsets [U+1], flat items) from ``X.inter.json``."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{user_id: [item_id, ...]}}, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty dataset (no users)")
    keys = np.fromiter((_int_key(k, path, "user") for k in data), dtype=np.int64, count=len(data))
    values = list(data.values())
    for key, v in zip(data, values):
        if not isinstance(v, list):
            raise DataError(f"{path}: user {key}: expected a list of item ids, got {type(v).__name__}")
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    items = list(itertools.chain.from_iterable(values))
    if not all(type(x) is int for x in items):  # ids may also be integer strings ("12"), nothing else
        owner = np.repeat(np.arange(len(values)), lengths)
        users = list(data)
        for pos, x in enumerate(items):
            if type(x) is int:
                continue
            if isinstance(x, str) and x.strip().lstrip("-").isdigit():
                items[pos] = int(x)
                continue
            raise DataError(f"{path}: user {users[owner[pos]]}: item id {x!r} is not an integer")
    flat = np.asarray(items, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    if not np.array_equal(order, np.arange(len(keys))):
        lengths = lengths[order]
        starts = offsets[:-1][order]
        new_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        owner = np.repeat(np.arange(len(order)), lengths)
        flat = flat[starts[owner] + np.arange(len(flat)) - new_off[:-1][owner]]
        offsets, keys = new_off, keys[order]
    return keys, offsets, flat


def _text_columns(path: Path, num_items: int, fields: Sequence[str] | None) -> dict[str, list]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{item_id: {{field: text}}}}")
    columns: dict[str, list] = {}
    for raw, rec in data.items():
        i = _int_key(raw, path, "item")
        if not 0 <= i < num_items:
            raise DataError(f"{path}: unknown item id {raw!r} (catalogue has {num_items} items)")
        if not isinstance(rec, dict):
            raise DataError(f"{path}: item {raw}: expected an object of text fields, got {type(rec).__name__}")
        for field, value in rec.items():
            if fields is not None and field not in fields:
                continue
            if field in RESERVED_COLUMNS or field.startswith(FEATURE_PREFIX):
                raise DataError(f"{path}: item {raw}: text field name {field!r} clashes with a reserved column")
            if value is not None and not isinstance(value, (str, int, float, list)):
                raise DataError(f"{path}: item {raw}: field {field!r} is not text ({type(value).__name__})")
            columns.setdefault(field, [None] * num_items)[i] = clean_text(value)
    return columns


def read_mql4grec(directory: str | Path, name: str | None = None, *, with_codes: bool | Sequence[str] = False,
                  codebook_size: int | None = None, text_fields: Sequence[str] | None = None,
                  short_users: str = "error") -> SeqDataset:
    """Read dataset ``name`` (auto-detected when the directory holds one) of the LC-Rec layout."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    name = _dataset_name(directory, name)
    inter_path = directory / f"{name}{INTER_SUFFIX}"
    user_keys, offsets, flat = _read_sequences(inter_path)
    dup = np.flatnonzero(np.diff(user_keys) == 0)  # keys sorted; JSON duplicates already rejected
    if dup.size:
        raise DataError(f"{inter_path}: duplicate user id {int(user_keys[dup[0]])}")

    item_map = directory / f"{name}.item2id"
    if item_map.is_file():
        item_orig, _ = read_id_map(item_map)
        num_items = len(item_orig)
    else:
        num_items = int(flat.max()) + 1 if flat.size else 0
        item_orig = np.array([str(i) for i in range(num_items)], dtype=object)
    bad = np.flatnonzero((flat < 0) | (flat >= num_items))
    if bad.size:
        u = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise DataError(f"{inter_path}: user {int(user_keys[u])}: unknown item id {int(flat[bad[0]])} "
                        f"(catalogue {item_map.name if item_map.is_file() else 'inferred'} has {num_items} items)")

    user_map = directory / f"{name}.user2id"
    if user_map.is_file():
        user_orig, user_int = read_id_map(user_map)
        unknown = user_keys[(user_keys < 0) | (user_keys >= len(user_int))]
        if unknown.size:
            raise DataError(f"{inter_path}: unknown user id {int(unknown[0])} (not in {user_map.name})")
        user_ids = user_orig[user_keys]
    else:
        user_ids = user_keys.astype(str)

    columns: dict[str, pa.Array] = {
        "item_id": pa.array(np.arange(num_items, dtype=np.int64)),
        "orig_id": pa.array(item_orig.tolist(), pa.string()),
    }
    text_path = directory / f"{name}.item.json"
    text_cols = []
    if text_path.is_file():
        for field, values in _text_columns(text_path, num_items, text_fields).items():
            columns[field] = pa.array(values, pa.string())
            text_cols.append(field)

    found_codes = code_files(directory, name)
    if with_codes:
        wanted = list(found_codes) if with_codes is True else list(with_codes)
        for code_name in wanted:
            if code_name not in found_codes:
                raise DataError(f"{directory}: no code file {name}.index_{code_name}.json (found: {list(found_codes)})")
            codes = read_code_file(found_codes[code_name], num_items, codebook_size or 256)
            columns[f"{FEATURE_PREFIX}{code_name}_codes"] = numpy_to_fixed_list(codes_to_multi_hot(codes, codebook_size))

    offsets, flat, user_ids = apply_short_user_policy(offsets, flat, user_ids, short_users, str(inter_path))
    meta = {"source": str(directory), "format": "mql4grec", "text_columns": text_cols,
            "code_files": sorted(found_codes)}
    return SeqDataset(name, pa.table(columns), offsets, flat, user_ids, meta)
