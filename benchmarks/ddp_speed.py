"""Benchmark: the speed-up of the sharded stages on N Ray Train workers (#22), on this machine.

    python benchmarks/ddp_speed.py --workers 1 2 --out-json benchmarks/results/ddp_speed.json \\
        --out-md benchmarks/results/ddp_speed.md

Runs the synthetic pipeline once (the inputs), then fusion, pretraining and fine-tuning each
alone on 1, 2, ... Ray Train workers (1 CPU and one torch thread per worker, gloo) at the same
global batch, in copies of that run, and reports the mean training seconds per epoch (the first
epoch left out: it pays for warm-up) with the speed-up over 1 worker. The results are equal by
construction (tests/test_ddp_equivalence.py); this measures only time. On a machine with C
cores, N <= C workers is the meaningful range; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

STAGES = ("fusion", "quantize", "pretrain", "finetune")
CONFIG = {  # synthetic data at about Instruments' size (24.8K users, 6.3K items), a few epochs per stage
    "data.synthetic.num_users": 24000, "data.synthetic.num_items": 6000, "data.synthetic.num_clusters": 120,
    "fusion.dim": 128, "fusion.epochs": 3, "fusion.batch_size": 1024, "quantize.epochs": 10,
    "quantize.codebook_size": 64, "model.hidden": 128,
    "pretrain.epochs": 3, "pretrain.batch_size": 512, "pretrain.precision": "fp32",
    "finetune.epochs": 3, "finetune.batch_size": 256, "finetune.patience": 0, "finetune.precision": "fp32",
    "plots": False,
}


def epoch_seconds(report: dict) -> float:
    times = [h["epoch_time_s"] for h in report["history"]]
    return statistics.mean(times[1:] if len(times) > 1 else times)


def markdown(rows: list[dict], meta: dict) -> str:
    workers = sorted({r["workers"] for r in rows})
    head = "| stage | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}: s/epoch" for w in workers) + " | speed-up |"
    lines = [head, "|---" * (len(workers) + 2) + "|"]
    for stage in STAGES:
        by = {r["workers"]: r["epoch_seconds"] for r in rows if r["stage"] == stage}
        if not by:
            continue
        speed = by[workers[0]] / by[workers[-1]] if workers[-1] in by else float("nan")
        lines.append(f"| {stage} | " + " | ".join(f"{by[w]:.2f}" for w in workers) + f" | {speed:.2f}x |")
    m = meta["machine"]
    lines += ["", f"Command: `{meta['command']}`; seed {meta['seed']}; git {meta['git_commit']}; {meta['date']}; "
              f"{m.get('cpu_count')} CPUs ({m.get('cpu', m.get('processor', ''))}); 1 CPU and 1 torch thread per "
              "worker; mean training seconds per epoch without the first epoch; speed-up = 1 worker / most workers."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "ddp_speed.json"))
    p.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "ddp_speed.md"))
    args = p.parse_args(argv)
    import ray

    from qbert.platform.ray_train import RayExecutor, RayScalingConfig

    cfg = PipelineConfig.from_yaml(REPO / "configs" / "synthetic.yaml").override(CONFIG)
    work = Path(tempfile.mkdtemp(prefix="qbert-ddp-speed-"))
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        run_pipeline(cfg, work / "inputs")  # the inputs every timed stage reads
        for stage in args.stages:
            for w in args.workers:
                out = work / f"{stage}-{w}"
                shutil.copytree(work / "inputs", out, ignore=shutil.ignore_patterns("checkpoints"))
                scaling = RayScalingConfig(num_workers=w, use_gpu=False, resources_per_worker={"CPU": 1})
                rep = run_pipeline(cfg, out, stages=[stage], executor=RayExecutor(scaling, name=f"{stage}-{w}"))[stage]
                rows.append({"stage": stage, "workers": w, "epoch_seconds": round(epoch_seconds(rep), 3),
                             "epochs": len(rep["history"])})
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    meta = benchmark_meta("benchmarks/ddp_speed.py", argv, REPO, seed=cfg.seed, config=CONFIG)
    atomic_write_json(args.out_json, {"rows": rows, "meta": meta})
    atomic_write_text(args.out_md, markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
