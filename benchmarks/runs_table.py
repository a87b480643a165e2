"""Benchmark table of finished pipeline runs: what each was trained with and what it measured.

    python benchmarks/runs_table.py --name search_s4 --run runs/hp-cos-lr1e-3 --run runs/hp-cos-repeat

Reads each run's ``metrics.json`` and ``summary.json`` (nothing is retrained or re-evaluated),
and writes ``benchmarks/results/<name>.{json,md}``: the settings a search varies (pretraining
epochs and schedule, fine-tuning lr and schedule, repeat bias, and any of ``OPTIONS`` a run set
away from its default), the epoch chosen on valid, the
valid metrics it was chosen by, the ranking weight and repeat shift the run learned or chose,
and test, which every run evaluated once at the end. The ``best valid`` column marks the row to
report; test never picks it. Runs that differ only in their seed also get a mean ± std row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.pipeline import METRIC_KEYS, PipelineConfig  # noqa: E402
from qbert.utils.io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402


# further settings a search varies: shown in the "other" column when a run moved them off their default
OPTIONS = {"model.hidden": "hidden", "model.dropout": "dropout", "model.prefix_bias": "prefix bias",
           "finetune.mask_ratio": "mask", "finetune.weight_decay": "weight decay", "finetune.ema_decay": "EMA",
           "finetune.last_prob": "last masked", "finetune.ema_ramp": "EMA ramp", "finetune.label_smoothing": "label smoothing"}


def _options(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``OPTIONS`` whose value in ``cfg`` differs from the config class's default."""
    out = {}
    for key in OPTIONS:
        section, field = key.split(".")
        sec = getattr(cfg, section)
        if getattr(sec, field) != type(sec).model_fields[field].default:
            out[key] = getattr(sec, field)
    return out


# config keys that say where or how reproducibly a run ran, not what it trained: runs differing only
# in these are repeats of one setup (the seed is copied into fusion and quantize by PipelineConfig)
_NOT_SETUP = {("seed",), ("fusion", "seed"), ("quantize", "seed"), ("reuse",), ("device",), ("fusion", "device"),
              ("quantize", "device"), ("progress",), ("plots",)}


def setup_key(cfg: PipelineConfig) -> str:
    """A short hash of everything in ``cfg`` but the seed and runtime keys: equal for seed repeats."""
    def strip(d: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
        return {k: strip(v, path + (k,)) if isinstance(v, dict) else v
                for k, v in d.items() if path + (k,) not in _NOT_SETUP}

    return hashlib.sha256(json.dumps(strip(cfg.to_dict()), sort_keys=True).encode()).hexdigest()[:12]


def read_run(run_dir: Path, monitor: str = "NDCG@10") -> dict[str, Any]:
    """One row from a finished run directory; a clear error when it is not one."""
    files = {name: run_dir / f"{name}.json" for name in ("metrics", "summary")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: not a finished pipeline run (missing {', '.join(missing)})")
    metrics = json.loads(files["metrics"].read_text())
    summary = json.loads(files["summary"].read_text())
    cfg = PipelineConfig.from_dict(summary["config"], source=str(files["summary"]))
    stages = metrics["stages"]
    ft = stages["finetune"]
    pre = stages.get("pretrain", {})
    return {
        "run": str(run_dir),
        "settings": {
            "pretrain_epochs": 0 if pre.get("skipped") else cfg.pretrain.epochs,
            "pretrain_schedule": cfg.pretrain.schedule,
            "finetune_lr": cfg.finetune.lr,
            "finetune_schedule": cfg.finetune.schedule,
            "finetune_epochs": cfg.finetune.epochs,
            "repeat_bias": cfg.model.repeat_bias,
            "text": cfg.data.features.get("text"),
            "other": _options(cfg),
        },
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "code_score_weight": ft.get("code_score_weight", cfg.model.code_score_weight),
        "repeat_weight": ft.get("repeat_weight"),
        "valid": {k: metrics["valid"][k] for k in METRIC_KEYS},
        # a search run keeps test off (eval.test: false): valid only
        "test": {k: metrics["test"][k] for k in METRIC_KEYS} if metrics.get("test") else None,
        "monitor": monitor,
        "git_commit": summary.get("git_commit"),
        "seed": cfg.seed,
        "setup": setup_key(cfg),
        "data_fingerprint": summary.get("data", {}).get("fingerprint"),
    }


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over runs of one setup with different seeds (2+ runs).

    Where a setup was run with several seeds, this is the number to compare, and the std says how
    large a difference one seed cannot resolve. A group's valid mean is what ranks it; test only
    describes it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["setup"], []).append(r)
    out = []
    for key, rs in groups.items():
        seeds = {r["seed"] for r in rs}
        if len(seeds) < 2:
            continue
        if len(seeds) != len(rs):
            raise ValueError(f"runs {[r['run'] for r in rs]} repeat setup {key} with a repeated seed; list each once")

        def stats(split: str) -> dict[str, dict[str, float]]:
            return {k: {"mean": statistics.fmean(v := [r[split][k] for r in rs]), "std": statistics.stdev(v)}
                    for k in METRIC_KEYS}

        out.append({"setup": key, "runs": [r["run"] for r in rs], "seeds": [r["seed"] for r in rs],
                    "valid": stats("valid"), "test": stats("test") if all(r["test"] for r in rs) else None})
    return out


def _seed_markdown(groups: list[dict[str, Any]]) -> list[str]:
    if not groups:
        return []
    head = "| setup | seeds | valid NDCG@10 | test HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 |"
    lines = ["", "Across seeds (mean ± sample std over runs that differ only in the seed):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    pm = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    for g in groups:
        lines.append(f"| {g['setup']} ({', '.join(g['runs'])}) | {', '.join(map(str, g['seeds']))} | "
                     f"{pm(g['valid']['NDCG@10'])} | "
                     + " | ".join(pm(g["test"][k]) if g["test"] else "not scored" for k in METRIC_KEYS) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], best: int | None, meta: dict[str, Any],
             groups: list[dict[str, Any]] | None = None) -> str:
    head = ("| run | seed | pretrain epochs | fine-tune lr, schedule | repeat bias (learned) | chosen w | best epoch / run "
            "| other | valid NDCG@10 | test HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows):
        s = r["settings"]
        rep = f"{r['repeat_weight']:+.2f}" if r["repeat_weight"] is not None else "off"
        name = f"**{r['run']}** (best valid)" if i == best else r["run"]
        other = ", ".join(f"{OPTIONS[k]} {v:g}" if not isinstance(v, bool) else OPTIONS[k]
                          for k, v in s.get("other", {}).items())
        lines.append(f"| {name} | {r['seed']} | {s['pretrain_epochs']} ({s['pretrain_schedule']}) | {s['finetune_lr']:g}, "
                     f"{s['finetune_schedule']} | {rep} | {r['code_score_weight']:g} | {r['best_epoch']} / "
                     f"{r['epochs_run']} | {other or '-'} | {r['valid']['NDCG@10']:.4f} | "
                     + " | ".join(f"{r['test'][k]:.4f}" if r["test"] else "not scored" for k in METRIC_KEYS) + " |")
    marked = ("the best-valid row is marked by valid only." if best is not None
              else "the runs repeat one setup, so none is marked best.")
    lines += ["", f"Command: `{meta['command']}`; git {meta['git_commit']}; {meta['date']}. Each run's own "
              "commit, seed and data fingerprint are in the JSON. Epochs and ranking weights were chosen on valid "
              f"NDCG@10 inside each run; {marked}"]
    lines += _seed_markdown(groups or [])
    return "\n".join(lines) + "\n"


def plot_curves(run_dirs: list[Path], path: Path, monitor: str = "NDCG@10") -> None:
    """Valid ``monitor`` per fine-tuning epoch, one line per run (from each run's history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in run_dirs:
        hist = [h for h in json.loads((run / "metrics.json").read_text()).get("history", []) if monitor in h]
        ax.plot([h["epoch"] for h in hist], [h[monitor] for h in hist], marker=".", label=run.name)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(f"valid {monitor} (training-time w)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a finished pipeline run directory (repeatable)")
    ap.add_argument("--name", required=True, help="writes benchmarks/results/NAME.{json,md}")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--plot", help="also write a PNG of valid NDCG@10 per fine-tuning epoch of every run")
    args = ap.parse_args(argv)
    if not args.name.replace("_", "").replace("-", "").isalnum():
        ap.error(f"--name must be letters, digits, '-' or '_', got {args.name!r}")
    try:
        rows = [read_run(Path(run)) for run in args.run]
        groups = seed_groups(rows)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        ap.error(str(exc))
    # seeds of one setup are repeats, not candidates: no seed is "the best valid" row
    one_setup = len(groups) == 1 and len(groups[0]["runs"]) == len(rows)
    best = None if one_setup else max(range(len(rows)), key=lambda i: rows[i]["valid"]["NDCG@10"])
    meta = benchmark_meta(sys.argv[0], argv, REPO)
    out = Path(args.out_dir)
    atomic_write_json(out / f"{args.name}.json",
                      {"rows": rows, "best_valid": None if best is None else rows[best]["run"], "seed_groups": groups, "meta": meta})
    atomic_write_text(out / f"{args.name}.md", markdown(rows, best, meta, groups))
    if args.plot:
        plot_curves([Path(run) for run in args.run], Path(args.plot))
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
