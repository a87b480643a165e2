"""Benchmark: Q-BERT4Rec on Amazon Instruments -- the paper's Tables 2-6.

    python benchmarks/qbert4rec.py --config configs/instruments.yaml --runs-dir runs/bench-qbert4rec
    python benchmarks/qbert4rec.py --quick --runs-dir /tmp/q          # smoke run, embedded synthetic data

One ``qbert.pipeline.run_pipeline`` per row, each a dotted override of the config:

- Table 2 ``main``: the config as is;
- Table 3 ``modalities``: image / text / ID only / all (``data.modalities``, which also sets the fusion's);
- Table 4 ``pretraining``: ``pretrain.strategy`` none / mlm / multi (on the training part of the
  target's own sequences: the pipeline never lets a valid or test target into pretraining);
- Table 5 ``fusion``: ``fusion.variant`` fixed / dynamic;
- Table 6 ``cost``: parameters, FLOPs per sample (one training step, one full-ranking forward),
  full-ranking latency per user and training throughput of the main run's final model.

Rows whose resolved config equals an earlier row's (``all``, ``multi``, ``dynamic`` usually equal
the main row) share its run directory instead of training again. Each run lives in
``RUNS_DIR/<row>/``; a directory that already holds ``metrics.json`` of the same config is read,
not re-run, so an interrupted benchmark resumes where it stopped. Nothing is chosen by test
metrics: each run's epoch is picked by valid NDCG@10 inside the pipeline, and the tables only mark
the row with the best *valid* NDCG@10. Writes ``benchmarks/results/qbert4rec.json`` and
``benchmarks/results/qbert4rec.md`` (with ``--quick``: ``RUNS_DIR/qbert4rec.{json,md}`` unless
``--out-json/--out-md`` are given, so a smoke run never replaces the real results).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse on a shared, oversubscribed machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.data.errors import DataError  # noqa: E402
from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.pipeline import (  # noqa: E402
    METRIC_KEYS,
    PipelineConfig,
    load_data,
    load_run_model,
    run_pipeline,
)
from qbert.seqrec import masks  # noqa: E402
from qbert.seqrec.profile import (  # noqa: E402
    parameter_count,
    ranking_latency_per_user,
    score_flops_per_sample,
    train_flops_per_sample,
    training_throughput,
)
from qbert.seqrec.stage import training_rows  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta, machine_info, pick_device  # noqa: E402

log = logging.getLogger("bench.qbert4rec")

TABLES = ("main", "modalities", "pretraining", "fusion", "cost")
PAPER = {"HR@1": 0.0835, "HR@5": 0.1153, "HR@10": 0.1418, "NDCG@5": 0.0995, "NDCG@10": 0.1077}
BASELINE_NAMES = ("SASRec (ours)", "BERT4Rec (ours)")
DEFAULT_JSON = REPO / "benchmarks" / "results" / "qbert4rec.json"
DEFAULT_MD = REPO / "benchmarks" / "results" / "qbert4rec.md"
BASELINES_JSON = REPO / "benchmarks" / "results" / "baselines.json"
HEADERS = {"activated_layers_median": "median fusion layers", "collision_rate_before": "collisions before",
           "collision_rate_after": "collisions after"}
TITLES = {
    "main": "Table 2: overall performance (full ranking, test split)",
    "modalities": "Table 3: modality ablation",
    "pretraining": "Table 4: pretraining ablation (pretraining on the target's training part)",
    "fusion": "Table 5: fixed vs dynamic fusion",
    "cost": "Table 6: cost of the final model",
}


@dataclass
class Row:
    """One benchmark row: a named override of the base config."""

    table: str
    name: str  # run-directory name, unique
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


def plan_rows(tables: list[str]) -> list[Row]:
    """The rows of the requested tables, main first (the cost table profiles the main run)."""
    rows = [Row("main", "main", "Q-BERT4Rec (ours)")]
    if "modalities" in tables:
        for label, mods in (("image", ["image"]), ("text", ["text"]), ("ID only", ["id"]),
                            ("all", ["text", "image", "id"])):
            rows.append(Row("modalities", "modalities-" + label.split()[0].lower(), label, {"data.modalities": mods}))
    if "pretraining" in tables:
        for label, s in (("no pretraining", "none"), ("single-mask MLM", "mlm"), ("multi-mask", "multi")):
            rows.append(Row("pretraining", f"pretraining-{s}", label, {"pretrain.strategy": s}))
    if "fusion" in tables:
        for v in ("fixed", "dynamic"):
            rows.append(Row("fusion", f"fusion-{v}", f"{v} fusion", {"fusion.variant": v}))
    return rows


def quick_config() -> PipelineConfig:
    """Smoke-test setting: embedded synthetic data, a few epochs, seconds per run on 2 cores."""
    return PipelineConfig.from_dict({
        "data": {"source": "synthetic", "max_len": 10, "modalities": ["text", "image", "id"],
                 "synthetic": {"seed": 0, "num_users": 150, "num_items": 60, "num_clusters": 6, "max_len": 10}},
        "fusion": {"dim": 16, "layers": 2, "epochs": 2, "batch_size": 60},
        "quantize": {"levels": 2, "codebook_size": 16, "hidden": [32], "code_dim": 8, "epochs": 3, "batch_size": 60},
        "model": {"hidden": 16, "layers": 1, "heads": 2, "dropout": 0.1},
        "pretrain": {"strategy": "multi", "epochs": 1, "batch_size": 64, "lr": 2e-3},
        "finetune": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "patience": 2, "eval_batch_size": 256},
        "seed": 0, "device": "cpu", "plots": False,
    }, source="quick_config")


# ----------------------------------------------------------------------------------------- runs
def plan_runs(base: PipelineConfig, rows: list[Row], runs_dir: Path) -> list[tuple[Row, PipelineConfig, Path, str]]:
    """(row, config, run dir, status) per row: ``shared`` (same config as an earlier row),
    ``resumed`` (finished run present), or ``todo``. Checks every config before anything runs."""
    done: list[tuple[PipelineConfig, Path]] = []
    plan = []
    for row in rows:
        cfg = base.override(row.overrides) if row.overrides else base
        shared = next((d for c, d in done if c == cfg), None)
        run_dir = shared or runs_dir / row.name
        if shared is not None:
            status = "shared"
        elif (run_dir / "metrics.json").is_file():
            if not (run_dir / "config.yaml").is_file() or PipelineConfig.from_yaml(run_dir / "config.yaml") != cfg:
                raise ConfigError(f"{run_dir} holds a finished run of a different config than row '{row.name}'; "
                                  "remove it or use another --runs-dir")
            status = "resumed"
        else:
            status = "todo"
        done.append((cfg, run_dir))
        plan.append((row, cfg, run_dir, status))
    return plan


def run_rows(base: PipelineConfig, rows: list[Row], runs_dir: Path, finished_only: bool = False
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Run (or reuse) every row; return one record per row with its metrics and provenance, and
    (``finished_only``: rows whose run has not finished are left out, not run) the rows left out."""
    records, left_out = [], []
    for row, cfg, run_dir, status in plan_runs(base, rows, runs_dir):
        t0 = time.perf_counter()
        if finished_only and not (run_dir / "metrics.json").is_file():  # todo, or shared with an unfinished row
            left_out.append(f"{row.table}/{row.label}")
            continue
        if status == "todo":
            log.info("row %s: running into %s", row.name, run_dir)
            run_pipeline(cfg, run_dir)
            status = "ran"
        rec = record_of(row, run_dir, status)
        rec["wall_seconds"] = time.perf_counter() - t0
        records.append(rec)
        log.info("row %s (%s): test %s", row.name, status, json.dumps(rec["test"]))
    return records, left_out


def record_of(row: Row, run_dir: Path, status: str) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    s = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    st = m.get("stages", {})
    fusion, quant = st.get("fusion", {}), st.get("quantize", {})
    return {
        "table": row.table, "name": row.name, "label": row.label, "overrides": row.overrides,
        "run_dir": str(run_dir), "status": status,
        "test": {k: m["test"][k] for k in METRIC_KEYS}, "valid": m["valid"],
        "valid NDCG@10": m["valid"].get("NDCG@10"), "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
        "params": m.get("params"),
        "activated_layers_median": fusion.get("activated_layers_median"),
        "collision_rate_before": quant.get("collision_rate_before"),
        "collision_rate_after": quant.get("collision_rate_after"),
        "pretrain": {k: v for k, v in st.get("pretrain", {}).items() if k != "domains"},
        "init": st.get("finetune", {}).get("init"),
        "timing": m.get("timing"),
        "git_commit": s.get("git_commit"), "data_fingerprint": s.get("data", {}).get("fingerprint"),
        "run_started_utc": s.get("started_utc"), "run_device": s.get("device"),
    }


# ----------------------------------------------------------------------------------------- cost
def profile_run(run_dir: Path, quick: bool = False, latency_users: int = 4096, throughput_steps: int = 20,
                seed: int = 0) -> dict[str, Any]:
    """Table 6 for the model of ``run_dir`` on its own data (training rows, test histories)."""
    model, cfg = load_run_model(run_dir)
    device = pick_device(cfg.device)
    model.to(device)
    split = LeaveOneOutSplit(load_data(cfg).target, cfg.data.max_len)
    ft = cfg.finetune
    rng = np.random.default_rng(seed)
    rows = training_rows(split, model.max_len, ft.prefixes)
    rows = rows[(rows != 0).any(1)]
    rows = torch.from_numpy(np.ascontiguousarray(rows[rng.permutation(len(rows))[: 1 << 16]]))
    hist = torch.from_numpy(np.ascontiguousarray(split.history("test", pad=0, shift=1)))
    hist = hist[torch.from_numpy(rng.permutation(len(hist))[: min(len(hist), latency_users)])]
    mask_fn = lambda valid, g: masks.finetune_mask(valid, ft.mask_ratio, ft.last_prob, g)  # noqa: E731
    batch = rows[: ft.batch_size]
    train_flops = train_flops_per_sample(model, batch, mask_fn(batch != 0, torch.Generator().manual_seed(seed)))
    score_flops = score_flops_per_sample(model, hist[: cfg.eval.batch_size])
    latency = ranking_latency_per_user(model, hist, batch_size=cfg.eval.batch_size)
    steps = 2 if quick else throughput_steps
    throughput = training_throughput(model, rows, mask_fn, batch_size=ft.batch_size, steps=steps, lr=ft.lr, seed=seed)
    unbucketed = training_throughput(model, rows, mask_fn, batch_size=ft.batch_size, steps=steps, lr=ft.lr, seed=seed,
                                     bucket=False)
    return {"run_dir": str(run_dir), "params": parameter_count(model), "train_flops_per_sample": train_flops,
            "score_flops_per_sample": score_flops, "latency_ms_per_user": 1000 * latency,
            "train_samples_per_s": throughput, "train_samples_per_s_unbucketed": unbucketed, "latency_users": len(hist), "throughput_steps": steps,
            "batch_size": ft.batch_size, "eval_batch_size": cfg.eval.batch_size, "device": str(device),
            "torch_threads": torch.get_num_threads(), "num_items": model.num_items,
            "flops_note": "torch FlopCounterMode: matmul/attention/linear FLOPs; embedding look-ups count 0"}


# ----------------------------------------------------------------------------------------- report
def load_baselines(path: Path = BASELINES_JSON) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return [r for r in json.loads(path.read_text()).get("rows", []) if r.get("model") in BASELINE_NAMES]
    except (json.JSONDecodeError, AttributeError):
        log.warning("ignoring unreadable %s", path)
        return []


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return ""
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _metric_table(rows: list[dict[str, Any]], extra: list[str]) -> list[str]:
    cols = ["row", *METRIC_KEYS, "valid NDCG@10", "best epoch", *[HEADERS.get(e, e) for e in extra]]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    best = max((r for r in rows if r.get("valid NDCG@10") is not None), key=lambda r: r["valid NDCG@10"], default=None)
    for r in rows:
        name = r["label"] + (" (best valid)" if best is r and len(rows) > 1 else "")
        cells = [name, *[_f(r["test"].get(k)) for k in METRIC_KEYS], _f(r.get("valid NDCG@10")), _f(r.get("best_epoch"))]
        cells += [_f(r.get(e), 2) if e == "activated_layers_median" else _f(r.get(e)) for e in extra]
        cells += [""] * (len(cols) - len(cells))
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    by = lambda t: [r for r in rows if r["table"] == t]  # noqa: E731
    parts = []
    if "main" in result["tables"]:
        lines = _metric_table(by("main"), ["activated_layers_median", "collision_rate_before", "collision_rate_after"])
        ncols = len(METRIC_KEYS) + 6
        pad = lambda cells: "| " + " | ".join(cells + [""] * (ncols - len(cells))) + " |"  # noqa: E731
        lines.append(pad(["Q-BERT4Rec (paper)", *[_f(PAPER[k]) for k in METRIC_KEYS]]))
        for b in result["baselines"]:
            lines.append(pad([b["model"], *[_f(b.get(k)) for k in METRIC_KEYS], _f(b.get("valid NDCG@10")),
                              _f(b.get("best_epoch"))]))
        parts.append(f"### {TITLES['main']}\n\n" + "\n".join(lines)
                     + "\n\nCollision rates: share of items whose semantic ID collides, before / after reallocation.")
    for t in ("modalities", "pretraining", "fusion"):
        if t in result["tables"] and by(t):
            extra = ["activated_layers_median"] if t == "fusion" else []
            parts.append(f"### {TITLES[t]}\n\n" + "\n".join(_metric_table(by(t), extra)))
    c = result.get("cost")
    if c:
        header = "| model | params | train MFLOPs/sample | scoring MFLOPs/user | full-ranking ms/user | train samples/s |"
        ours = (f"| Q-BERT4Rec (ours) | {c['params']:,} | {c['train_flops_per_sample'] / 1e6:,.3f} | "
                f"{c['score_flops_per_sample'] / 1e6:,.3f} | {c['latency_ms_per_user']:.3f} | "
                f"{c['train_samples_per_s']:.0f} |")
        lines = [header, "|---|---|---|---|---|---|", ours]
        for b in result["baselines"]:
            lines.append(f"| {b['model']} (baselines.json) | {b.get('params', 0):,} | | | "
                         f"{_f(b.get('eval_ms_per_user'), 3)} | {_f(b.get('train_samples_per_s'), 0)} |")
        parts.append(f"### {TITLES['cost']}\n\n" + "\n".join(lines)
                     + f"\n\nMeasured on the main run's `model.pt` ({c['device']}, {c['torch_threads']} torch threads): "
                     f"FLOPs of one training step (batch {c['batch_size']}, forward + backward) and of one full-ranking "
                     f"forward, per sample ({c['flops_note']}); latency = scoring the whole catalogue + top-10 for "
                     f"{c['latency_users']} test users in batches of {c['eval_batch_size']}; throughput over "
                     f"{c['throughput_steps']} AdamW steps on the fine-tuning batches training uses (length-bucketed"
                     + (f"; without bucketing: {c['train_samples_per_s_unbucketed']:.0f} samples/s"
                        if c.get("train_samples_per_s_unbucketed") else "")
                     + "). Baseline rows: their own training/eval timings.")
    m = result["meta"]
    shared = [f"{r['label']} ({r['table']})" for r in rows if r["status"] == "shared"]
    tail = (f"Command: `{m['command']}`; seed {m['seed']}; {m['date']}; git {m['git_commit']}; data fingerprint "
            f"{m['data_fingerprint']}; machine: {m['machine']['processor']}, {m['machine']['cpu_count']} cores, "
            f"torch {m['machine']['torch']}, {m['machine']['torch_threads']} torch threads"
            + (f", GPU {m['machine']['gpu']}" if m['machine'].get('gpu') else "") + ".\n"
            "Every run picks its epoch by valid NDCG@10; nothing here is selected by test metrics. ")
    if shared:
        tail += "Rows equal to an earlier row's config reuse its run: " + ", ".join(shared) + "."
    if result.get("not_run"):
        tail += " Not run yet (their runs have not finished): " + ", ".join(result["not_run"]) + "."
    if m.get("quick"):
        tail = "**Smoke run (`--quick`, synthetic data): not a result.**\n\n" + tail
    return "\n\n".join(parts) + "\n\n" + tail + "\n"


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "instruments.yaml"))
    ap.add_argument("--runs-dir", required=True, help="one sub-directory per row; reused to resume")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {','.join(TABLES)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override of the base config, applied to every row")
    ap.add_argument("--seed", type=int, default=None, help="override the config's seed")
    ap.add_argument("--quick", action="store_true", help="smoke run: embedded tiny synthetic config (ignores --config)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--latency-users", type=int, default=4096, help="test users timed for the latency column")
    ap.add_argument("--dry-run", action="store_true", help="check the configs and print the plan; run nothing")
    ap.add_argument("--finished-only", action="store_true",
                    help="tabulate the rows whose runs have finished; run nothing (the others are listed as not run)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = [t for t in tables if t not in TABLES]
    if bad or not tables:
        print(f"error: --tables: unknown {bad} (choose from {', '.join(TABLES)})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    runs_dir = Path(args.runs_dir)
    try:
        base = quick_config() if args.quick else PipelineConfig.from_yaml(args.config)
        over = parse_overrides(args.overrides)
        if args.seed is not None:
            over["seed"] = args.seed
        if over:
            base = base.override(over)
        if not args.quick and base.data.source != "synthetic" and not base.data.source.startswith("synthetic:"):
            src = Path(base.data.source)
            if not src.is_absolute() and not src.exists() and (REPO / src).exists():
                base = base.override({"data.source": str(REPO / src)})  # config paths are relative to the repo
        rows = plan_rows(tables)
        if args.dry_run:
            for row, _, run_dir, status in plan_runs(base, rows, runs_dir):
                print(f"{row.table:12s} {row.label:18s} {status:8s} {run_dir}  {json.dumps(row.overrides)}")
            return 0
        records, not_run = run_rows(base, rows, runs_dir, args.finished_only)
        if not records:
            raise FileNotFoundError(f"no finished run under {runs_dir} for these tables")
        main_rec = records[0]
        if "cost" in tables and main_rec["name"] != "main":
            raise FileNotFoundError("the cost table is measured on the main row's run, which has not finished")
        cost = profile_run(Path(main_rec["run_dir"]), quick=args.quick, latency_users=args.latency_users,
                           seed=base.seed) if "cost" in tables else None
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out_json = Path(args.out_json) if args.out_json else (runs_dir / "qbert4rec.json" if args.quick else DEFAULT_JSON)
    out_md = Path(args.out_md) if args.out_md else (runs_dir / "qbert4rec.md" if args.quick else DEFAULT_MD)
    info = machine_info()
    result = {
        "tables": tables,
        "rows": records,
        "not_run": not_run,
        "cost": cost,
        "paper": {"Q-BERT4Rec": PAPER},
        "baselines": load_baselines(),
        "meta": {**benchmark_meta(sys.argv[0] if argv is None else "benchmarks/qbert4rec.py", argv, REPO),
                 "seed": base.seed, "quick": args.quick, "config": None if args.quick else str(args.config),
                 "base_config": base.to_dict(), "machine": info, "host": platform.node(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                 "data_source": base.data.source, "data_fingerprint": main_rec["data_fingerprint"]},
    }
    atomic_write_json(out_json, result)
    md = markdown(result)
    atomic_write_text(out_md, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
