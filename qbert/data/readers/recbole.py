"""Reader of RecBole atomic files (e.g. ``../shared/datasets/ml-100k``).

``X.inter`` is tab separated with a typed header (``user_id:token  item_id:token
rating:float  timestamp:float``); ``X.item`` (optional) holds item fields such as
``movie_title:token_seq  release_year:token  class:token_seq``.

Conventions (documented choices):

* every rating is an implicit interaction (``min_rating`` keeps only ratings >= it);
* each user's interactions are ordered by timestamp, ties broken stably by file order;
* dense ids follow the *sorted original id* (numeric order when every id is an integer,
  else string order), so ids do not depend on file order: ml-100k item ``k`` -> ``k - 1``;
* the catalogue is the set of items that occur in the interactions; ``.item`` rows of
  items never interacted with are dropped with a :class:`DataWarning` and count;
  an interacted item missing from a present ``.item`` file is an error (unknown id);
* users with fewer than 3 interactions are dropped with a warning and count
  (``short_users='error'`` rejects them instead);
* ``token``/``token_seq`` item fields become string columns (listed in
  ``meta['text_columns']``), ``float`` fields float64 columns; a single field named
  ``*title`` is renamed ``title`` so text encoders find it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from qbert.data.dataset import FEATURE_PREFIX, SeqDataset
from qbert.data.errors import DataError
from qbert.data.readers.common import (
    apply_short_user_policy,
    csr_from_pairs,
    open_text,
    require_file,
    warn_filter,
)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
SPLIT_SUFFIXES = (".train.inter", ".valid.inter", ".test.inter")


def find_recbole_names(directory: Path) -> list[str]:
    return sorted(p.name[: -len(".inter")] for p in Path(directory).glob("*.inter")
                  if not p.name.endswith(SPLIT_SUFFIXES))


def _parse_header(path: Path, header: str) -> dict[str, str]:
    if not header.strip():
        raise DataError(f"{path}: line 1: missing header (expected 'field:type' columns)")
    fields: dict[str, str] = {}
    for col in header.rstrip("\r\n").split("\t"):
        fname, sep, ftype = col.strip().partition(":")
        if not sep or not fname or ftype not in FIELD_TYPES:
            raise DataError(f"{path}: line 1: bad header column {col!r} (expected name:type, type in {FIELD_TYPES})")
        if fname in fields:
            raise DataError(f"{path}: line 1: duplicate field {fname!r}")
        fields[fname] = ftype
    return fields


def _read_atomic_fast(path: Path, fields: dict[str, str]) -> dict[str, np.ndarray] | None:
    """pyarrow's CSV parser for well-formed plain files without blank lines (row r = line r + 2);
    ``None`` sends anything else to the line-by-line parser, which names the bad line."""
    import pyarrow.csv as pacsv

    if path.suffix == ".gz":
        return None
    raw = path.read_bytes()
    n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=list(fields)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={f: pa.string() for f in fields},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    if table.num_rows != n_lines - 1:
        return None
    return {f: table.column(f).to_numpy(zero_copy_only=False).astype(str) for f in fields}


def read_atomic(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray], np.ndarray]:
    """Parse an atomic file: ({field: type}, {field: string column}, line number of each row)."""
    with open_text(require_file(path, "RecBole atomic file")) as f:
        header = f.readline()
        fields = _parse_header(path, header)
        fast = _read_atomic_fast(path, fields)
        if fast is not None:
            rows = len(next(iter(fast.values())))
            return fields, fast, np.arange(2, rows + 2)
        lines = f.read().splitlines()
    width = len(fields)
    linenos = [i for i, line in enumerate(lines, 2) if line.strip()]
    rows = [lines[i - 2].split("\t") for i in linenos]
    bad = next((n for n, r in zip(linenos, rows) if len(r) != width), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad}: expected {width} tab-separated fields {list(fields)}, "
                        f"got {len(lines[bad - 2].split(chr(9)))}: {lines[bad - 2][:80]!r}")
    columns = {name: np.array(col, dtype=str) for name, col in zip(fields, zip(*rows))} if rows \
        else {n: np.zeros(0, dtype=str) for n in fields}
    return fields, columns, np.asarray(linenos, dtype=np.int64)


def _floats(values: np.ndarray, path: Path, field: str, linenos: np.ndarray) -> np.ndarray:
    try:
        out = np.array(values, dtype=np.float64)
    except ValueError:
        for v, n in zip(np.asarray(values).tolist(), np.asarray(linenos).tolist()):
            try:
                float(v)
            except ValueError:
                raise DataError(f"{path}: line {n}: field {field!r}: not a number: {v!r}") from None
        raise
    if not np.isfinite(out).all():
        n = int(linenos[int(np.flatnonzero(~np.isfinite(out))[0])])
        raise DataError(f"{path}: line {n}: field {field!r}: NaN/inf value")
    return out


def _dense_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original ids in dense-id order, dense id of each raw id): numeric order when every id is
    an integer with a unique value ('7' and '007' would collide: then string order)."""
    uniq, inv = np.unique(raw, return_inverse=True)
    try:
        num = uniq.astype(np.int64)
    except ValueError:
        return uniq.astype(str), inv
    if len(np.unique(num)) != len(num):
        return uniq.astype(str), inv
    order = np.argsort(num, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order].astype(str), rank[inv]


def _require(fields: dict[str, str], name: str, path: Path, option: str) -> None:
    if name not in fields:
        raise DataError(f"{path}: no field {name!r} (fields: {list(fields)}; set {option}=)")


def read_recbole(directory: str | Path, name: str | None = None, *, user_field: str = "user_id",
                 item_field: str = "item_id", time_field: str | None = "timestamp",
                 rating_field: str = "rating", min_rating: float | None = None,
                 short_users: str = "drop") -> SeqDataset:
    """Read ``name.inter`` (+ ``name.item``) from ``directory`` (``name`` auto-detected if unique)."""
    directory = Path(directory)
    if directory.is_file() and directory.suffix == ".inter":
        directory, name = directory.parent, directory.stem
    if not directory.is_dir():
        raise DataError(f"dataset directory not found: {directory}")
    if name is None:
        names = find_recbole_names(directory)
        if len(names) != 1:
            raise DataError(f"{directory}: expected one RecBole X.inter file, found {names or 'none'}; pass name=")
        name = names[0]
    inter_path = directory / f"{name}.inter"
    fields, cols, linenos = read_atomic(inter_path)
    _require(fields, user_field, inter_path, "user_field")
    _require(fields, item_field, inter_path, "item_field")
    if not len(linenos):
        raise DataError(f"{inter_path}: empty dataset (no interactions)")
    users_raw, items_raw = cols[user_field], cols[item_field]
    empty = np.flatnonzero((np.char.str_len(users_raw) == 0) | (np.char.str_len(items_raw) == 0))
    if empty.size:
        raise DataError(f"{inter_path}: line {linenos[int(empty[0])]}: empty user or item id")
    line_arr = linenos
    time = None
    if time_field is not None and time_field in fields:
        time = _floats(cols[time_field], inter_path, time_field, linenos)
    if min_rating is not None:
        _require(fields, rating_field, inter_path, "rating_field")
        keep = _floats(cols[rating_field], inter_path, rating_field, linenos) >= min_rating
        if not keep.all():
            warn_filter(f"{inter_path}: dropped {int((~keep).sum())} interaction(s) with {rating_field} < {min_rating}")
        users_raw, items_raw, line_arr = users_raw[keep], items_raw[keep], line_arr[keep]
        time = time[keep] if time is not None else None
        if not keep.any():
            raise DataError(f"{inter_path}: empty dataset (no interaction with {rating_field} >= {min_rating})")

    # the same line twice (same user, item and timestamp) is one interaction; without timestamps a
    # repeated (user, item) row may be a real repeat, so nothing is dropped
    keys = first = None
    if time is not None:
        keys = np.char.add(np.char.add(np.char.add(users_raw.astype(str), "\x1f"), items_raw.astype(str)),
                           np.char.add("\x1f", time.astype(str)))
        first = np.unique(keys, return_index=True)[1]
    if first is not None and first.size < keys.size:
        keep = np.zeros(keys.size, dtype=bool)
        keep[first] = True
        dup = int(line_arr[np.flatnonzero(~keep)[0]])
        warn_filter(f"{inter_path}: dropped {int((~keep).sum())} duplicate interaction row(s) (same user, item and "
                    f"{time_field}; first at line {dup})")
        users_raw, items_raw, line_arr = users_raw[keep], items_raw[keep], line_arr[keep]
        time = time[keep] if time is not None else None
    user_orig, uidx = _dense_ids(users_raw)
    item_orig, iidx = _dense_ids(items_raw)
    offsets, flat = csr_from_pairs(uidx, iidx, len(user_orig), time)

    columns: dict[str, pa.Array] = {"item_id": pa.array(np.arange(len(item_orig), dtype=np.int64)),
                                    "orig_id": pa.array(item_orig.tolist(), pa.string())}
    text_cols: list[str] = []
    item_path = directory / f"{name}.item"
    if item_path.is_file():
        extra, text_cols = _item_columns(item_path, item_field, item_orig, items_raw, iidx, line_arr, inter_path)
        columns.update(extra)
    offsets, flat, user_ids = apply_short_user_policy(offsets, flat, user_orig, short_users, str(inter_path))
    meta = {"source": str(directory), "format": "recbole", "text_columns": text_cols}
    return SeqDataset(name, pa.table(columns), offsets, flat, user_ids, meta)


def _item_columns(path: Path, item_field: str, item_orig: np.ndarray, items_raw: np.ndarray,
                  iidx: np.ndarray, inter_lines: np.ndarray, inter_path: Path) -> tuple[dict[str, pa.Array], list[str]]:
    fields, cols, linenos = read_atomic(path)
    _require(fields, item_field, path, "item_field")
    ids = cols[item_field]
    # map the .item ids onto the catalogue through the same raw string as in .inter
    raw_of_dense = np.empty(len(item_orig), dtype=object)
    raw_of_dense[iidx] = items_raw
    lookup = {raw: i for i, raw in enumerate(raw_of_dense.tolist())}
    row_of = np.full(len(item_orig), -1, dtype=np.int64)
    unused = 0
    for r, (raw, n) in enumerate(zip(ids.tolist(), linenos)):
        i = lookup.get(raw)
        if i is None:
            unused += 1
            continue
        if row_of[i] >= 0:
            raise DataError(f"{path}: line {n}: duplicate item id {raw!r} (also line {linenos[row_of[i]]})")
        row_of[i] = r
    if unused:
        warn_filter(f"{path}: dropped {unused} item row(s) without interactions in {inter_path.name}")
    missing = np.flatnonzero(row_of < 0)
    if missing.size:
        raw = str(raw_of_dense[missing[0]])
        n = int(inter_lines[int(np.flatnonzero(items_raw == raw)[0])])
        raise DataError(f"{inter_path}: line {n}: unknown item id {raw!r} (no row in {path.name}; "
                        f"{missing.size} such item(s))")
    titles = [f for f in fields if f != item_field and f.endswith("title")]
    rename = {titles[0]: "title"} if "title" not in fields and len(titles) == 1 else {}
    out: dict[str, pa.Array] = {}
    text_cols: list[str] = []
    for field, ftype in fields.items():
        if field == item_field or ftype == "float_seq":
            continue
        col = rename.get(field, field)
        if col in ("item_id", "orig_id", "domain") or col.startswith(FEATURE_PREFIX):
            col = f"item_{col}"
        values = cols[field][row_of]
        if ftype == "float":
            out[col] = pa.array(_floats(values, path, field, linenos[row_of]))
        else:
            out[col] = pa.array([" ".join(v.split()) or None for v in values.tolist()], pa.string())
            text_cols.append(col)
    text_cols.sort(key=lambda c: c != "title")
    return out, text_cols
