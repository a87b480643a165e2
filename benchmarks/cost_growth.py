"""Benchmark: how each stage's cost grows with the dataset (#20): training seconds per epoch and
peak memory of every stage on several domains, on this machine.

    python benchmarks/cost_growth.py --config configs/instruments-tuned.yaml \
        --sources ../shared/datasets/amazon-instruments ../shared/datasets/amazon-arts \
                  ../shared/datasets/amazon-games --threads 2
    python benchmarks/cost_growth.py --quick            # synthetic data of three sizes

Each domain runs in its own process (so one domain's memory never counts for another): the
pipeline of ``--config`` with only ``data.source`` changed and a few epochs per stage, one
stage at a time in one run directory. Per stage it records the mean training seconds per epoch
(the first epoch left out: warm-up) and the peak resident memory of the process during that stage
(Linux: the high-water mark is reset before each stage, ``/proc/self/clear_refs``). Writes
``benchmarks/results/<--name>.{json,md}`` (default ``cost_growth``; ``--quick``: under ``--runs-dir``), with each
stage's seconds per epoch relative to the smallest domain beside the interactions' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.pipeline import PipelineConfig, load_data, quickstart_config, run_pipeline  # noqa: E402
from qbert.pipeline.data import target_split  # noqa: E402
from qbert.pipeline.stages import STAGES  # noqa: E402
from qbert.seqrec.stage import row_draw_chance, training_rows_and_owners  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

EPOCHS = {"fusion.epochs": 3, "quantize.epochs": 10, "pretrain.epochs": 3, "finetune.epochs": 3,
          "finetune.patience": 0, "eval.test": False, "plots": False}
QUICK_SOURCES = ["synthetic:users=400,items=150", "synthetic:users=800,items=300",
                 "synthetic:users=1600,items=600"]


def peak_reset() -> bool:
    """Reset this process's peak resident memory (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak resident memory of this process since the last reset, in MiB (Linux ``VmHWM``; else
    the lifetime peak from ``resource``)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def epoch_seconds(report: dict[str, Any]) -> float | None:
    times = [h["epoch_time_s"] for h in report.get("history", []) if "epoch_time_s" in h]
    if not times:
        return None
    return statistics.mean(times[1:] if len(times) > 1 else times)


def epoch_load(rows: np.ndarray, owners: np.ndarray, cap: int) -> tuple[int, int]:
    """Rows and non-padding tokens a fine-tuning epoch passes over, expected over its draws: with
    ``finetune.prefixes`` every training prefix is a row; with a cap > 0
    (``finetune.max_rows_per_user``) a row of a user with n rows is drawn with chance min(n, cap) / n."""
    real = (rows > 0).any(axis=1)  # masked_batches drops all-padding rows
    rows, owners = rows[real], owners[real]
    chance = row_draw_chance(owners, cap) if cap > 0 else np.ones(len(rows))
    return int(round(float(chance.sum()))), int(round(float(((rows > 0).sum(axis=1) * chance).sum())))


def measure_domain(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """Run the pipeline one stage at a time in an emptied ``run_dir`` (a stage resumed from an
    earlier checkpoint would train nothing); each stage's seconds per epoch and peak memory."""
    shutil.rmtree(run_dir, ignore_errors=True)
    data = load_data(cfg)
    stats = data.target.stats()
    rows, owners = training_rows_and_owners(target_split(cfg, data), cfg.data.max_len, cfg.finetune.prefixes)
    epoch_rows, epoch_tokens = epoch_load(rows, owners, cfg.finetune.max_rows_per_user)
    stages = {}
    for stage in STAGES:
        exact = peak_reset()
        report = run_pipeline(cfg, run_dir, stages=[stage])[stage]
        stages[stage] = {"epoch_seconds": epoch_seconds(report), "epochs": len(report.get("history", [])),
                         "peak_rss_mib": round(peak_mib(), 1), "peak_is_per_stage": exact}
    name = cfg.data.source if cfg.data.source.startswith("synthetic") else stats["name"]
    return {"dataset": name, "users": stats["users"], "items": stats["items"],
            "interactions": stats["interactions"], "finetune_rows": epoch_rows,
            "finetune_tokens": epoch_tokens, "stages": stages}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = min(rows, key=lambda r: r["interactions"])
    lines = ["| dataset | users | items | interactions (x smallest) | fine-tuning tokens (x smallest) | stage "
             "| s/epoch (x smallest) | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["interactions"]):
        growth = r["interactions"] / base["interactions"]
        tokens = (f"{r['finetune_tokens']:,} ({r['finetune_tokens'] / base['finetune_tokens']:.2f}x)"
                  if "finetune_tokens" in r and "finetune_tokens" in base else "-")
        for stage, s in r["stages"].items():
            sec, b = s["epoch_seconds"], base["stages"][stage]["epoch_seconds"]
            cell = f"{sec:.2f} ({sec / b:.2f}x)" if sec is not None and b else "-"
            lines.append(f"| {r['dataset']} | {r['users']:,} | {r['items']:,} | {r['interactions']:,} ({growth:.2f}x) "
                         f"| {tokens} | {stage} | {cell} | {s['peak_rss_mib']:.0f} |")
    m = meta["machine"]
    lines += ["", f"Command: `{meta['command']}`; seed {meta['seed']}; git {meta['git_commit']}; {meta['date']}; "
              f"{m.get('cpu_count')} CPUs ({m.get('processor', '')}); {meta['threads']} torch threads; mean training "
              "seconds per epoch without the first epoch (fusion and quantize epochs pass over items, pretrain "
              "and finetune over sequences); peak RSS = the process's high-water mark during the stage (reset "
              "to the resident memory at the stage's start, so what earlier stages left in memory counts)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="pipeline config (default: the synthetic quick start)")
    ap.add_argument("--sources", nargs="+", default=None, help="the domains' data sources")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="synthetic data of three sizes")
    ap.add_argument("--name", default="cost_growth", help="stem of the written files (e.g. cost_growth_sampled)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one source, print JSON
    args = ap.parse_args(argv)
    if not args.name.replace("_", "").replace("-", "").isalnum():
        print(f"error: --name {args.name!r}: letters, digits, '_' and '-' only", file=sys.stderr)
        return 2
    try:
        base = PipelineConfig.from_yaml(args.config) if args.config else quickstart_config()
        base = base.override(EPOCHS)
        if args.overrides:
            base = base.override(parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.one is not None:  # the child process: one domain
        import torch

        torch.set_num_threads(args.threads)
        cfg = base.override({"data.source": args.one})
        print(json.dumps(measure_domain(cfg, args.runs_dir)))
        return 0
    if args.quick and args.runs_dir is None:
        print("error: --quick writes under --runs-dir: name one", file=sys.stderr)
        return 2
    sources = args.sources or (QUICK_SOURCES if args.quick else None)
    if not sources:
        print("error: --sources: name the domains' data sources (or --quick)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbert-cost-") as tmp:
        runs = args.runs_dir or Path(tmp)
        for i, source in enumerate(sources):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", source, "--runs-dir", str(runs / f"d{i}"),
                   "--threads", str(args.threads)]
            cmd += ["--config", str(args.config)] if args.config else []
            cmd += [x for o in args.overrides for x in ("--set", o)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                print(f"error: measuring {source} failed (exit {done.returncode})", file=sys.stderr)
                return 1
            rows.append({"source": source, **json.loads(done.stdout.strip().splitlines()[-1])})
    meta = benchmark_meta("benchmarks/cost_growth.py", argv, REPO, seed=base.seed, threads=args.threads)
    out = args.runs_dir if args.quick else REPO / "benchmarks" / "results"
    atomic_write_json(out / f"{args.name}.json", {"rows": rows, **meta})
    atomic_write_text(out / f"{args.name}.md", markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
