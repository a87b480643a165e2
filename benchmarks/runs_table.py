"""Benchmark table of finished pipeline runs: what each was trained with and what it measured.

    python benchmarks/runs_table.py --name search_s4 --run runs/hp-cos-lr1e-3 --run runs/hp-cos-repeat

Reads each run's ``metrics.json`` and ``summary.json`` (nothing is retrained or re-evaluated),
and writes ``benchmarks/results/<name>.{json,md}``: the settings a search varies (pretraining
epochs and schedule, fine-tuning lr and schedule, repeat bias, and any of ``OPTIONS`` a run set
away from its default), the epoch chosen on valid, the
valid metrics it was chosen by, the ranking weight and repeat shift the run learned or chose,
and test, which every run evaluated once at the end. The ``best valid`` column marks the row to
report; test never picks it.
"""

from __future__ import annotations

import argparse
import json
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
           "finetune.mask_ratio": "mask", "finetune.weight_decay": "weight decay", "finetune.ema_decay": "EMA"}


def _options(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``OPTIONS`` whose value in ``cfg`` differs from the config class's default."""
    out = {}
    for key in OPTIONS:
        section, field = key.split(".")
        sec = getattr(cfg, section)
        if getattr(sec, field) != type(sec).model_fields[field].default:
            out[key] = getattr(sec, field)
    return out


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
        "test": {k: metrics["test"][k] for k in METRIC_KEYS},
        "monitor": monitor,
        "git_commit": summary.get("git_commit"),
        "seed": cfg.seed,
        "data_fingerprint": summary.get("data", {}).get("fingerprint"),
    }


def markdown(rows: list[dict[str, Any]], best: int, meta: dict[str, Any]) -> str:
    head = ("| run | pretrain epochs | fine-tune lr, schedule | repeat bias (learned) | chosen w | best epoch / run "
            "| other | valid NDCG@10 | test HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows):
        s = r["settings"]
        rep = f"{r['repeat_weight']:+.2f}" if r["repeat_weight"] is not None else "off"
        name = f"**{r['run']}** (best valid)" if i == best else r["run"]
        other = ", ".join(f"{OPTIONS[k]} {v:g}" if not isinstance(v, bool) else OPTIONS[k]
                          for k, v in s.get("other", {}).items())
        lines.append(f"| {name} | {s['pretrain_epochs']} ({s['pretrain_schedule']}) | {s['finetune_lr']:g}, "
                     f"{s['finetune_schedule']} | {rep} | {r['code_score_weight']:g} | {r['best_epoch']} / "
                     f"{r['epochs_run']} | {other or '-'} | {r['valid']['NDCG@10']:.4f} | "
                     + " | ".join(f"{r['test'][k]:.4f}" for k in METRIC_KEYS) + " |")
    lines += ["", f"Command: `{meta['command']}`; git {meta['git_commit']}; {meta['date']}. Each run's own "
              "commit, seed and data fingerprint are in the JSON. Epochs and ranking weights were chosen on valid "
              "NDCG@10 inside each run; the best-valid row is marked by valid only."]
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
    except (FileNotFoundError, KeyError, ValueError) as exc:
        ap.error(str(exc))
    best = max(range(len(rows)), key=lambda i: rows[i]["valid"]["NDCG@10"])
    meta = benchmark_meta(sys.argv[0], argv, REPO)
    out = Path(args.out_dir)
    atomic_write_json(out / f"{args.name}.json", {"rows": rows, "best_valid": rows[best]["run"], "meta": meta})
    atomic_write_text(out / f"{args.name}.md", markdown(rows, best, meta))
    if args.plot:
        plot_curves([Path(run) for run in args.run], Path(args.plot))
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
