"""Probe, on VALID only: why the semantic-ID model ranks no never-trained item in a top 10, what a
constant logit offset for those items would trade, and the choice of ``model.new_items: backoff``.

    python benchmarks/new_item_offset.py --run runs/bench-cold/qbert4rec --deltas 0 1 1.5 2 4 \
        --backoff-weights 0.2 0.25 0.3 0.4 --backoff-offsets 1.25 1.5 1.75 [--backoff-contents 0 2 4]

``--run`` is a finished pipeline run under the cold-start protocol (``data.cold_start``, e.g. the
``qbert4rec`` run of ``benchmarks/cold_start.py``). Rows ``rule: own``: for each offset delta the
valid targets are ranked with ``score + delta`` on the items fine-tuning did not train (the paper's
rule at delta 0). Rows ``rule: backoff``: every pair of ``--backoff-weights`` x ``--backoff-offsets``
(``QBert4Rec.new_item_scores``), each with every ``--backoff-contents`` weight of the content term
(``model.new_item_content``; default 0: none) and every ``--backoff-neighbours`` k
(``model.new_item_neighbours``: back off to the k nearest trained items in content; default 0:
the first-code cluster) and every ``--backoff-peers`` reading of the peers' P (``shifted``: as the
model scores them, default; ``before-repeat``: with the learned repeat shift taken back off the
history's items, ``model.new_item_peers_before_repeat``). ``--content-knn``: a reference row of
the content nearest-neighbour baseline (``qbert.seqrec.new_items.content_knn_scorer``). ``--mixture``: rows ``rule: mixture``
(``model.new_items: mixture``, ``QBert4Rec.mixture_scores``) with pi and the weights of each
``--mixture-features`` subset fitted on valid by likelihood (``qbert.seqrec.new_items.fit_mixture``),
each also with ``--mixture-scales`` times the fitted pi (sensitivity; 1 = the fit). Each row reports the new / known slices, with the median rank of
the new targets (content signal: random would be N / 2), with history items kept in the ranking
and, under ``excluded``, left out of it (#19's two protocols). Valid is scored as the run scores it (its
device, batch size, fine-tuning precision and record of trained items). Test is never scored. Writes
``benchmarks/results/new_item_offset.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.eval.metrics import target_concentration  # noqa: E402
from qbert.pipeline import PipelineConfig, load_data  # noqa: E402
from qbert.pipeline.data import target_split  # noqa: E402
from qbert.pipeline.runs import rescoring_model, run_content  # noqa: E402
from qbert.eval.evaluator import rank_targets  # noqa: E402
from qbert.pipeline.data import target_content  # noqa: E402
from qbert.seqrec.new_items import FEATURES, content_knn_scorer, fit_mixture  # noqa: E402
from qbert.seqrec.stage import split_ranks  # noqa: E402
from qbert.utils.runtime import pick_device  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    hit = ranks < 10
    return {"users": int(ranks.size), "HR@10": float(hit.mean()),
            "NDCG@10": float(np.where(hit, 1 / np.log2(ranks + 2), 0).mean()), "median_rank": float(np.median(ranks))}


def _item_macro(ranks: np.ndarray, split) -> dict[str, float]:
    """The new slice's item-macro HR@10 / NDCG@10 (each new target item counts once; one popular
    new item can otherwise carry the slice: docs/results.md, "One new item carries the new slice")."""
    macro = target_concentration(ranks, split.targets("valid"), split.withheld).get(
        "item_macro", {"HR@10": float("nan"), "NDCG@10": float("nan")})  # no valid target is new
    return {f"item_macro_{k}": v for k, v in macro.items()}


def _row(rule: str, weight, offset, content: float, neighbours: int, before_repeat: bool,
         ranks: dict[str, torch.Tensor], new: np.ndarray, split) -> dict:
    """One setting's valid slices: history kept (``new``, ``known``, ``all``) and excluded."""
    kept, excl = ranks["kept"].numpy(), ranks["excluded"].numpy()
    return {"rule": rule, "weight": weight, "delta": offset, "content": content, "neighbours": neighbours,
            "peers_before_repeat": before_repeat,
            "new": {**_metrics(kept[new]), **_item_macro(kept, split)}, "known": _metrics(kept[~new]),
            "all": _metrics(kept),
            "excluded": {"new": {**_metrics(excl[new]), **_item_macro(excl, split)}, "known": _metrics(excl[~new])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--deltas", type=float, nargs="*", default=[0, 1, 1.5, 2, 4])
    ap.add_argument("--backoff-weights", type=float, nargs="*", default=[])
    ap.add_argument("--backoff-offsets", type=float, nargs="*", default=[])
    ap.add_argument("--backoff-contents", type=float, nargs="*", default=[0.0])
    ap.add_argument("--backoff-neighbours", type=int, nargs="*", default=[0],
                    help="peers of the backoff rule: k nearest trained items in content (0: the first-code cluster)")
    ap.add_argument("--backoff-peers", nargs="*", choices=("shifted", "before-repeat"), default=["shifted"],
                    help="the backoff peers' P as scored, or before the learned repeat shift (needs repeat_bias)")
    ap.add_argument("--content-knn", action="store_true", help="a reference row: content nearest neighbours")
    ap.add_argument("--mixture", action="store_true", help="fit the mixture rule's pi and weights on valid")
    ap.add_argument("--mixture-features", nargs="*", default=[",".join(FEATURES)],
                    help=f"comma-separated subsets of {', '.join(FEATURES)} to fit (the others stay 0)")
    ap.add_argument("--mixture-scales", type=float, nargs="*", default=[1.0],
                    help="rows with the fitted pi times each of these (clipped below 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PipelineConfig.from_yaml(args.run / "config.yaml")
    data = load_data(cfg)
    split = target_split(cfg, data)
    if not split.withheld.size:
        print(f"error: {args.run} was not trained under the cold-start protocol (data.cold_start)", file=sys.stderr)
        return 2
    if args.mixture and (cfg.model.item_id != "none" or cfg.model.head != "catalogue"
                         or not cfg.fusion.feature_modalities or min(args.mixture_scales, default=1) <= 0
                         or any(f not in FEATURES for sub in args.mixture_features for f in sub.split(","))):
        print(f"error: --mixture: {args.run} must be a run of the paper's model (model.item_id: none, model.head: "
              "catalogue) with a text or image modality, --mixture-scales must be > 0 and --mixture-features name "
              f"{', '.join(FEATURES)}", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    model = rescoring_model(args.run, cfg, split, device)  # the items fine-tuning trained, as it recorded them
    if min(args.backoff_neighbours, default=0) < 0:
        print(f"error: --backoff-neighbours must be >= 0, got {args.backoff_neighbours}", file=sys.stderr)
        return 2
    if "before-repeat" in args.backoff_peers and model.repeat_weight is None:
        print(f"error: --backoff-peers before-repeat: {args.run} has no learned repeat shift (model.repeat_bias)",
              file=sys.stderr)
        return 2
    if any(args.backoff_contents) or any(args.backoff_neighbours) or args.mixture:
        model.set_item_content(run_content(args.run, cfg, model.num_items, data))
    try:
        fits = [fit_mixture(model, split, "valid", cfg.eval.batch_size, tuple(sub.split(",")))
                for sub in args.mixture_features] if args.mixture else []
    except ValueError as e:
        print(f"error: --mixture: {args.run}: {e}", file=sys.stderr)
        return 2
    for fit in fits:
        print(f"mixture fitted on valid: {fit}")
    new = np.isin(split.targets("valid"), split.withheld)
    rows = []
    # own + delta: the item's own score shifted by delta = the backoff rule with all weight on the own score
    settings = [("own", 1.0, delta, 0.0, 0, False) for delta in args.deltas]
    settings += [("backoff", w, off, c, k, peers == "before-repeat") for peers in args.backoff_peers
                 for k in args.backoff_neighbours for w in args.backoff_weights
                 for c in args.backoff_contents for off in args.backoff_offsets]
    settings += [("mixture", min(fit.share * scale, 0.999), fit, 0.0, 0, False) for fit in fits
                 for scale in args.mixture_scales]
    for rule, weight, offset, content, neighbours, before_repeat in settings:
        if rule == "mixture":  # weight: pi, offset: the fit
            offset.apply(model)
            model.new_item_share = weight
            offset = offset.weights
        else:
            model.new_items, model.new_item_weight, model.new_item_offset = "backoff", weight, offset
            model.new_item_content, model.new_item_neighbours = content, neighbours
        model.new_item_peers_before_repeat = before_repeat
        with torch.no_grad():  # as the run scores valid: its device, batch size and fine-tuning precision
            ranks = split_ranks(model, split, "valid", cfg.eval.batch_size, device, ("kept", "excluded"),
                                cfg.finetune.precision)
        rows.append(_row(rule, None if rule == "own" else weight, offset, content, neighbours, before_repeat,
                         ranks, new, split))
        print(rows[-1])
    if args.content_knn:  # the baseline the rules are compared with, on the same valid users
        ranks = rank_targets(content_knn_scorer(target_content(cfg, data)), split.history("valid", 0, 1),
                             split.targets("valid"), split.num_items, protocols=("kept", "excluded"),
                             history_pad=0, history_shift=1)
        rows.append(_row("content_knn", None, 0.0, 0.0, 0, False, ranks, new, split))
        print(rows[-1])
    md = ["| rule | weight of own score (mixture: pi) | offset (mixture: fitted weights) | content weight | "
          "content neighbours | peers' P | new HR@10 | new NDCG@10 | new median rank | "
          "new item-macro HR@10 | new item-macro NDCG@10 | known HR@10 | known NDCG@10 | all NDCG@10 | "
          "new NDCG@10, history excl. | new item-macro NDCG@10, history excl. | known NDCG@10, history excl. |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['rule']} | {'' if r['weight'] is None else format(r['weight'], '.4g')} | "
           + (" ".join(f"{k.removeprefix('new_item_')} {v:.3g}" for k, v in r['delta'].items() if v)
              if isinstance(r['delta'], dict) else format(r['delta'], 'g')) + " | "
           f"{r['content']:g} | {(r['neighbours'] or 'first code') if r['rule'] == 'backoff' else ''} | "
           f"{('before repeat' if r['peers_before_repeat'] else 'shifted') if r['rule'] == 'backoff' else ''} | "
           f"{r['new']['HR@10']:.4f} | {r['new']['NDCG@10']:.4f} | {r['new']['median_rank']:.0f} | "
           f"{r['new']['item_macro_HR@10']:.4f} | {r['new']['item_macro_NDCG@10']:.4f} | "
           f"{r['known']['HR@10']:.4f} | {r['known']['NDCG@10']:.4f} | {r['all']['NDCG@10']:.4f} | "
           f"{r['excluded']['new']['NDCG@10']:.4f} | {r['excluded']['new']['item_macro_NDCG@10']:.4f} | "
           f"{r['excluded']['known']['NDCG@10']:.4f} |" for r in rows]
    md.append(f"\nValid only; {split.num_items} items, {int(new.sum())} users whose valid target is new. "
              "Run: " + str(args.run))
    result = {"rows": rows, "split": "valid", "run": str(args.run), "num_items": split.num_items,
              **({"mixture_fits": [vars(fit) | {"overrides": fit.overrides()} for fit in fits]} if fits else {}),
              **benchmark_meta("benchmarks/new_item_offset.py", argv, REPO)}
    atomic_write_json(args.out_dir / "new_item_offset.json", result)
    atomic_write_text(args.out_dir / "new_item_offset.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
