"""``qbert sweep --config SWEEP_YAML --out DIR``: Ray Tune grids (paper Figs. 3-5, Tables 3-5)."""

from __future__ import annotations

import argparse
import json

from qbert.config import ConfigError, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune sweep of pipeline configs (figures / ablation tables)")
    p.add_argument("--config", required=True, help="sweep YAML, or a bundled name such as sweeps/ablations (`qbert configs list`)")
    p.add_argument("--out", required=True, help="sweep directory: results.csv/md, plots, one dir per trial")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the base pipeline config for every trial (repeatable)")
    p.add_argument("--base", default=None, help="base pipeline config, instead of the sweep file's base_config")
    p.add_argument("--max-concurrent", type=int, default=None, help="override the sweep's max_concurrent_trials")
    p.add_argument("--grids", default=None, help="comma-separated subset of the sweep's grids, in the file's order")
    p.add_argument("--no-tracking", action="store_true", help="do not log parent/child runs to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbert.pipeline import PipelineConfig
    from qbert.platform.tune import load_sweep, pipeline_trial, run_sweep

    from qbert.bundled import resolve_config

    sweep = load_sweep(resolve_config(args.config))
    updates = {}
    if args.base:
        updates["base_config"] = str(resolve_config(args.base))
    if args.max_concurrent:
        updates["max_concurrent_trials"] = args.max_concurrent
    if args.no_tracking:
        updates["tracking"] = sweep.tracking.model_copy(update={"enabled": False})
    if args.grids:
        wanted = [g.strip() for g in args.grids.split(",") if g.strip()]
        unknown = sorted(set(wanted) - {g.name for g in sweep.grids})
        if unknown:
            raise ConfigError(f"--grids: {unknown} not in {args.config} (has {[g.name for g in sweep.grids]})")
        updates["grids"] = [g for g in sweep.grids if g.name in wanted]
    if updates:
        sweep = sweep.model_copy(update=updates)
    rows = run_sweep(sweep, args.out, pipeline_trial, PipelineConfig, base_override=parse_overrides(args.overrides))
    best = [{"grid": r["grid"], "label": r["label"], f"valid/{sweep.metric}": r.get(f"valid/{sweep.metric}"),
             f"test/{sweep.metric}": r.get(f"test/{sweep.metric}")} for r in rows if r.get("best")]
    print(json.dumps({"trials": len(rows), "selected": best, "table": f"{args.out}/results.md"}, indent=2))
    return 0
