"""Multi-domain assembly: several datasets -> one pretraining corpus.

Item id spaces are made disjoint by offsetting (domain ``d``'s items occupy
``meta['domains'][d]['item_start'] : item_end``), every item gets its ``domain`` and user ids
are prefixed ``<domain>:`` so users of different domains never merge. Feature columns must
exist in every domain with the same dimension (fusion needs one input size per modality);
other columns (text fields) are united, missing values are null.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from qbert.data.dataset import FEATURE_PREFIX, SeqDataset
from qbert.data.errors import DataError


def assemble_domains(datasets: Sequence[SeqDataset], names: Sequence[str] | None = None,
                     name: str = "multidomain") -> SeqDataset:
    """Concatenate ``datasets`` (in order) with disjoint item ids and a ``domain`` column."""
    if not datasets:
        raise DataError("assemble_domains: no datasets given")
    names = list(names) if names is not None else [d.name for d in datasets]
    if len(names) != len(datasets):
        raise DataError(f"assemble_domains: {len(datasets)} datasets but {len(names)} names")
    if len(set(names)) != len(names) or any(not n or ":" in n for n in names):
        raise DataError(f"assemble_domains: domain names must be unique, non-empty and without ':', got {names}")

    feats = [{c: d.items.schema.field(c).type for c in d.items.column_names if c.startswith(FEATURE_PREFIX)}
             for d in datasets]
    for d, n, f in zip(datasets, names, feats):
        if set(f) != set(feats[0]):
            raise DataError(f"assemble_domains: domain '{n}' has feature columns {sorted(f)}, "
                            f"domain '{names[0]}' has {sorted(feats[0])}; every domain needs the same modalities")
        for col, t in f.items():
            if t.list_size != feats[0][col].list_size:
                raise DataError(f"assemble_domains: feature '{col}' has dimension {t.list_size} in domain '{n}' "
                                f"but {feats[0][col].list_size} in domain '{names[0]}'")

    columns: list[str] = []
    for d in datasets:
        columns += [c for c in d.items.column_names if c not in columns and c != "domain"]
    tables, ranges, start = [], {}, 0
    for d, n in zip(datasets, names):
        t = d.items.drop_columns(["domain"]) if "domain" in d.items.column_names else d.items
        cols = {}
        for c in columns:
            if c == "item_id":
                cols[c] = pa.array(np.arange(start, start + d.num_items, dtype=np.int64))
            elif c in t.column_names:
                cols[c] = t.column(c).combine_chunks()
            else:
                typ = next(x.items.schema.field(c).type for x in datasets if c in x.items.column_names)
                cols[c] = pa.nulls(d.num_items, typ)
        cols["domain"] = pa.array([n] * d.num_items, pa.string())
        tables.append(pa.table(cols))
        ranges[n] = {"item_start": start, "item_end": start + d.num_items, "users": d.num_users,
                     "interactions": d.num_interactions, "source": d.meta.get("source", d.name)}
        start += d.num_items
    try:
        items = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"assemble_domains: item columns of different types across domains: {e}") from None

    item_offsets = np.cumsum([0] + [d.num_items for d in datasets[:-1]])
    flat = np.concatenate([d.seq_items + off for d, off in zip(datasets, item_offsets)])
    lengths = np.concatenate([d.lengths for d in datasets])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    users = np.concatenate([np.char.add(f"{n}:", d.user_ids.astype(str)) for d, n in zip(datasets, names)])
    text_cols = []
    for d in datasets:
        text_cols += [c for c in d.meta.get("text_columns", []) if c not in text_cols]
    meta = {"source": "+".join(names), "format": "multidomain", "domains": ranges, "text_columns": text_cols}
    return SeqDataset(name, items, offsets, flat, users, meta)


def domain_of_items(ds: SeqDataset) -> np.ndarray:
    """[num_items] domain name of each item (from the ``domain`` column)."""
    if "domain" not in ds.items.column_names:
        raise DataError(f"dataset '{ds.name}' has no 'domain' column")
    return np.asarray(ds.items.column("domain").to_pylist(), dtype=object)
