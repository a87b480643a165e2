"""Benchmark: the dynamic-fusion gate's depth histogram (paper Fig. 7) per fusion setting.

    python benchmarks/fusion_depth.py --config configs/instruments.yaml \\
        --grid fusion.id_init_std=1.0,fusion.ponder_weight=0.01 --grid fusion.ponder_weight=0.1

Runs stage 1 alone (``train_fusion`` on the features the pipeline builds from the config) once
per ``--grid`` (comma-separated dotted overrides) and writes ``benchmarks/results/fusion_depth.json``
and ``.md``: items exiting after each layer, the median, the modality-vs-fused MSE and the final
InfoNCE terms. No validation split is involved: this measures the gate, not recommendation quality.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.config import parse_overrides  # noqa: E402
from qbert.fusion.train import train_fusion  # noqa: E402
from qbert.pipeline import PipelineConfig, load_data, stage_features  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402


def run_setting(base: PipelineConfig, overrides: dict) -> dict:
    cfg = base.override(overrides) if overrides else base
    data = load_data(cfg)
    t0 = time.perf_counter()
    res = train_fusion(stage_features(cfg, data), cfg.fusion, num_items=data.all_items.num_items)
    rep = res.report
    return {"overrides": overrides, "id_init_std": cfg.fusion.id_init_std, "ponder_weight": cfg.fusion.ponder_weight,
            "activated_layer_counts": rep["activated_layer_counts"], "median": rep["activated_layers_median"],
            "mean": rep["activated_layers_mean"], "modality_mse": rep["modality_mse"],
            "final_losses": rep.get("final_losses", {}), "seconds": round(time.perf_counter() - t0, 1)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| id_init_std | ponder_weight | items exiting after layer 1 / 2 / ... | median | fused/text InfoNCE |",
             "|---|---|---|---|---|"]
    for r in rows:
        nce = r["final_losses"].get("nce_fused_text")
        lines.append(f"| {r['id_init_std']:g} | {r['ponder_weight']:g} | "
                     f"{' / '.join(f'{c:,}' for c in r['activated_layer_counts'])} | {r['median']:g} | "
                     + (f"{nce:.3f}" if nce is not None else "—") + " |")
    lines += ["", f"Command: `{meta['command']}`; seed {meta['seed']}; git {meta['git_commit']}; {meta['date']}; "
              f"{meta['machine'].get('cpu_count')} CPUs, {meta['threads']} torch thread(s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "instruments.yaml"))
    ap.add_argument("--grid", action="append", default=[], metavar="K=V,K=V", help="one setting (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "fusion_depth.json"))
    ap.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "fusion_depth.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = PipelineConfig.from_yaml(args.config)
    settings = [parse_overrides([kv for kv in g.split(",") if kv]) for g in args.grid] or [{}]
    rows = []
    for ov in settings:
        rows.append(run_setting(base, ov))
        print(rows[-1], flush=True)
    meta = benchmark_meta(sys.argv[0], argv, REPO, seed=base.seed, threads=args.threads)
    atomic_write_json(args.out_json, {"rows": rows, "meta": meta})
    atomic_write_text(args.out_md, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
