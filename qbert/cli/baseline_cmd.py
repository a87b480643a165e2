"""``qbert baseline`` (train SASRec / BERT4Rec) and ``qbert evaluate`` (re-evaluate a run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qbert.cli import positive_int
from qbert.config import ConfigError, parse_overrides

DATA_HELP = "a dataset dir or source readable by qbert.data.readers.read_source, or 'synthetic[:k=v,...]'"



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="train an ID-only baseline (SASRec or BERT4Rec) and write metrics.json",
                       description="Train SASRec or BERT4Rec with full-softmax cross-entropy, early stopping on "
                                   "valid NDCG@10; evaluate the best epoch by full ranking. Writes RUN_DIR/"
                                   "metrics.json, config.yaml and model.pt.")
    p.add_argument("--model", choices=("sasrec", "bert4rec"), default=None, help="model (overrides the config)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", default=None, help="BaselineConfig YAML")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--exclude-history", action="store_true", default=None,
                   help="remove history items from the ranking (default keeps them, like RecBole)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any BaselineConfig field (YAML value), repeatable")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars with total and ETA (default: on when stderr is a terminal; otherwise one "
                        "log line per epoch)")
    p.set_defaults(func=run_baseline_cmd)

    e = sub.add_parser("evaluate", help="re-evaluate a finished run's model (baseline or pipeline; prints JSON)",
                       description="Reload RUN_DIR/model.pt and evaluate it by full ranking on the run's data.")
    e.add_argument("--run", required=True, help="run directory written by 'qbert baseline' or 'qbert pipeline'")
    e.add_argument("--split", choices=("test", "valid"), default="test")
    e.add_argument("--exclude-history", action="store_true", default=None,
                   help="remove history items from the ranking (default: the run's setting)")
    e.add_argument("--data", default=None, help="data source (default: the one recorded in the run)")
    e.add_argument("--device", default="auto")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with total and ETA (default: on when stderr is a terminal)")
    e.set_defaults(func=evaluate_cmd)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    ov: dict[str, Any] = {}
    for key, field in (("model", "model"), ("epochs", "epochs"), ("patience", "patience"), ("seed", "seed"),
                       ("device", "device"), ("threads", "num_threads"), ("max_len", "max_len"),
                       ("batch_size", "batch_size"), ("lr", "lr"), ("exclude_history", "exclude_history")):
        if getattr(args, key) is not None:
            ov[field] = getattr(args, key)
    if args.progress is not None or not sys.stderr.isatty():
        ov["progress"] = bool(args.progress)
    ov.update(parse_overrides(args.set))
    return ov


def run_baseline_cmd(args: argparse.Namespace) -> int:
    from qbert.baselines import BaselineConfig, run_baseline
    from qbert.data.readers import read_source

    cfg = BaselineConfig.from_yaml(args.config) if args.config else BaselineConfig()
    cfg = cfg.override(_overrides(args))
    dataset = read_source(args.data)
    source = args.data if str(args.data).startswith("synthetic") else str(Path(args.data).resolve())
    metrics = run_baseline(cfg, dataset, args.out, data_source=source, resume=args.resume)
    summary = {k: metrics[k] for k in ("model", "test", "valid", "best_epoch", "params")}
    summary["run"] = str(Path(args.out) / "metrics.json")
    print(json.dumps(summary, indent=2))
    return 0


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def evaluate_cmd(args: argparse.Namespace) -> int:
    """``--run`` local or ``s3://`` (the files evaluation reads are fetched into a scratch dir)."""
    import tempfile

    from qbert.platform.storage import local_copy
    from qbert.recommend import RUN_FILES

    with tempfile.TemporaryDirectory(prefix="qbert-evaluate-") as tmp:
        return _evaluate(args, local_copy(args.run, Path(tmp) / "run", RUN_FILES))


def _evaluate(args: argparse.Namespace, run: Path) -> int:
    from qbert.baselines import evaluate_run, load_run_info
    from qbert.data.readers import read_source

    if (run / "semantic_ids.parquet").is_file():  # a Q-BERT4Rec pipeline run
        from qbert.pipeline import evaluate_run as evaluate_pipeline_run
        from qbert.utils.runtime import pick_device

        if args.data:
            raise ConfigError("--data applies to baseline runs; a pipeline run is evaluated on its own config's data")
        res = evaluate_pipeline_run(run, args.split, args.exclude_history, device=pick_device(args.device),
                                    progress=_progress(args))
        print(json.dumps({"run": str(args.run), "split": args.split, **res}, indent=2))
        return 0

    info = load_run_info(run)
    source = args.data or info.get("data_source")
    if not source:
        raise ConfigError(f"run {args.run} records no data source; pass --data")
    dataset = read_source(source)
    res = evaluate_run(run, dataset, which=args.split, exclude_history=args.exclude_history, device=args.device,
                       progress=_progress(args))
    print(json.dumps({"run": str(args.run), "split": args.split, "data": str(source), **res}, indent=2))
    return 0
