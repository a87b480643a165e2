"""``qbert features extract``: stage 0 (item text / image features) on Ray Data, or in-process.

The YAML file is a :class:`~qbert.features.config.FeatureConfig`, either at top level or under
a ``features:`` section of a whole-pipeline config; flags override single fields.
``ray_jobs/extract_features.py`` takes the same arguments for ``ray job submit``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qbert.config import ConfigError, load_yaml
from qbert.features.config import FeatureConfig


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML FeatureConfig (or a config with a `features:` section)")
    p.add_argument("--data", help="canonical dataset dir with items.parquet (local or s3://)")
    p.add_argument("--out", help="feature root dir (local or s3://); one sub-folder per modality")
    p.add_argument("--modality", help="comma-separated: text, image (default from config: text)")
    p.add_argument("--text-model", help="text model dir, hub name or pkg:<module>")
    p.add_argument("--pooling", choices=["mean", "last", "cls"])
    p.add_argument("--image-model", help="open_clip model name or local-dir:<dir>")
    p.add_argument("--image-pretrained", help="open_clip tag or local checkpoint file ('none' for random)")
    p.add_argument("--actors", type=int, help="actor pool size")
    p.add_argument("--batch-size", type=int, help="items per map_batches batch (= one committed file)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--on-error", choices=["fail", "zero"], help="per-item failure policy")
    p.add_argument("--limit", type=int, help="encode at most this many pending items in this run")
    p.add_argument("--merge-into", help="also write the dataset + feat_<modality> columns to this dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars with total and ETA (default: on when stderr is a terminal; otherwise one "
                        "log line per epoch)")
    p.add_argument("--report", help="also write the run report (JSON) to this file")


def config_from_args(args: argparse.Namespace) -> FeatureConfig:
    data: dict[str, Any] = {}
    source = "<flags>"
    if args.config:
        data = load_yaml(args.config)
        if isinstance(data.get("features"), dict):
            data = data["features"]
        source = args.config
    sets = {
        ("data",): args.data, ("out",): args.out, ("text", "model"): args.text_model,
        ("text", "pooling"): args.pooling, ("image", "model"): args.image_model,
        ("pipeline", "actors"): args.actors, ("pipeline", "batch_size"): args.batch_size,
        ("pipeline", "num_gpus_per_actor"): args.num_gpus, ("on_error",): args.on_error,
        ("pipeline", "limit"): args.limit, ("merge_into",): args.merge_into,
    }
    if args.modality:
        sets[("modalities",)] = [m.strip() for m in args.modality.split(",") if m.strip()]
    if args.image_pretrained:
        sets[("image", "pretrained")] = None if args.image_pretrained.lower() == "none" else args.image_pretrained
    if args.progress is not None or not sys.stderr.isatty():
        sets[("pipeline", "progress")] = bool(args.progress)
    for path, value in sets.items():
        if value is None and path != ("image", "pretrained"):
            continue
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping")
        node[path[-1]] = value
    for required in ("data", "out"):
        if not data.get(required):
            raise ConfigError(f"{source}: '{required}' is required (set it in the config or with --{required})")
    return FeatureConfig.from_dict(data, source=source)


def _extract(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from qbert.platform.feature_pipeline import extract_features
    from qbert.utils.io import atomic_write_json

    result = extract_features(cfg)
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        atomic_write_json(args.report, result)
    missing = {m: r["missing"] for m, r in result["modalities"].items() if r["missing"]}
    if missing:
        print(f"warning: items with unusable input got zero vectors: {missing}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    feats = subparsers.add_parser("features", help="stage 0: extract item text / image features (Ray Data)")
    sub = feats.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    sub.required = True
    p = sub.add_parser("extract", help="encode the items of a canonical dataset; resumable")
    add_extract_arguments(p)
    p.set_defaults(func=_extract)
