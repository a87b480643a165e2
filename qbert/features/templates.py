"""Item text assembly: one string per item from whatever text columns the items table has.

Readers keep each source's own text columns (Amazon: title / brand / categories /
description; MovieLens: title, year, genres); the template decides what the text encoder
sees. Empty strings are returned as such: the caller applies the missing-input policy.
"""

from __future__ import annotations

import re
import string

import pyarrow as pa
import pyarrow.compute as pc

from qbert.data.errors import DataError
from qbert.features.config import DEFAULT_TEXT_FIELDS, TemplateConfig

_NON_TEXT = {"item_id"}
_WS = re.compile(r"\s+")


def _is_texty(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_texty(t.value_type)
    return pa.types.is_integer(t)  # e.g. a release year


def text_fields(schema: pa.Schema, cfg: TemplateConfig) -> list[str]:
    """The columns joined by the default template (or named by ``cfg.template``), validated."""
    names = schema.names
    if cfg.template is not None:
        used = [f for _, f, _, _ in string.Formatter().parse(cfg.template) if f]
        missing = [f for f in used if f not in names]
        if missing:
            raise DataError(f"text template {cfg.template!r} names column(s) {missing} absent from the items table "
                            f"(columns: {names})")
        return list(dict.fromkeys(used))
    if cfg.fields is not None:
        missing = [f for f in cfg.fields if f not in names]
        if missing:
            raise DataError(f"text fields {missing} are absent from the items table (columns: {names})")
        return list(cfg.fields)
    skip = _NON_TEXT | set(cfg.exclude)
    ordered = [f for f in DEFAULT_TEXT_FIELDS if f in names]
    rest = [f for f in names if f not in ordered and f not in skip
            and not f.startswith(("feat_", "missing_", "image")) and _is_texty(schema.field(f).type)]
    fields = ordered + rest
    if not fields:
        raise DataError(f"the items table has no text column to encode (columns: {names}); "
                        "set text.template.fields or text.template.template")
    return fields


def _as_strings(col: pa.ChunkedArray | pa.Array, list_sep: str) -> list[str]:
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [list_sep.join(str(x) for x in v if x is not None and str(x).strip()) if v else "" for v in col.to_pylist()]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        col = pc.cast(col, pa.string())
    return [v if v is not None else "" for v in pc.fill_null(col, "").to_pylist()]


def assemble_texts(table: pa.Table, cfg: TemplateConfig) -> list[str]:
    """One whitespace-normalised string per row of ``table`` (``""`` where nothing is there)."""
    fields = text_fields(table.schema, cfg)
    cols = {f: _as_strings(table.column(f), cfg.list_separator) for f in fields}
    n = table.num_rows
    if cfg.template is not None:
        out = [cfg.template.format(**{f: cols[f][i] for f in fields}) for i in range(n)]
        # a template over all-empty fields leaves only its punctuation: treat that as empty
        bare = cfg.template.format(**{f: "" for f in fields})
        out = ["" if _WS.sub(" ", s).strip() == _WS.sub(" ", bare).strip() else s for s in out]
    else:
        sep = cfg.separator
        out = [sep.join(v for v in (cols[f][i].strip() for f in fields) if v) for i in range(n)]
    return [_WS.sub(" ", s).strip() for s in out]
