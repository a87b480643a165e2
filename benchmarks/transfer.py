"""Benchmark: cross-domain transfer through the shared semantic-ID vocabulary (paper Table 4, extended).

    python benchmarks/transfer.py --config configs/instruments-tuned.yaml \
        --others ../shared/datasets/amazon-arts ../shared/datasets/amazon-games --runs-dir runs/transfer
    python benchmarks/transfer.py --quick --runs-dir /tmp/transfer   # embedded synthetic data, few epochs

Fine-tunes the paper's model on the target of ``--config`` after four kinds of pretraining:

- ``none``: no pretraining (``pretrain.strategy: none``);
- ``target``: multi-mask pretraining on the target's training part (the config as is; Table 4);
- ``other-domains``: pretraining on the ``--others`` datasets only (``pretrain_sources``,
  ``pretrain.include_target: false``): the target's sequences are never seen before fine-tuning;
- ``both``: pretraining on the others and the target's training part.

The first two write the target's items alone in codes (stages 1-2 over its catalogue); the last two
run stages 1-2 over the union of the catalogues, so every domain's items share one set of code
tokens, and ``both`` reuses the fusion and semantic IDs of ``other-domains`` (the same vocabulary;
only the pretraining data differs). Each row names its vocabulary.

The settings are chosen on valid elsewhere; each run scores test once. Runs live in
``RUNS_DIR/<target>/<pretraining>/seed<S>/``; a finished run of the same settings is read, not
re-run (so the command resumes). Writes ``benchmarks/results/transfer.{json,md}``
(``--quick``: under ``RUNS_DIR``), replacing the rows of the same target, pretraining and model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.pipeline import PipelineConfig, quickstart_config, run_pipeline  # noqa: E402
from qbert.pipeline.runs import finished_test_run  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text, locked  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

log = logging.getLogger("bench.transfer")
DEFAULT_OUT = REPO / "benchmarks" / "results"
PRETRAINING = ("none", "target", "other-domains", "both")
VALID_METRICS = ("HR@10", "NDCG@10")
TEST_METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
QUICK_OTHERS = ["synthetic:seed=7,users=400,items=180,clusters=10,max_len=15",
                "synthetic:seed=8,users=400,items=160,clusters=10,max_len=15"]


def setup(base: PipelineConfig, pretraining: str, others: list[str], vocab_run: Path | None) -> PipelineConfig:
    """The config of one row. ``vocab_run``: a finished ``other-domains`` run whose fusion and
    semantic IDs ``both`` reuses (None: compute them)."""
    if pretraining == "none":
        return base.override({"pretrain.strategy": "none"})
    if pretraining == "target":
        return base
    cfg = base.override({"pretrain_sources": list(others), "pretrain.include_target": pretraining == "both"})
    if pretraining == "both" and vocab_run is not None:
        cfg = cfg.override({"reuse.from_run": str(vocab_run), "reuse.stages": ["fusion", "quantize"]})
    return cfg


def stages_done(run: Path, stages: tuple[str, ...] = ("fusion", "quantize")) -> bool:
    """Whether ``run`` has written the reports of ``stages`` (so a later run can reuse them)."""
    return all((run / f"{s}_report.json").is_file() for s in stages)


def label(source: str) -> str:
    """A short name of a dataset source: ``amazon-arts`` -> ``arts``, a synthetic spec's first field."""
    return source.split(",")[0] if source.startswith("synthetic") else Path(source).name.removeprefix("amazon-")


def pretrained_on(pretraining: str, cfg: PipelineConfig, target: str) -> list[str]:
    """The domains whose sequences the encoder saw before fine-tuning."""
    if pretraining == "none":
        return []
    sources = [label(s) for s in cfg.pretrain_sources]
    return ([target] if not sources or cfg.pretrain.include_target else []) + sources


def row(target: str, pretraining: str, cfg: PipelineConfig, seed_metrics: list[tuple[int, Path, dict]]) -> dict:
    """One transfer.json row: means over seeds (one seed: that run's numbers)."""
    def mean(part: str, keys: tuple[str, ...]) -> dict[str, float]:
        return {k: sum(m[part][k] for _, _, m in seed_metrics) / len(seed_metrics) for k in keys}

    return {"target": target, "pretraining": pretraining, "model": "qbert4rec",
            "vocabulary": [target, *map(label, cfg.pretrain_sources)],
            "pretraining_data": pretrained_on(pretraining, cfg, target),
            "valid": mean("valid", VALID_METRICS), "test": mean("test", TEST_METRICS),
            "seeds": [s for s, _, _ in seed_metrics], "runs": [str(r) for _, r, _ in seed_metrics],
            "per_seed": [{"seed": s, "valid": {k: m["valid"][k] for k in VALID_METRICS},
                          "test": {k: m["test"][k] for k in TEST_METRICS},
                          "best_epoch": m.get("best_epoch"), "seconds": _timings(r)} for s, r, m in seed_metrics]}


def _timings(run: Path) -> dict[str, float]:
    """Seconds per stage of a finished run (its summary.json)."""
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("timings", {}) if summary.is_file() else {}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | pretraining | pretrained on | vocabulary (catalogues in stages 1-2) | seeds | valid HR@10 | "
             "valid NDCG@10 | test HR@10 | test NDCG@10 |", "|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(PRETRAINING)}
    for r in sorted(rows, key=lambda r: (r["target"], order.get(r["pretraining"], 9))):
        on = ", ".join(r["pretraining_data"]) or "-"
        lines.append(f"| {r['target']} | {r['pretraining']} | {on} | {', '.join(r['vocabulary'])} | "
                     f"{len(r['seeds'])} | {r['valid']['HR@10']:.4f} | {r['valid']['NDCG@10']:.4f} | "
                     f"{r['test']['HR@10']:.4f} | {r['test']['NDCG@10']:.4f} |")
    return "\n".join(lines) + "\n"


def merge(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    key = lambda r: (r["target"], r["pretraining"], r["model"])  # noqa: E731
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {key(r) for r in new}
    return [r for r in rows if key(r) not in keys] + new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="the target's pipeline config (default: synthetic)")
    ap.add_argument("--others", nargs="+", default=None, help="the other domains' dataset sources")
    ap.add_argument("--pretraining", nargs="+", choices=PRETRAINING, default=list(PRETRAINING))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--target-name", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="synthetic data, few epochs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = PipelineConfig.from_yaml(args.config) if args.config else quickstart_config()
        if args.quick:
            args.overrides = ["finetune.epochs=3", "pretrain.epochs=1", "fusion.epochs=2", "quantize.epochs=5",
                              "plots=false", *args.overrides]
        base = base.override({"eval.test": True, "pretrain_sources": [], "reuse.from_run": None, "reuse.stages": []})
        if args.overrides:
            base = base.override(parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    others = args.others or (QUICK_OTHERS if args.quick else None)
    if not others and {"other-domains", "both"} & set(args.pretraining):
        print("error: --others: name the other domains' datasets to pretrain on", file=sys.stderr)
        return 2
    target = args.target_name or (Path(base.data.source).name.removeprefix("amazon-")
                                  if base.data.source != "synthetic" else "synthetic")
    rows = []
    for pretraining in [p for p in PRETRAINING if p in args.pretraining]:  # other-domains before both
        per_seed = []
        for seed in args.seeds:
            vocab_run = args.runs_dir / target / "other-domains" / f"seed{seed}"
            cfg = setup(base.override({"seed": seed}), pretraining, others or [],
                        vocab_run if stages_done(vocab_run) else None)
            run = args.runs_dir / target / pretraining / f"seed{seed}"
            log.info("%s <- %s, seed %d: %s", target, pretraining, seed, run)
            try:
                metrics = finished_test_run(run, cfg) or run_pipeline(cfg, run, overwrite=True)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            per_seed.append((seed, run, metrics))
        rows.append(row(target, pretraining, cfg, per_seed))
    out = args.runs_dir if args.quick else DEFAULT_OUT
    meta = benchmark_meta("benchmarks/transfer.py", argv, REPO)
    with locked(out / "transfer.json"):  # another target's or row's command may finish at the same time
        rows = merge(out / "transfer.json", [{**r, **meta} for r in rows])
        atomic_write_json(out / "transfer.json", {"rows": rows})
        atomic_write_text(out / "transfer.md", render(rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
