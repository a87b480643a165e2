"""``qbert recommend``: top-K items for users of a finished run, in the dataset's original IDs."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from qbert.cli import positive_int
from qbert.data.errors import DataError
from qbert.platform.storage import check_reachable, is_s3, local_copy, parse_s3, s3_call, s3_client



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="top-K recommendations from a finished `qbert pipeline` run",
                       description="Write one row per (user, rank) -- user_id, rank, item_id, score, sid -- in the "
                                   "dataset's original IDs. Every user of the run's dataset by default; a user's "
                                   "history is their whole sequence.")
    p.add_argument("--run", required=True, help="run directory of `qbert pipeline`, local or s3://bucket/prefix "
                                                "(only the model, config and semantic-ID tables are fetched)")
    p.add_argument("--out", required=True, help="parquet file to write (recs.parquet), local or s3://bucket/key")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", help="text file, one original user ID per line (default: every user)")
    who.add_argument("--histories", help="parquet with columns user_id (string) and items (list of original item "
                                         "IDs, oldest first): recommend after any history")
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the user's history")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on when stderr is a terminal)")
    p.set_defaults(func=recommend_cmd)
    e = sub.add_parser("export", help="write a run as an MLflow pyfunc model (top-K for a batch of histories)",
                       description="Write an MLflow pyfunc model directory of a finished run, to serve with "
                                   "`mlflow models serve -m DIR --env-manager local` or log to MLflow. Input: "
                                   "user_id and items (original item IDs, oldest first); params k, exclude_history.")
    e.add_argument("--run", required=True, help="run directory of `qbert pipeline`")
    e.add_argument("--out", required=True, help="model directory to create")
    e.set_defaults(func=export_cmd)


def export_cmd(args: argparse.Namespace) -> int:
    from qbert.platform.pyfunc import export_pyfunc

    print(json.dumps({"model": str(export_pyfunc(args.run, args.out))}))
    return 0


def _read_users(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--users file not found: {p}")
    try:
        users = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a UTF-8 text file of user IDs ({e.reason} at byte {e.start})") from None
    if not users:
        raise DataError(f"{p}: no user IDs")
    return users


def _read_histories(path: str) -> dict[str, list[str]]:
    from qbert.utils.io import read_parquet

    p = Path(path)
    table = read_parquet(p, "--histories file")
    for col in ("user_id", "items"):
        if col not in table.column_names:
            raise DataError(f"{p}: missing column '{col}' (has {table.column_names})")
    users = [str(u) for u in table.column("user_id").to_pylist()]
    if len(set(users)) != len(users):
        raise DataError(f"{p}: duplicate user_id values")
    return {u: [str(i) for i in (items or [])] for u, items in zip(users, table.column("items").to_pylist())}


def recommend_cmd(args: argparse.Namespace) -> int:
    from qbert.recommend import RUN_FILES, Recommender
    from qbert.utils.io import atomic_write_parquet
    from qbert.utils.runtime import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.k < 1:
        raise DataError(f"--k must be >= 1, got {args.k}")
    users = _read_users(args.users) if args.users else None
    histories = _read_histories(args.histories) if args.histories else None
    if is_s3(args.out):
        check_reachable(args.out)  # before the work, not after it
    with tempfile.TemporaryDirectory(prefix="qbert-recommend-") as tmp:
        run = local_copy(args.run, Path(tmp) / "run", RUN_FILES)
        if not (run / "model.pt").is_file():
            raise FileNotFoundError(f"no fine-tuned model in {args.run} (model.pt missing): run `qbert pipeline` first")
        rec = Recommender.from_run(run, pick_device(args.device))
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        table = rec.recommend(users=users, histories=histories, k=args.k, exclude_history=args.exclude_history,
                              batch_size=args.batch_size, progress=progress)
        if is_s3(args.out):
            bucket, key = parse_s3(args.out)
            local = Path(tmp) / "recs.parquet"
            atomic_write_parquet(local, table)
            s3_call(lambda: s3_client().upload_file(str(local), bucket, key), f"upload {args.out}")
        else:
            atomic_write_parquet(args.out, table)
    k = min(args.k, rec.model.num_items)
    print(json.dumps({"out": str(args.out), "rows": table.num_rows, "users": table.num_rows // k, "k": k}))
    return 0
