"""Benchmark: SASRec and BERT4Rec on Amazon Instruments (MQL4GRec split), plus SASRec epoch speed.

    python benchmarks/baselines.py            # both models, then the speed comparison
    python benchmarks/baselines.py --quick    # 2 epochs each (smoke run)

Writes ``benchmarks/results/baselines.json`` and ``benchmarks/results/baselines.md``. The
test row of each model is its best epoch by valid NDCG@10 only. Skips (exit 0) when
``../shared/datasets/amazon-instruments`` is absent (a fresh clone).

Speed: one SASRec epoch over the 84,890 training targets of ``Instruments.train.inter``
(hidden 64, 2 layers, batch 256, max length 50, full-softmax CE, ``--threads`` torch threads)
is timed in three ways: our default (per-position targets, length-bucketed trimmed batches),
RecBole's prefix rows with bucketing, and RecBole's prefix rows in random batches (trimmed to
the longest row only). RecBole 1.2.1's own SASRec took 203 s for that epoch on the 2-core
development machine (see ../shared/datasets/README.md).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse on a shared, oversubscribed machine
# (measured 3-4x slower with 2 threads); passive waiting costs little on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.baselines import BaselineConfig, Trainer, build_model, run_baseline  # noqa: E402
from qbert.train.optim import build_optimizer  # noqa: E402
from qbert.data.readers import read_source  # noqa: E402
from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta, machine_info  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "amazon-instruments"
RECBOLE_EPOCH_S = 203.0
PAPER = {  # Q-BERT4Rec paper, Instruments, full ranking
    "SASRec (paper)": {"HR@10": 0.1233, "NDCG@10": 0.0746},
    "BERT4Rec (paper)": {"HR@10": 0.1081, "NDCG@10": 0.0739},
}
RECBOLE = {"HR@1": 0.0327, "HR@5": 0.0952, "HR@10": 0.1232, "NDCG@5": 0.0657, "NDCG@10": 0.0748,
           "valid NDCG@10": 0.0912, "best_epoch": 7, "epoch_s": 203.0}


def time_sasrec_epoch(dataset, mode: str, bucket: bool, seed: int, max_batches: int | None = None) -> dict:
    """Seconds for one SASRec training epoch (or ``max_batches`` of it, scaled) at the RecBole settings."""
    cfg = BaselineConfig(model="sasrec", train_mode=mode, bucket=bucket, seed=seed).resolved()
    torch.manual_seed(seed)
    split = LeaveOneOutSplit(dataset, max_len=cfg.max_len)
    trainer = Trainer(cfg, split, torch.device("cpu"))
    model = build_model(cfg, split.num_items)
    opt = build_optimizer(model, cfg.lr, kind="adam")
    model.train()
    n_batches = -(-len(trainer.inputs) // cfg.batch_size)
    targets = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(trainer.batches(0)):
        if max_batches is not None and i >= max_batches:
            break
        loss = trainer.step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        targets += trainer.rows_of(batch)
    secs = time.perf_counter() - t0
    done = min(n_batches, max_batches or n_batches)
    epoch_s = secs * trainer.num_targets / max(targets, 1)
    return {"train_mode": mode, "bucket": bucket, "rows": int(len(trainer.inputs)), "targets": trainer.num_targets,
            "batches_timed": done, "batches_per_epoch": n_batches, "seconds_timed": round(secs, 2),
            "epoch_s": round(epoch_s, 2), "targets_per_s": round(trainer.num_targets / epoch_s, 1),
            "speedup_vs_recbole": round(RECBOLE_EPOCH_S / epoch_s, 2), "extrapolated": done < n_batches}


def row_of(name: str, m: dict) -> dict:
    t = m["timing"]
    return {"model": name, **{k: m["test"][k] for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")},
            "valid NDCG@10": m["valid"]["NDCG@10"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
            "train_samples_per_s": round(t["train_samples_per_s"], 1), "epoch_time_s": round(t["epoch_time_s_mean"], 2),
            "eval_ms_per_user": round(1000 * t["eval_seconds_per_user"], 4), "params": m["params"],
            "threads": t["torch_threads"]}


def markdown(result: dict) -> str:
    cols = ["model", "HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "valid NDCG@10", "best epoch", "train samples/s",
            "epoch s", "eval ms/user", "params"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["model"]] + [f(r[k]) for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10",
                     "valid NDCG@10")] + [str(r["best_epoch"]), f"{r['train_samples_per_s']:.0f}",
                     f"{r['epoch_time_s']:.1f}", f"{r['eval_ms_per_user']:.3f}", f"{r['params']:,}"]) + " |")
    lines.append("| RecBole 1.2.1 SASRec (measured, README) | " + " | ".join(f(RECBOLE[k]) for k in ("HR@1", "HR@5", "HR@10",
                 "NDCG@5", "NDCG@10", "valid NDCG@10")) + f" | {RECBOLE['best_epoch']} | 418 | 203 | | |")
    for name, p in PAPER.items():
        lines.append(f"| {name} | | | {p['HR@10']:.4f} | | {p['NDCG@10']:.4f} | | | | | | |")
    out = "\n".join(lines)
    if result.get("speed"):
        out += (f"\n\nSASRec, one epoch over the {result['speed'][0]['targets']:,} training targets (hidden 64, 2 layers, "
                f"batch 256, max len 50, full-softmax CE, {result['threads']} torch threads):\n\n")
        out += "| rows | batching | epoch s | targets/s | vs RecBole 203 s |\n|---|---|---|---|---|\n"
        for s in result["speed"]:
            rows = "per-user sequences, every position a target" if s["train_mode"] == "positions" else \
                "RecBole prefix rows, one target each"
            batching = "length-bucketed, trimmed" if s["bucket"] else "random, trimmed to longest row"
            ext = " (extrapolated from %d of %d batches)" % (s["batches_timed"], s["batches_per_epoch"]) if s["extrapolated"] else ""
            out += f"| {rows} | {batching} | {s['epoch_s']:.1f}{ext} | {s['targets_per_s']:.0f} | {s['speedup_vs_recbole']:.1f}x |\n"
    m = result["meta"]
    out += (f"\nCommand: `{m['command']}`; seed {m['seed']}; {m['date']}; git {m['git_commit']}; "
            f"machine: {m['machine']['processor']}, {m['machine']['cpu_count']} cores, torch {m['machine']['torch']}, "
            f"{result['threads']} torch threads, OMP_WAIT_POLICY={m['omp_wait_policy']}.\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--models", default="sasrec,bert4rec")
    ap.add_argument("--epochs", type=int, default=30, help="epoch cap of SASRec")
    ap.add_argument("--bert-epochs", type=int, default=30, help="epoch cap of BERT4Rec")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", choices=("all", "default", "none"), default="all",
                    help="SASRec epoch timings: all three batchings, only ours, or none")
    ap.add_argument("--speed-max-batches", type=int, default=40,
                    help="time only this many batches of the unbucketed variant and extrapolate (0 = all)")
    ap.add_argument("--quick", action="store_true", help="2 epochs per model, speed on 20 batches (smoke run)")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "baselines.json"))
    ap.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "baselines.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    data = Path(args.data)
    if not data.is_dir():
        print(f"SKIP: {data} not present (a fresh clone lacks ../shared/datasets); nothing benchmarked")
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs = args.bert_epochs = 2
        args.speed_max_batches = 20
    dataset = read_source(data)
    runs = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="qbert-bench-"))
    rows, raw = [], {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = BaselineConfig(model=model, epochs=args.bert_epochs if model == "bert4rec" else args.epochs,
                             patience=args.patience, seed=args.seed, num_threads=args.threads, device="cpu",
                             progress=False)
        t0 = time.perf_counter()
        m = run_baseline(cfg, dataset, runs / model, data_source=str(data.resolve()))
        m["wall_seconds"] = time.perf_counter() - t0
        raw[model] = {k: v for k, v in m.items()}
        rows.append(row_of({"sasrec": "SASRec (ours)", "bert4rec": "BERT4Rec (ours)"}[model], m))
        print(json.dumps(rows[-1]), flush=True)

    speed = []
    if args.speed != "none":
        variants = [("windows", True)] + ([("positions", True), ("windows", False)] if args.speed == "all" else [])
        for mode, bucket in variants:
            limit = (args.speed_max_batches or None) if (not bucket or args.quick) else None
            speed.append(time_sasrec_epoch(dataset, mode, bucket, args.seed, limit))
            print(json.dumps(speed[-1]), flush=True)

    info = machine_info()
    result = {
        "rows": rows, "speed": speed, "threads": args.threads,
        "reference": {"paper": PAPER, "recbole_sasrec_measured": RECBOLE},
        "meta": {**benchmark_meta(sys.argv[0], argv, REPO), "seed": args.seed, "machine": info, "host": platform.node(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                 "data": str(data), "data_fingerprint": dataset.fingerprint()},
        "runs": {k: {kk: v for kk, v in m.items() if kk != "machine"} for k, m in raw.items()},
    }
    atomic_write_json(args.out_json, result)
    atomic_write_text(args.out_md, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
