"""Which hashed code prefixes let the semantic-ID model rank items never seen in training.

Planted data (:func:`planted_cold_start`): 8 clusters of 10 items, the first code is the
cluster, the other two are shared with known items; training sequences walk inside one
cluster over its 8 known items; each test user's target is one of its cluster's 2 new items.
For each setting of ``model.prefix_lengths``, with the training softmax over the whole catalogue
(``negatives: all``, the new items are negatives) or over the items training contains
(``negatives: seen``, the default), it fine-tunes the default (catalogue-head) model and reports
the new items' HR@10 and median rank; one more row trains on the known catalogue only and ranks
over the full one (``set_catalogue``), the "items added after training" case. Writes JSON and a markdown table::

    python benchmarks/prefix_cold_start.py --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.data.dataset import from_sequences  # noqa: E402
from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.eval.metrics import target_ranks  # noqa: E402
from qbert.seqrec.stage import FinetuneConfig, SeqRecConfig, build_model, finetune  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

CLUSTERS, PER, KNOWN = 8, 10, 8


def planted_cold_start(seed: int = 0):
    """(codes [80, 3], training sequences, test histories [80, 5] as item + 1, test targets [80], 80)."""
    rng = np.random.default_rng(seed)
    n = CLUSTERS * PER
    pairs = np.concatenate([rng.permutation(64)[:PER] for _ in range(CLUSTERS)])  # distinct (c1, c2) per cluster
    codes = np.stack([np.repeat(np.arange(CLUSTERS), PER), pairs // 8, pairs % 8], 1)  # every code also a known item's
    known = [np.arange(c * PER, c * PER + KNOWN) for c in range(CLUSTERS)]
    train = [[int(x) for x in rng.choice(known[c], int(rng.integers(4, 8)))] for c in rng.integers(0, CLUSTERS, 600)]
    test_hist, test_tgt = [], []
    for c in range(CLUSTERS):
        for _ in range(10):
            test_hist.append([int(x) + 1 for x in rng.choice(known[c], 5)])
            test_tgt.append(c * PER + KNOWN + int(rng.integers(0, PER - KNOWN)))
    return codes, train, np.array(test_hist), np.array(test_tgt), n


def new_item_ranks(model_cfg: SeqRecConfig, seed: int, known_catalogue_only: bool = False,
                   epochs: int = 15, negatives: str = "seen") -> torch.Tensor:
    """0-based ranks of the new test targets among all 80 items after fine-tuning on the known ones
    (fp32, so the ranks do not depend on whether the CPU has bf16 units)."""
    codes, train, hist, tgt, n = planted_cold_start(seed)
    torch.manual_seed(seed)
    if known_catalogue_only:
        known = np.flatnonzero(np.arange(n) % PER < KNOWN)
        index = {int(k): j for j, k in enumerate(known)}
        split = LeaveOneOutSplit(from_sequences("cold", [[index[x] for x in s] for s in train], len(known)), 10)
        model = build_model(model_cfg, codes[known], 8, 10)
    else:
        split = LeaveOneOutSplit(from_sequences("cold", train, n), 10)
        model = build_model(model_cfg, codes, 8, 10)
    finetune(model, split, FinetuneConfig(epochs=epochs, batch_size=64, lr=3e-3, patience=0, precision="fp32",
                                          negatives=negatives), seed=seed, progress=False)
    if known_catalogue_only:
        model.set_catalogue(torch.as_tensor(codes))
    model.eval()
    with torch.no_grad():
        return target_ranks(model.score(torch.as_tensor(hist)), torch.as_tensor(tgt))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "prefix_cold_start.json"))
    ap.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "prefix_cold_start.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # new items ranked by their own composed scores (the paper's rule): what the prefixes compose
    base = {"hidden": 32, "layers": 1, "heads": 2, "dropout": 0.0, "new_items": "own"}
    settings = [("[2, 3] (full tuple)", [2, 3], False, "all"), ("[2] (default)", None, False, "all"),
                ("[] (none)", [], False, "all"), ("[2, 3] (full tuple)", [2, 3], False, "seen"),
                ("[2] (default)", None, False, "seen"), ("[] (none)", [], False, "seen"),
                ("[2, 3], trained on the known catalogue only", [2, 3], True, "seen")]
    rows = []
    for label, lengths, known_only, negatives in settings:
        r = new_item_ranks(SeqRecConfig(**base, prefix_lengths=lengths), args.seed, known_only, negatives=negatives)
        rows.append({"prefix_lengths": label, "negatives": negatives, "new_items_HR@10": float((r < 10).float().mean()),
                     "new_items_median_rank": float(r.float().median())})
    meta = benchmark_meta("benchmarks/prefix_cold_start.py", argv, REPO, seed=args.seed, threads=args.threads)
    atomic_write_json(args.out_json, {"rows": rows, "meta": meta})
    lines = ["| prefix lengths | softmax negatives in training | new items' HR@10 | median rank (of 80) |",
             "|---|---|---|---|"]
    lines += [f"| {r['prefix_lengths']} | {r['negatives']} | {r['new_items_HR@10']:.4f} | {r['new_items_median_rank']:g} |"
              for r in rows]
    lines += ["", f"Command: `{meta['command']}`; git {meta['git_commit']}; {meta['date']}; "
              f"{meta['machine'].get('cpu_count')} CPUs, {args.threads} torch thread(s), seed {args.seed}."]
    atomic_write_text(args.out_md, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
