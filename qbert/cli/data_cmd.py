"""``qbert data prepare|stats``: any source -> canonical parquet dataset; dataset statistics."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from qbert.data.dataset import SeqDataset, is_canonical_dir
from qbert.data.errors import DataError
from qbert.data.multidomain import assemble_domains
from qbert.data.readers import DataWarning, read_source

SOURCE_HELP = ("a canonical dataset dir, an MQL4GRec dir (X.inter.json), a RecBole dir or X.inter file, "
               "a raw Amazon 2018 dir (<Category>_5.json[.gz] + meta_<Category>.json[.gz]), "
               "or 'synthetic[:seed=3,users=500,...]'")


def _add_reader_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reader options (passed only when given; a reader that lacks one fails)")
    g.add_argument("--name", default=None,
                   help="dataset name inside the source dir (MQL4GRec X / RecBole X); with several SOURCEs: the corpus name")
    g.add_argument("--with-codes", action="store_true", default=None,
                   help="MQL4GRec: encode every X.index_<c>.json as multi-hot feature feat_<c>_codes")
    g.add_argument("--codes", default=None, help="MQL4GRec: comma list of code files to encode (e.g. lemb,vitemb)")
    g.add_argument("--short-users", choices=("drop", "error"), default=None,
                   help="users with < 3 interactions: drop with a warning, or fail")
    g.add_argument("--min-rating", type=float, default=None, help="RecBole: keep ratings >= this")
    g.add_argument("--k-core", type=int, default=None, help="raw Amazon: k of the iterative k-core filter (5)")
    g.add_argument("--require-images", action="store_true", default=None,
                   help="raw Amazon: keep only items with an image URL")
    g.add_argument("--category", default=None, help="raw Amazon: category when the dir holds several")


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"name": args.name, "short_users": args.short_users, "min_rating": args.min_rating,
            "k_core_threshold": args.k_core, "require_images": args.require_images, "category": args.category}
    if args.codes:
        opts["with_codes"] = [c.strip() for c in args.codes.split(",") if c.strip()]
    elif args.with_codes:
        opts["with_codes"] = True
    return {k: v for k, v in opts.items() if v is not None}


def _read(source: str, options: dict[str, Any], filters: list[str]) -> SeqDataset:
    """Read one source, printing documented-filter warnings and collecting them for meta."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        ds = read_source(source, **options)
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
            filters.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def _summary(ds: SeqDataset) -> dict[str, Any]:
    lengths = ds.lengths
    return {**ds.stats(), "min_len": int(lengths.min()), "max_len": int(lengths.max()),
            "features": {n: int(ds.items.schema.field(f"feat_{n}").type.list_size) for n in ds.feature_names},
            "text_columns": ds.meta.get("text_columns", []), "fingerprint": ds.fingerprint()}


def cmd_prepare(args: argparse.Namespace) -> int:
    if str(args.out).startswith("s3://"):  # prepared locally, then uploaded
        import tempfile

        from qbert.platform.storage import check_reachable, upload_dir

        check_reachable(args.out)
        with tempfile.TemporaryDirectory(prefix="qbert-prepare-") as tmp:
            remote, args.out, args.shown_out = args.out, str(Path(tmp) / "dataset"), args.out
            rc = cmd_prepare(args)
            upload_dir(args.out, remote)
        return rc
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_canonical_dir(out))):
        raise DataError(f"--out {out} exists and is not a qbert dataset directory; refusing to replace it")
    if args.max_len is not None and args.max_len < 1:
        raise DataError(f"--max-len must be >= 1, got {args.max_len}")
    options = _reader_options(args)
    filters: list[str] = []
    if len(args.sources) > 1:
        options.pop("name", None)  # names the assembled corpus instead
    datasets = [_read(s, dict(options), filters) for s in args.sources]
    if len(datasets) == 1:
        ds = datasets[0]
    else:
        names = args.domains.split(",") if args.domains else [d.name for d in datasets]
        ds = assemble_domains(datasets, names, name=args.name or "multidomain")
    ds.meta["filters"] = filters
    if args.max_len is not None:
        ds.meta["max_len"] = args.max_len  # history length the leave-one-out split should use
    ds.save(out)
    print(json.dumps({"out": getattr(args, "shown_out", str(out)), **_summary(ds)}, indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    ds = _read(args.path, _reader_options(args), [])
    print(json.dumps(_summary(ds), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare datasets and print their statistics",
                                 description="Read any supported source into the canonical parquet layout.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    prep = sub.add_parser("prepare", help="read a source and write a canonical dataset directory (atomic)",
                          description="Read SOURCE (several: a multi-domain corpus with disjoint item ids) and "
                                      "write DIR/items.parquet, sequences.parquet, meta.json atomically.")
    prep.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCE_HELP)
    prep.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    prep.add_argument("--max-len", type=int, default=None,
                      help="history length recorded in meta for the leave-one-out split (default 50)")
    prep.add_argument("--domains", default=None, help="comma list of domain names for several SOURCEs")
    _add_reader_options(prep)
    prep.set_defaults(func=cmd_prepare)

    stats = sub.add_parser("stats", help="print dataset statistics as JSON",
                           description="Print users, items, interactions, avg_len, sparsity (and more) as JSON.")
    stats.add_argument("path", metavar="PATH", help=SOURCE_HELP)
    _add_reader_options(stats)
    stats.set_defaults(func=cmd_stats)
