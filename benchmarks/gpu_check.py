"""GPU check of every stage (#22): each stage briefly on one device, against a reference device.

    python benchmarks/gpu_check.py                         # cuda against cpu (a lent GPU, < 2 min)
    python benchmarks/gpu_check.py --device cpu --quick    # the same check on CPU alone (tests)

Runs the synthetic pipeline three times, one stage at a time: on ``--reference-device`` in fp32,
on ``--device`` in fp32, and on ``--device`` with stage 3 in ``--precision`` (bf16 autocast). Per
stage it reports samples per second (items for fusion and the RQ-VAE, sequences for stage 3) and
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's resident high-water mark), and the
fp32 run's agreement with the reference: the relative difference of each stage's first-epoch
loss (the same data, batches and initial weights, so only kernels differ; later epochs drift
apart as rounding differences compound), the share of items with the same semantic ID, and
the difference of valid NDCG@10. Writes ``benchmarks/results/gpu_check_<device>.{json,md}``
(``--quick``: under ``--out-dir``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from qbert.pipeline.stages import STAGES  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

CONFIG = {  # synthetic data at about a quarter of Instruments, a few epochs per stage; dropout off, so
    # the reference and the device draw no different random masks and only their kernels differ
    "data.synthetic.num_users": 4000, "data.synthetic.num_items": 1500, "data.synthetic.num_clusters": 50,
    "fusion.dropout": 0.0, "model.dropout": 0.0,
    "fusion.dim": 128, "fusion.epochs": 2, "fusion.batch_size": 512, "quantize.epochs": 5,
    "quantize.codebook_size": 64, "model.hidden": 256, "model.layers": 4, "model.heads": 4,
    "pretrain.epochs": 2, "pretrain.batch_size": 512, "finetune.epochs": 2, "finetune.batch_size": 256,
    "finetune.patience": 0, "eval.test": False, "plots": False,
}
QUICK = {"data.synthetic.num_users": 300, "data.synthetic.num_items": 120, "data.synthetic.num_clusters": 8,
         "fusion.dim": 32, "quantize.codebook_size": 16, "model.hidden": 32, "model.layers": 2, "model.heads": 2,
         "pretrain.batch_size": 64, "finetune.batch_size": 64}
SAMPLES = {"fusion": "num_items", "quantize": "num_items"}  # per epoch; stage 3 reports its own rate


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_stages(cfg: PipelineConfig, out: Path, num_items: int) -> dict[str, dict[str, Any]]:
    """Each stage alone in ``out``: its report plus samples/s and peak memory."""
    rows = {}
    for stage in STAGES:
        _peak_reset(cfg.device)
        rep = run_pipeline(cfg, out, stages=[stage])[stage]
        hist = rep.get("history", [])
        times = [h["epoch_time_s"] for h in hist][1:] or [h["epoch_time_s"] for h in hist]
        # stage 3's rate is its loop's (over every epoch, the first included); fusion's and the RQ-VAE's
        # leave the first epoch out
        rate = rep.get("samples_per_second") if stage not in SAMPLES else num_items / float(np.mean(times))
        rows[stage] = {"samples_per_second": rate, "peak_mib": _peak_mib(cfg.device),
                       "first_loss": hist[0]["loss"] if hist else None,
                       "valid_ndcg10": rep.get("valid", {}).get("NDCG@10")}
    return rows


def compare(ref: dict, run: dict, ref_dir: Path, run_dir: Path) -> dict[str, Any]:
    from qbert.quantize.semantic_ids import read_semantic_ids

    loss = {s: abs(run[s]["first_loss"] - ref[s]["first_loss"]) / abs(ref[s]["first_loss"])
            for s in STAGES if ref[s]["first_loss"] is not None}
    a = read_semantic_ids(ref_dir / "semantic_ids.parquet")[1]
    b = read_semantic_ids(run_dir / "semantic_ids.parquet")[1]
    return {"first_loss_rel_diff": loss, "same_semantic_id": float((a == b).all(1).mean()),
            "valid_ndcg10_diff": run["finetune"]["valid_ndcg10"] - ref["finetune"]["valid_ndcg10"]}


def markdown(result: dict[str, Any]) -> str:
    dev, ref, prec = result["device"], result["reference_device"], result["precision"]
    lines = [f"| stage | {ref} fp32: samples/s | {dev} fp32: samples/s | {dev} {prec}: samples/s | "
             f"{dev} fp32: peak MiB | {dev} {prec}: peak MiB | first-epoch loss, rel. diff. to {ref} |",
             "|---|---|---|---|---|---|---|"]
    eq = result["equivalence"]
    for s in STAGES:
        r, f, p = (result[k][s] for k in ("reference", "fp32", "low_precision"))
        d = eq["first_loss_rel_diff"].get(s)
        lines.append(f"| {s} | {r['samples_per_second']:.0f} | {f['samples_per_second']:.0f} | "
                     f"{p['samples_per_second']:.0f} | {f['peak_mib']:.0f} | {p['peak_mib']:.0f} | "
                     + (f"{d:.1e}" if d is not None else "-") + " |")
    m = result["meta"]
    lines += ["", f"Same semantic ID as on {ref}: {eq['same_semantic_id']:.1%} of items; valid NDCG@10 {dev} fp32 "
              f"minus {ref}: {eq['valid_ndcg10_diff']:+.4f}; {dev} {prec}: "
              f"{result['low_precision']['finetune']['valid_ndcg10']:.4f} against "
              f"{result['fp32']['finetune']['valid_ndcg10']:.4f} in fp32.",
              "", f"Command: `{m['command']}`; seed {m['seed']}; git {m['git_commit']}; {m['date']}; "
              f"device: {result['device_name']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference-device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--quick", action="store_true", help="tiny data (tests)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.quick and args.out_dir is None:
        print("error: --quick writes under --out-dir: name one", file=sys.stderr)
        return 2
    cfg = PipelineConfig.from_yaml(REPO / "configs" / "synthetic.yaml")
    cfg = cfg.override({**CONFIG, **(QUICK if args.quick else {})})
    fp32 = {"pretrain.precision": "fp32", "finetune.precision": "fp32"}
    low = {"pretrain.precision": args.precision, "finetune.precision": args.precision}
    n = cfg.data.synthetic.num_items
    with tempfile.TemporaryDirectory(prefix="qbert-gpu-check-") as tmp:
        work = Path(tmp)
        ref = run_stages(cfg.override({**fp32, "device": args.reference_device}), work / "ref", n)
        full = run_stages(cfg.override({**fp32, "device": args.device}), work / "fp32", n)
        lowp = run_stages(cfg.override({**low, "device": args.device}), work / "low", n)
        eq = compare(ref, full, work / "ref", work / "fp32")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"device": args.device, "device_name": name, "reference_device": args.reference_device,
              "precision": args.precision, "reference": ref, "fp32": full, "low_precision": lowp,
              "equivalence": eq, "meta": benchmark_meta("benchmarks/gpu_check.py", argv, REPO, seed=cfg.seed)}
    out = args.out_dir if args.quick else REPO / "benchmarks" / "results"
    stem = f"gpu_check_{args.device.split(':')[0]}"
    atomic_write_json(out / f"{stem}.json", result)
    atomic_write_text(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
