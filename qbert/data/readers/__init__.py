"""Every input format -> :class:`SeqDataset`. ``read_source`` picks the reader by looking.

Detection order for a path (first match wins):

1. ``synthetic`` / ``synthetic:seed=3,users=500`` spec string -> :func:`make_synthetic`
2. canonical qbert directory (items.parquet, sequences.parquet, meta.json) -> ``SeqDataset.load``
3. ``X.inter.json`` -> MQL4GRec / LC-Rec layout (:func:`read_mql4grec`)
4. ``X.inter`` (not ``.train/.valid/.test.inter``) or a path to one -> RecBole (:func:`read_recbole`)
5. ``<Category>_5.json[.gz]`` reviews -> raw Amazon Reviews 2018 (:func:`read_amazon_raw`)

Options are passed to the chosen reader; an option it does not take is a :class:`DataError`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from qbert.data.dataset import SeqDataset, is_canonical_dir
from qbert.data.errors import DataError
from qbert.data.readers.amazon_raw import find_amazon_categories, read_amazon_raw
from qbert.data.readers.common import DataWarning
from qbert.data.readers.mql4grec import codes_to_multi_hot, find_mql4grec_names, read_code_file, read_mql4grec
from qbert.data.readers.recbole import find_recbole_names, read_recbole
from qbert.data.synthetic import SyntheticConfig, make_synthetic, parse_synthetic_spec

__all__ = ["read_source", "detect_format", "read_mql4grec", "read_recbole", "read_amazon_raw",
           "read_code_file", "codes_to_multi_hot", "make_synthetic", "SyntheticConfig", "DataWarning"]


def is_synthetic_spec(source: str | Path) -> bool:
    s = str(source)
    return s == "synthetic" or s.startswith("synthetic:")


def detect_format(source: str | Path) -> str:
    """One of 'synthetic', 'canonical', 'mql4grec', 'recbole', 'amazon_raw'; DataError if none."""
    if is_synthetic_spec(source):
        return "synthetic"
    path = Path(source)
    if path.is_file() and path.suffix == ".inter" and not path.name.endswith((".train.inter", ".valid.inter", ".test.inter")):
        return "recbole"
    if not path.exists():
        raise DataError(f"data source not found: {path} (expected a dataset directory or a 'synthetic[:k=v,...]' spec)")
    if not path.is_dir():
        raise DataError(f"data source {path} is a file; expected a dataset directory, a RecBole X.inter file "
                        f"or a 'synthetic[:k=v,...]' spec")
    if is_canonical_dir(path):
        return "canonical"
    if find_mql4grec_names(path):
        return "mql4grec"
    if find_recbole_names(path):
        return "recbole"
    if find_amazon_categories(path):
        return "amazon_raw"
    raise DataError(
        f"{path}: no readable dataset found. Looked for: a canonical qbert dir (items.parquet, sequences.parquet, "
        f"meta.json); MQL4GRec layout (X.inter.json); RecBole atomic files (X.inter); raw Amazon 2018 "
        f"(<Category>_5.json[.gz] + meta_<Category>.json[.gz])")


def _call(reader: Callable[..., SeqDataset], fmt: str, *args: Any, **options: Any) -> SeqDataset:
    params = inspect.signature(reader).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        allowed = [p for p in params if p not in ("directory", "cfg")]
        raise DataError(f"reader '{fmt}' takes no option(s) {unknown} (options: {allowed})")
    return reader(*args, **options)


def _load_canonical(directory: Path) -> SeqDataset:
    return SeqDataset.load(directory)


READERS: dict[str, Callable[..., SeqDataset]] = {
    "canonical": _load_canonical,
    "mql4grec": read_mql4grec,
    "recbole": read_recbole,
    "amazon_raw": read_amazon_raw,
}


def read_source(source: str | Path, **options: Any) -> SeqDataset:
    """Read any supported source (see module docstring); ``options`` go to the detected reader.

    ``None``-valued options are ignored so a CLI can pass its defaults through unchanged.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if str(source).startswith("s3://"):  # any layout, fetched to a scratch directory and read from there
        import tempfile

        from qbert.platform.storage import check_reachable, download_dir

        with tempfile.TemporaryDirectory(prefix="qbert-data-") as tmp:
            check_reachable(str(source))
            local = download_dir(str(source), Path(tmp) / "data")
            if not any(local.iterdir()):
                raise DataError(f"data source {source}: no objects under this prefix")
            ds = read_source(local, **options)
        ds.meta["source"] = str(source)
        return ds
    fmt = detect_format(source)
    if fmt == "synthetic":
        cfg = parse_synthetic_spec(str(source))
        if options:
            cfg = cfg.override(options) if all(k in cfg.to_dict() for k in options) else None
            if cfg is None:
                raise DataError(f"synthetic source takes config fields only, got {sorted(options)}")
        return make_synthetic(cfg)
    return _call(READERS[fmt], fmt, Path(source), **options)
