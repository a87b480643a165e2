"""Benchmark: stage-3 speed side by side with RecBole's own BERT4Rec, in one run.

    python benchmarks/speed.py --recbole-python /path/to/recbole-venv/bin/python
    python benchmarks/speed.py --quick                  # few batches, no RecBole (smoke run)
    python benchmarks/speed.py --recbole-python ... --pipeline-run runs/instruments   # + its stage times

On Amazon Instruments' 84,890 training rows (every prefix of each user's training part, as
``Instruments.train.inter``), for the paper's size (hidden 256, 4 layers, 4 heads, batch 256)
and the baseline size (hidden 64, 2 layers, 2 heads): our Q-BERT4Rec fine-tuning and
pretraining epochs at each precision, our full ranking of every valid user (ms/user, both
protocols from one pass), our batch top-10 recommendation for every user (users/s, what
``qbert recommend`` runs), and RecBole 1.2.1's BERT4Rec training epoch and full ranking
(``benchmarks/peers/recbole_timing.py``, run with RecBole's own virtualenv, never a qbert
dependency). Measurements are interleaved and repeated (``--repeats``) and the median kept,
because these machines are shared: the ratio of two interleaved times is what to read.

Epochs are timed on a sample of batches spread over the shuffled epoch and scaled to the whole
epoch (ours: every ``k``-th batch of the length-bucketed order, each trimmed to its own longest
row, so the sample has the epoch's mix of lengths; RecBole pads every batch to 50, so any batch
costs the same). An untimed pass over other batches of the epoch (every ``k``-th, offset by one)
comes first: kernels set up for shapes every epoch repeats are not counted, those for shapes the
timed batches bring anew are, as in a real epoch.

Writes ``benchmarks/results/speed.json`` (``rows``: one per system, model, size and precision;
``pipeline``: wall seconds per stage of finished ``qbert pipeline`` runs) and ``speed.md``.
Skips (exit 0) when ``../shared/datasets/amazon-instruments`` is absent.
"""

from __future__ import annotations

# OpenMP's default (spinning) wait policy: on a quiet machine it is what a user gets, and PASSIVE made
# a fine-tuning epoch 74 s instead of 60 s here. On an oversubscribed machine, where spinning threads
# collapse, run with OMP_WAIT_POLICY=PASSIVE (RecBole's subprocess inherits it: the same for both)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.data.readers import read_source  # noqa: E402
from qbert.data.split import LeaveOneOutSplit, windows  # noqa: E402
from qbert.eval.evaluator import top_k  # noqa: E402
from qbert.seqrec import masks  # noqa: E402
from qbert.seqrec.stage import (FinetuneConfig, PretrainConfig, SeqRecConfig, build_model,  # noqa: E402
                                masked_batches, masked_step, pretrain_mask_fn, split_ranks, training_rows)
from qbert.train.loop import LoopConfig, fit  # noqa: E402
from qbert.train.optim import autocast, build_optimizer, resolve_precision  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "amazon-instruments"
SIZES = {"paper": {"hidden": 256, "layers": 4, "heads": 4}, "baseline": {"hidden": 64, "layers": 2, "heads": 2}}
MAX_LEN = 50


def instruments_codes(ds) -> np.ndarray:
    """Semantic IDs for timing: the shipped LLaMA code tuples (4 x 256), so no stage 1-2 run is
    needed; a learned table has the same shape and the same cost."""
    multi_hot = np.asarray(ds.feature("lemb_codes")).reshape(ds.num_items, 4, 256)
    return multi_hot.argmax(-1)


def time_epoch(model, rows: np.ndarray, batch_size: int, mask_fn, precision: str, every: int, lr: float,
               device: torch.device) -> dict:
    """Seconds of one training epoch through :func:`qbert.train.fit`, from every ``every``-th batch."""
    all_batches = list(masked_batches(rows, batch_size, mask_fn, seed=0, device=device)(0))
    sample, warm = all_batches[::every], all_batches[1::every]
    loop = LoopConfig(epochs=1, patience=0, monitor="none", progress=False, precision=precision)
    opt = build_optimizer(model, lr)
    fit(model, opt, lambda epoch: iter(warm), masked_step, loop)  # untimed: kernel set-up on other batches
    res = fit(model, opt, lambda epoch: iter(sample), masked_step, loop)
    per_batch = res.train_seconds / len(sample)
    return {"train_epoch_s": per_batch * len(all_batches), "train_batches": len(all_batches),
            "timed_batches": len(sample), "train_rows_per_s": len(rows) / (per_batch * len(all_batches))}


def time_qbert(split: LeaveOneOutSplit, codes: np.ndarray, size: dict, precision: str, every: int,
               pretrain_rows: np.ndarray, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(SeqRecConfig(**size), codes, 256, MAX_LEN).to(device)
    ft = FinetuneConfig(mask_ratio=0.2)
    rows = training_rows(split, MAX_LEN, True)
    finetune_mask = lambda valid, g: masks.finetune_mask(valid, ft.mask_ratio, ft.last_prob, g)  # noqa: E731
    out = time_epoch(model, rows, ft.batch_size, finetune_mask, precision, every, 1e-3, device)
    pre = PretrainConfig()
    p = time_epoch(model, pretrain_rows, pre.batch_size, pretrain_mask_fn(pre), precision, every, pre.lr, device)
    model.eval()
    split_ranks(model, split, "valid", 1024, device, ("kept", "excluded"), precision)  # untimed warm-up
    _sync(device)
    t0 = time.perf_counter()
    split_ranks(model, split, "valid", 1024, device, ("kept", "excluded"), precision)
    _sync(device)
    eval_s = time.perf_counter() - t0
    # batch top-10 recommendation for every user after their whole sequence (qbert recommend's pass)
    ds = split.dataset
    full = windows(ds.seq_items, ds.seq_offsets[:-1], ds.seq_offsets[1:], MAX_LEN, pad=0, shift=1)
    t0 = time.perf_counter()
    with autocast(device, precision):
        top_k(model.score, full, model.num_items, 10, 1024, history_pad=0, history_shift=1, device=device)
    _sync(device)
    out["recommend_users_per_s"] = ds.num_users / (time.perf_counter() - t0)
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {**out, "pretrain_epoch_s": p["train_epoch_s"], "eval_ms_per_user": eval_s / split.num_users * 1e3,
            "eval_users": split.num_users, "params": sum(x.numel() for x in model.parameters())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_recbole(python: str, data: Path, size: dict, threads: int, batches: int, eval_users: int) -> dict:
    """RecBole's BERT4Rec (its defaults but the size; mask ratio 0.2) in its own virtualenv."""
    with tempfile.TemporaryDirectory() as tmp:  # RecBole wants DATA_PATH/<name>/<name>.{train,valid,test}.inter
        folder = Path(tmp) / "Instruments"
        folder.mkdir()
        for part in ("train", "valid", "test"):
            (folder / f"Instruments.{part}.inter").symlink_to((data / f"Instruments.{part}.inter").resolve())
        args = {"model": "BERT4Rec", "data_path": tmp, "dataset": "Instruments", "threads": threads,
                "train_batches": batches, "eval_users": eval_users,
                "config": {"hidden_size": size["hidden"], "n_layers": size["layers"], "n_heads": size["heads"],
                           "inner_size": 4 * size["hidden"], "mask_ratio": 0.2, "checkpoint_dir": tmp}}
        proc = subprocess.run([python, str(REPO / "benchmarks" / "peers" / "recbole_timing.py"), json.dumps(args)],
                              capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"RecBole timing failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline_row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = summary["config"]
    return {"run": str(run), "config": summary.get("config_file", str(run / "config.yaml")),
            "threads": summary["machine"].get("torch_threads"), "wall_s": summary["timings"]["total"],
            "stages": {k: v for k, v in summary["timings"].items() if k != "total"},
            "finetune_epochs": metrics.get("epochs_run"), "pretrain_epochs": cfg["pretrain"]["epochs"],
            "precision": summary.get("precision", {}).get("finetune", cfg["finetune"].get("precision", "fp32")),
            "valid": metrics["valid"],
            "git_commit": summary["git_commit"], "started_utc": summary.get("started_utc")}


def median_rows(samples: list[dict]) -> dict:
    out = dict(samples[0])
    for k, v in samples[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(s[k] for s in samples)
    out["repeats"] = len(samples)
    return out


def render(result: dict) -> str:
    lines = ["| system | model | size (hidden/layers/heads) | precision | threads | train epoch s | pretrain epoch s "
             "| eval ms/user | top-10 users/s | ratio to RecBole (train / eval) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peer = {r["hidden"]: r for r in result["rows"] if r["system"] == "recbole"}
    for r in result["rows"]:
        p = peer.get(r["hidden"])
        ratio = "" if r["system"] == "recbole" or p is None else \
            f"{p['train_epoch_s'] / r['train_epoch_s']:.1f}x / {p['eval_ms_per_user'] / r['eval_ms_per_user']:.1f}x"
        pre = f"{r['pretrain_epoch_s']:.1f}" if r.get("pretrain_epoch_s") else ""
        users_s = f"{r['recommend_users_per_s']:.0f}" if "recommend_users_per_s" in r else ""
        lines.append(f"| {r['system']} | {r['model']} | {r['hidden']}/{r['layers']}/{r['heads']} | {r['precision']} | "
                     f"{r['threads']} | {r['train_epoch_s']:.1f} | {pre} | {r['eval_ms_per_user']:.3f} | "
                     f"{users_s} | {ratio} |")
    if result.get("pipeline"):
        lines += ["", "| pipeline run | threads | precision | fine-tuning epochs | wall s | "
                  + " | ".join(f"{s} s" for s in ("fusion", "quantize", "pretrain", "finetune")) + " |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in result["pipeline"]:
            st = " | ".join(f"{p['stages'].get(s, 0):.0f}" for s in ("fusion", "quantize", "pretrain", "finetune"))
            lines.append(f"| {p['run']} | {p['threads']} | {p['precision']} | {p['finetune_epochs']} | "
                         f"{p['wall_s']:.0f} | {st} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=8, help="time every k-th batch of our epochs")
    ap.add_argument("--recbole-python", default=None, help="python of a virtualenv with recbole==1.2.1")
    ap.add_argument("--recbole-batches", type=int, default=6)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--sizes", default="paper,baseline")
    ap.add_argument("--pipeline-run", action="append", default=[], type=Path, help="a finished run to report")
    ap.add_argument("--quick", action="store_true", help="one repeat, few batches, no RecBole")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (needs ../shared/datasets)")
        return 0
    if args.quick:
        args.repeats, args.every, args.recbole_python = 1, 40, None
    torch.set_num_threads(args.threads)
    ds = read_source(str(args.data), with_codes=True)
    split = LeaveOneOutSplit(ds, MAX_LEN)
    codes = instruments_codes(ds)
    pretrain_rows = split.train_sequences(pad=0, shift=1)
    device = torch.device(args.device)
    precisions = [resolve_precision(p, device) for p in args.precisions.split(",")]
    samples: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):  # interleaved: every system and size once per repeat
        for name in args.sizes.split(","):
            size = SIZES[name]
            for precision in dict.fromkeys(precisions):
                key = ("qbert", "qbert4rec", name, precision)
                samples.setdefault(key, []).append(time_qbert(split, codes, size, precision, args.every, pretrain_rows,
                                                              device))
                print(json.dumps({"repeat": rep, "key": key, **samples[key][-1]}), flush=True)
            if args.recbole_python:
                key = ("recbole", "bert4rec", name, "fp32")
                samples.setdefault(key, []).append(time_recbole(args.recbole_python, args.data, size, args.threads,
                                                                args.recbole_batches, 2048))
                print(json.dumps({"repeat": rep, "key": key, **samples[key][-1]}), flush=True)
    rows = [{"system": system, "model": model, "dataset": "instruments", **SIZES[name], "batch": 256,
             "threads": args.threads, "device": args.device if system == "qbert" else "cpu", "precision": precision,
             **median_rows(s)}
            for (system, model, name, precision), s in samples.items()]
    result = {"rows": rows, "pipeline": [pipeline_row(r) for r in args.pipeline_run],
              **benchmark_meta("benchmarks/speed.py", argv, REPO, threads=args.threads)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "speed" if device.type == "cpu" else f"speed_{device.type}"
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
