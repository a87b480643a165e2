"""Benchmark: choose the ranking weight of the semantic-ID term on valid for finished runs.

    python benchmarks/code_weight.py --run runs/inst-long --run runs/hp-ft-lr1e-3 --weights 0,0.25,0.5,1

Q-BERT4Rec ranks items by ``w * sum_l log p(code_l) + log p(item)``; the paper's plain sum is
w = 1. For each run this loads ``model.pt``, scores every valid user once, keeps the weight with
the best valid NDCG@10 (:func:`qbert.seqrec.stage.select_code_weight`) and only then evaluates
test, once, at that weight. Writes ``benchmarks/results/code_weight.{json,md}``: valid metrics of
every weight, the chosen one, its test metrics, and the run's own test metrics (at the weight it ran with).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.pipeline import METRIC_KEYS, load_data, load_run_model  # noqa: E402
from qbert.seqrec.stage import evaluate_split, select_code_weight  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402


def choose(run_dir: Path, weights: list[float], monitor: str = "NDCG@10") -> dict:
    model, cfg = load_run_model(run_dir)
    split = LeaveOneOutSplit(load_data(cfg).target, cfg.data.max_len)
    best, table = select_code_weight(model, split, weights, monitor, cfg.eval.batch_size,
                                     exclude_history=cfg.eval.exclude_history)
    test = evaluate_split(model, split, "test", cfg.eval.batch_size, exclude_history=cfg.eval.exclude_history)
    own = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return {"run": str(run_dir), "chosen_weight": best, "monitor": monitor,
            "valid": {str(w): {k: m[k] for k in METRIC_KEYS} for w, m in table.items()},
            "test": {k: test[k] for k in METRIC_KEYS}, "run_test": own.get("test"),
            "run_weight": own.get("stages", {}).get("finetune", {}).get("code_score_weight", 1.0)}


def markdown(rows: list[dict], meta: dict) -> str:
    weights = list(rows[0]["valid"]) if rows else []
    lines = ["| run | " + " | ".join(f"valid NDCG@10, w={w}" for w in weights)
             + " | chosen w | test HR@1 | HR@5 | HR@10 | NDCG@5 | NDCG@10 | the run's own test NDCG@10 (its w) |",
             "|---|" + "---|" * (len(weights) + 7)]
    for r in rows:
        own = (r["run_test"] or {}).get("NDCG@10")
        lines.append(f"| {r['run']} | " + " | ".join(f"{r['valid'][w]['NDCG@10']:.4f}" for w in weights)
                     + f" | {r['chosen_weight']:g} | " + " | ".join(f"{r['test'][k]:.4f}" for k in METRIC_KEYS)
                     + " | " + (f"{own:.4f} (w={r['run_weight']:g})" if own is not None else "") + " |")
    lines += ["", f"Command: `{meta['command']}`; git {meta['git_commit']}; {meta['date']}; "
              f"{meta['machine'].get('cpu_count')} CPUs, {meta['threads']} torch thread(s). The weight is chosen on "
              "valid NDCG@10; test is evaluated once, at the chosen weight."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a finished pipeline run directory (repeatable)")
    ap.add_argument("--weights", default="0,0.25,0.5,1", help="comma-separated candidate weights (>= 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "code_weight.json"))
    ap.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "code_weight.md"))
    args = ap.parse_args(argv)
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--weights must be comma-separated numbers, got {args.weights!r}")
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.run:
        if not (Path(run) / "model.pt").is_file():
            ap.error(f"--run {run}: no finished run there (model.pt missing)")
        if load_run_model(Path(run))[1].model.item_id != "input_and_head":
            ap.error(f"--run {run}: not a hybrid run (model.item_id input_and_head): the paper's model ranks by "
                     "log P(semantic ID) alone, so there is no weight to choose")
        rows.append(choose(Path(run), weights))
        print(json.dumps({k: rows[-1][k] for k in ("run", "chosen_weight", "test")}), flush=True)
    meta = benchmark_meta(sys.argv[0], argv, REPO, threads=args.threads)
    atomic_write_json(args.out_json, {"rows": rows, "meta": meta})
    atomic_write_text(args.out_md, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
