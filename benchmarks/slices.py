"""Where one model beats another: HR@10 / NDCG@10 of finished runs per slice of the users, on VALID.

    python benchmarks/slices.py --runs runs/t2/games/qbert4rec/seed42 runs/t2/games/sasrec/seed42 \
        --name games_slices

Each ``--runs`` entry is a finished run of the same dataset: a ``qbert pipeline`` run (the paper's
model or the hybrid) or a ``qbert baseline`` run (SASRec, BERT4Rec). Every run is re-scored on
valid from its ``model.pt`` under one protocol (``--protocol``, default ``excluded``: history items
left out of the ranking, where a learned repeat bias buys nothing), and the users are cut into
quantile buckets (one bucket per value for a key with at most 8 distinct values) by three keys:

- ``target_train_count``: how often the target item occurs in the training parts (tail against
  popular targets);
- ``history_length``: the number of items before the target (capped at the model's window only
  in what the models read, not here);
- ``shared_prefix`` (when a ``qbert pipeline`` run is listed; the codes of the first one): the
  longest semantic-ID prefix the target shares with an item of its history, 0..K (K: the target,
  or an item with the same codes, is in the history): whether the next item is a sibling of
  something already bought.

``--popularity-adjust TAU`` ranks every run by its score minus TAU * log(1 + the item's count in
the training parts) instead (post-hoc logit adjustment, Menon et al. 2021, "Long-tail learning via
logit adjustment"; an item never in training gets the largest lift): a diagnostic of whether a
model's tail loses to its popularity prior.

Every run must have the same targets and the same withheld items (``data.cold_start``).
``--split test`` reads test instead; use it only on final setups whose test was already scored,
as a description, never to choose anything. Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.config import ConfigError  # noqa: E402
from qbert.data.errors import DataError  # noqa: E402
from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.eval.metrics import metrics_from_ranks  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text, load_weights  # noqa: E402
from qbert.utils.runtime import benchmark_meta, pick_device  # noqa: E402

QUANTILES = (0.25, 0.5, 0.75, 0.9)


class RunError(Exception):
    """A run that cannot be scored, with its path in the message."""


def popularity_adjusted(score_fn, counts: np.ndarray, tau: float):
    """``score_fn`` ([B, L] histories -> [B, N] scores) minus ``tau`` * log(1 + counts) of every item."""
    if tau == 0:
        return score_fn
    shift = tau * torch.log1p(torch.as_tensor(counts, dtype=torch.float32))

    def adjusted(histories: torch.Tensor) -> torch.Tensor:
        scores = score_fn(histories)
        return scores.float() - shift.to(scores.device)
    return adjusted


def pipeline_ranks(run: Path, which: str, protocol: str, tau: float = 0.0):
    """(model name, 0-based target ranks of ``which``, the split they index, the dataset) of a
    finished ``qbert pipeline`` run, re-scored from its ``model.pt`` as the run scored valid
    (with ``tau``: :func:`popularity_adjusted`)."""
    from qbert.pipeline import PipelineConfig, load_data
    from qbert.pipeline.data import target_split
    from qbert.pipeline.runs import rescoring_model
    from qbert.seqrec.stage import split_ranks

    cfg = PipelineConfig.from_yaml(run / "config.yaml")
    data = load_data(cfg)
    trained_on = load_weights(run / "model.pt", "model file").get("data_fingerprint")
    if trained_on not in (None, data.target.fingerprint()):
        raise DataError(f"{cfg.data.source} is not the data the run was trained on (fingerprint differs)")
    split = target_split(cfg, data)
    device = pick_device(cfg.device)
    model = rescoring_model(run, cfg, split, device, data)
    if tau:
        model.score = popularity_adjusted(model.score, split.train_counts(), tau)
    with torch.no_grad():  # its batch size and fine-tuning precision
        ranks = split_ranks(model, split, which, cfg.eval.batch_size, device, (protocol,), cfg.finetune.precision)
    return ("qbert4rec" if cfg.model.item_id == "none" else "hybrid"), ranks[protocol].numpy(), split, data.target


def baseline_ranks(run: Path, which: str, protocol: str, known: list, tau: float = 0.0):
    """The same for a ``qbert baseline`` run. Its data: one of ``known`` (the datasets of the other
    runs) with the run's fingerprint, else the data source it records."""
    from qbert.baselines import load_run, model_ranks
    from qbert.data.readers import read_source

    model, bcfg, payload = load_run(run, "auto")
    fingerprint = payload.get("data_fingerprint")
    dataset = next((d for d in known if d.fingerprint() == fingerprint), None)
    if dataset is None:
        if not payload.get("data_source"):
            raise ConfigError("the run records no data source; also list a pipeline run of its data")
        dataset = read_source(payload["data_source"])
        if fingerprint not in (None, dataset.fingerprint()):
            raise DataError(f"{payload['data_source']} is not the data the run was trained on")
    split = bcfg.cold_start.apply(LeaveOneOutSplit(dataset, max_len=bcfg.max_len))
    device = next(model.parameters()).device
    if tau:
        model.score = popularity_adjusted(model.score, split.train_counts(), tau)
    ranks = model_ranks(model, bcfg.model, split, which, bcfg.max_len, device, bcfg.eval_batch_size, (protocol,))
    return bcfg.model, ranks[protocol].numpy(), split, dataset


def score_runs(runs: list[Path], which: str, protocol: str, tau: float = 0.0) -> list[tuple]:
    """:func:`pipeline_ranks` / :func:`baseline_ranks` of every run, in the order given (pipeline
    runs are scored first, so the baselines can use their data)."""
    def named(run: Path, score, *rest):
        try:
            return score(run, which, protocol, *rest, tau=tau)
        except (ConfigError, DataError, OSError, RuntimeError, KeyError, ValueError) as e:
            raise RunError(f"{run}: {e}") from e

    for run in runs:
        if not (run / "model.pt").is_file():
            raise RunError(f"{run}: no model.pt (not a finished pipeline or baseline run)")
    pipeline = {run: named(run, pipeline_ranks) for run in runs if (run / "semantic_ids.parquet").is_file()}
    known = [p[3] for p in pipeline.values()]
    return [pipeline[run] if run in pipeline else named(run, baseline_ranks, known) for run in runs]


def slice_keys(split: LeaveOneOutSplit, which: str, codes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per user: the target's count in the training parts (without withheld items under the
    cold-start protocol), the number of items before the target in the real sequence, and with
    ``codes`` ([N, K] semantic IDs) :func:`shared_prefix`."""
    counts = split.train_counts()
    keys = {"target_train_count": counts[split.targets(which)], "history_length": history_lengths(split, which)}
    if codes is not None:
        keys["shared_prefix"] = shared_prefix(split, which, codes)
    return keys


def history_lengths(split: LeaveOneOutSplit, which: str) -> np.ndarray:
    """[U] the number of items before each user's ``which`` target in the real sequence (also under
    the cold-start protocol, whose withheld items stay in histories)."""
    return split.valid_pos - split.user_start + (1 if which == "test" else 0)


def shared_prefix(split: LeaveOneOutSplit, which: str, codes: np.ndarray) -> np.ndarray:
    """[U] the longest code prefix (0..K) that each user's target shares with an item of the real
    history before it (K: the target, or an item with the same codes, is in the history). Works on
    the flat history positions (memory grows with the interactions, not users x longest history)."""
    lengths = history_lengths(split, which)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + split.user_start[owner]
    same = codes[split.dataset.seq_items[pos]] == codes[split.targets(which)][owner]  # [positions, K]
    out = np.zeros(len(lengths), dtype=np.int64)
    np.maximum.at(out, owner, np.cumprod(same, axis=1).sum(1))
    return out


def first_codes(runs: list[Path], num_items: int) -> np.ndarray | None:
    """[N, K] semantic IDs of the first ``qbert pipeline`` run in ``runs`` (None: none listed)."""
    from qbert.pipeline.stages import read_codes

    run = next((r for r in runs if (r / "semantic_ids.parquet").is_file()), None)
    return None if run is None else read_codes(run, num_items)


def bucket_edges(values: np.ndarray) -> np.ndarray:
    """Upper bucket boundaries: the distinct quantiles of ``values`` (a bucket holds v <= edge); a key
    with few distinct values (up to 8) gets one bucket each."""
    distinct = np.unique(values)
    return distinct if len(distinct) <= 8 else np.unique(np.quantile(values, QUANTILES, method="lower"))


def metrics(ranks: np.ndarray) -> dict[str, float]:
    return {k: v for k, v in metrics_from_ranks(ranks).items() if k in ("HR@10", "NDCG@10")}


def slice_table(ranks: dict[str, np.ndarray], keys: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per (key, bucket): its bounds, users and each run's metrics."""
    rows = []
    for key, values in keys.items():
        bucket = np.searchsorted(bucket_edges(values), values, side="left")
        for b in np.unique(bucket):
            m = bucket == b
            rows.append({"key": key, "lo": int(values[m].min()), "hi": int(values[m].max()), "users": int(m.sum()),
                         "metrics": {label: metrics(r[m]) for label, r in ranks.items()}})
    return rows


def labels_for(runs: list[Path], names: list[str]) -> list[str]:
    """The model name, with the run directory's name where two runs share one."""
    labels = [f"{n} ({r.name})" if names.count(n) > 1 else n for r, n in zip(runs, names)]
    return [f"{n} ({r})" if labels.count(label) > 1 else label for r, n, label in zip(runs, names, labels)]


def markdown(result: dict[str, Any]) -> str:
    labels = [r["label"] for r in result["runs"]]
    head = " | ".join(f"{label} {m}" for m in ("NDCG@10", "HR@10") for label in labels)
    tau = result.get("popularity_adjust", 0.0)
    adjust = f", scores minus {tau} * log(1 + train count)" if tau else ""
    lines = [f"Split: {result['split']}, history {result['protocol']}{adjust}.", "",
             f"| slice | bucket | users | {head} |", "|---|---|---|" + "---|" * (2 * len(labels))]
    for r in [{"key": "all", "lo": None, "hi": None, "users": result["users"], "metrics": result["all"]},
              *result["slices"]]:
        bounds = "" if r["lo"] is None else f"{r['lo']}–{r['hi']}"
        cells = " | ".join(f"{r['metrics'][label][m]:.4f}" for m in ("NDCG@10", "HR@10") for label in labels)
        lines.append(f"| {r['key']} | {bounds} | {r['users']:,} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished runs of one dataset")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--protocol", choices=("kept", "excluded"), default="excluded",
                    help="history items kept in or excluded from the ranking")
    ap.add_argument("--popularity-adjust", type=float, default=0.0, metavar="TAU",
                    help="rank by score - TAU * log(1 + the item's training count) (a diagnostic; default 0)")
    ap.add_argument("--name", default="slices", help="writes <out-dir>/<name>.{json,md}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 <= args.popularity_adjust < float("inf"):
        print(f"error: --popularity-adjust must be a finite number >= 0, got {args.popularity_adjust}", file=sys.stderr)
        return 2
    if len(set(args.runs)) < len(args.runs):
        print("error: --runs lists a run twice", file=sys.stderr)
        return 2
    try:
        scored = score_runs(args.runs, args.split, args.protocol, args.popularity_adjust)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = scored[0][2]
    targets = split.targets(args.split)
    for run, (_, _, other, _) in zip(args.runs[1:], scored[1:]):
        if not np.array_equal(other.targets(args.split), targets) or not np.array_equal(other.withheld, split.withheld):
            print(f"error: {run}: its {args.split} targets or withheld new items differ from {args.runs[0]}'s "
                  "(another dataset, split or cold-start draw)", file=sys.stderr)
            return 2
    labels = labels_for(args.runs, [s[0] for s in scored])
    ranks = {label: s[1] for label, s in zip(labels, scored)}
    result = {"split": args.split, "protocol": args.protocol, "popularity_adjust": args.popularity_adjust,
              "users": int(targets.size),
              "runs": [{"label": label, "run": str(run)} for label, run in zip(labels, args.runs)],
              "all": {label: metrics(r) for label, r in ranks.items()},
              "slices": slice_table(ranks, slice_keys(split, args.split, first_codes(args.runs, split.num_items))),
              "meta": benchmark_meta("benchmarks/slices.py", argv, REPO)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / f"{args.name}.json", result)
    atomic_write_text(args.out_dir / f"{args.name}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
