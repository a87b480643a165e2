"""Read a run's semantic-ID table by item, prefix or whole ID (``qbert ids show``).

Prefixes are written as the tokens of the semantic ID (``<a_12><b_3>``), as comma-separated tokens
without brackets (``a_12,b_3``) or as bare codes (``12,3``); level j's letter is the j-th letter.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qbert.data.errors import DataError
from qbert.quantize.semantic_ids import read_semantic_id_table

_TOKEN = re.compile(r"<?([A-Za-z])_(\d+)>?|(\d+)")


def load_table(run_dir: str | Path, with_added: bool = False) -> pa.Table:
    """The run's ``semantic_ids.parquet`` (validated by the one reader), sorted by item ID; with
    ``with_added``, followed by the items ``qbert ids assign`` added (column ``added``)."""
    from qbert.assign import read_added_items

    table = read_semantic_id_table(Path(run_dir) / "semantic_ids.parquet", require_unique=False)
    table = table.take(pc.sort_indices(table, [("item_id", "ascending")]))
    added = read_added_items(run_dir) if with_added else None
    if added is None:
        return table
    table = table.append_column("added", pa.array([False] * table.num_rows))
    added = added.drop_columns([c for c in ("moved",) if c in added.column_names])
    added = added.append_column("added", pa.array([True] * added.num_rows))
    return pa.concat_tables([table, added.replace_schema_metadata(None)], promote_options="permissive")


def levels(table: pa.Table) -> int:
    return sum(1 for c in table.column_names if re.fullmatch(r"code_\d+", c))


def parse_prefix(text: str, num_levels: int) -> list[int]:
    """``"<a_12><b_3>"`` / ``"a_12,b_3"`` / ``"12,3"`` -> ``[12, 3]`` (letters must match levels)."""
    parts = [p for p in re.split(r"[,\s]+|(?<=>)(?=<)", text.strip()) if p]
    if not parts or len(parts) > num_levels:
        raise DataError(f"prefix '{text}': expected 1 to {num_levels} code tokens such as '<a_12><b_3>' or 'a_12,b_3'")
    codes = []
    for j, part in enumerate(parts):
        m = _TOKEN.fullmatch(part)
        if m is None:
            raise DataError(f"prefix '{text}': malformed token '{part}' (expected like '<a_12>', 'a_12' or '12')")
        if m.group(1) is not None and m.group(1).lower() != chr(ord("a") + j):
            raise DataError(f"prefix '{text}': token '{part}' is at level {j + 1}, whose letter is "
                            f"'{chr(ord('a') + j)}'")
        codes.append(int(m.group(2) if m.group(2) is not None else m.group(3)))
    return codes


def token(level: int, code: int) -> str:
    return f"<{chr(ord('a') + level)}_{code}>"


def under_prefix(table: pa.Table, prefix: list[int]) -> pa.Table:
    """The rows whose semantic ID starts with ``prefix``."""
    mask = np.ones(table.num_rows, dtype=bool)
    for j, code in enumerate(prefix):
        mask &= table.column(f"code_{j}").to_numpy() == code
    return table.filter(pa.array(mask))


def next_level_counts(rows: pa.Table, depth: int) -> list[tuple[str, int]]:
    """Items per code of level ``depth`` among ``rows`` (the branches of the code tree below a prefix)."""
    if depth >= levels(rows):
        return []
    codes, counts = np.unique(rows.column(f"code_{depth}").to_numpy(), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [(token(depth, int(codes[i])), int(counts[i])) for i in order]


def find_item(table: pa.Table, item: str) -> int:
    """Row of ``item``: its original ID (e.g. an ASIN), else its integer item ID."""
    if "orig_id" in table.column_names:
        hits = np.flatnonzero(pc.equal(table.column("orig_id"), item).to_numpy(zero_copy_only=False))
        if hits.size:
            return int(hits[0])
    if item.isdigit():
        hits = np.flatnonzero(table.column("item_id").to_numpy() == int(item))
        if hits.size:
            return int(hits[0])
    raise DataError(f"item '{item}' is neither an original ID nor an item ID of this run's catalogue "
                    f"({table.num_rows} items)")


def item_prefix(table: pa.Table, row: int, depth: int) -> list[int]:
    return [int(table.column(f"code_{j}")[row].as_py()) for j in range(depth)]
