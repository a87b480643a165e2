"""Benchmark: cold-start items, the case ID models cannot serve (#19's protocol).

    python benchmarks/cold_start.py --config configs/instruments.yaml \
        --hybrid-config configs/instruments-hybrid.yaml --runs-dir runs/bench-cold
    python benchmarks/cold_start.py --quick --runs-dir /tmp/cold      # embedded synthetic data

Protocol (``data.cold_start`` / the baselines' ``cold_start``; docs/method.md, "Cold-start
items"): ``--fraction`` of the catalogue (seeded by ``--seed``) is "new"; every interaction with a
new item is removed from all training and pretraining inputs and targets; stages 1-2 still see
the new items' content; valid and test histories and targets are the real ones. Each model is
trained once under the protocol, its test set is evaluated once, and the users are split by
whether their test target is new. Rows, each under both ranking protocols:

- ``qbert4rec``: the paper's model (``--config``: semantic IDs only, no item-ID table), new items
  ranked by ``model.new_items`` (``--set model.new_items=backoff``: from the trained items sharing
  their first code; default ``own``, the paper's rule);
- ``qbert4rec-transfer`` (only when listed in ``--models``): the same, pretrained on
  ``--pretrain-sources`` too (one vocabulary over every catalogue);
- ``qbert4rec-pseudo-new`` (only when listed in ``--models``): the paper's model fine-tuned with
  ``finetune.pseudo_new`` = ``--pseudo-new`` (each step scores that share of the items without
  their own prefix rows, as new items are scored), stages 1-3 reused from the ``qbert4rec`` run
  when it has them with the same settings (list ``qbert4rec`` first in a fresh ``--runs-dir``);
  ``--pseudo-new-set`` overrides apply to this row only, after ``--set``;
- ``qbert4rec-content``, ``qbert4rec-pseudo-new-content`` (only when listed): the run of the row
  without the suffix, re-scored with the ranking settings of ``--content-set`` (e.g. the backoff
  rule's content term, ``model.new_item_content``, and its offset); nothing is trained;
- ``qbert4rec-neighbours``, ``qbert4rec-pseudo-new-neighbours`` (only when listed): the same with
  the ranking settings of ``--neighbours-set`` (e.g. the backoff rule's content neighbours,
  ``model.new_item_neighbours``, and its offset); nothing is trained; ``--neighbours-label`` names
  them ``qbert4rec-LABEL`` and ``qbert4rec-pseudo-new-LABEL`` instead, so the rows of another
  setting (e.g. ``model.new_item_peers_before_repeat``) sit beside the first ones;
- ``qbert4rec-mixture``, ``qbert4rec-pseudo-new-mixture`` (only when listed): the run of the row
  without the suffix re-scored with the mixture rule (``model.new_items: mixture``;
  docs/method.md): P(next is new) and the weights of the new items' softmax fitted on that run's
  valid targets by likelihood (``qbert.seqrec.new_items``); nothing is trained;
- ``qbert4rec-content-map`` (only when listed): the paper's model with a content map in its item
  vectors (``model.content_dim`` = ``--content-dim``; docs/method.md, "Content in the item
  vectors"), fine-tuned with ``finetune.pseudo_new`` = ``--pseudo-new``; ``--content-map-set``
  overrides apply to this row only (e.g. the ranking rule chosen on valid);
- ``hybrid``: ``--hybrid-config`` (item-ID embedding and softmax next to semantic IDs);
- ``sasrec``, ``bert4rec``: our ID-only baselines at their RecBole settings;
- ``popularity``: training-view item counts (a new item has none);
- ``content_knn``: cosine similarity of each item's content features (the modality inputs stage 1
  reads, each view L2-normalised and concatenated) to the mean of the history's.

Runs live in ``RUNS_DIR/<model>/``; a finished run of the same config is read, not re-run (a
Q-BERT4Rec run is re-scored from its ``model.pt``: ranking settings need no training). One
``RUNS_DIR`` holds the runs of one dataset and one draw of new items (``--fraction``, ``--seed``):
a run there of other data is refused before anything trains, never read or replaced (another
draw's run would be retrained over: give it its own ``RUNS_DIR``). Writes
``benchmarks/results/cold_start.{json,md}`` (``--quick``: under ``RUNS_DIR``): the rows of this
dataset, draw and the listed models replace their old ones, every other row is kept, and each
row records the command, commit and date that made it. The markdown names each row's draw and, for
each dataset, model, slice and new share scored on two draws (seeds) or more, gives the mean ±
sample standard deviation over those draws.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.baselines import BaselineConfig, run_baseline  # noqa: E402
from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.eval.evaluator import rank_targets  # noqa: E402
from qbert.eval.metrics import target_concentration  # noqa: E402
from qbert.eval.report import cold_start_report  # noqa: E402
from qbert.pipeline import (HYBRID_OVERRIDES, PipelineConfig, config_differences, load_data,  # noqa: E402
                            quickstart_config, run_pipeline)
from qbert.pipeline.data import target_content  # noqa: E402
from qbert.pipeline.runs import NEW_ITEM_KEYS, check_reuse, rescoring_model, run_content  # noqa: E402
from qbert.utils.runtime import pick_device  # noqa: E402
from qbert.seqrec.new_items import FEATURES, content_knn_scorer, fit_mixture  # noqa: E402
from qbert.seqrec.stage import split_ranks  # noqa: E402
from qbert.pipeline.data import target_split  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text, locked  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

RANKING_KEYS = tuple(f"model.{k}" for k in NEW_ITEM_KEYS)
log = logging.getLogger("bench.cold_start")
DEFAULT_OUT = REPO / "benchmarks" / "results"
METRICS = ("HR@10", "NDCG@10")
# each row -> the run under RUNS_DIR it trains or re-scores (None: a heuristic with no run)
RUN_OF = {"qbert4rec": "qbert4rec", "qbert4rec-content": "qbert4rec", "qbert4rec-neighbours": "qbert4rec",
          "qbert4rec-mixture": "qbert4rec", "qbert4rec-transfer": "qbert4rec-transfer",
          "qbert4rec-pseudo-new": "qbert4rec-pseudo-new", "qbert4rec-pseudo-new-content": "qbert4rec-pseudo-new",
          "qbert4rec-pseudo-new-neighbours": "qbert4rec-pseudo-new",
          "qbert4rec-pseudo-new-mixture": "qbert4rec-pseudo-new", "qbert4rec-content-map": "qbert4rec-content-map",
          "hybrid": "hybrid", "sasrec": "sasrec", "bert4rec": "bert4rec", "popularity": None, "content_knn": None}


def _cold(cfg: PipelineConfig, fraction: float, seed: int, overrides: list[str]) -> PipelineConfig:
    cfg = cfg.override({"data.cold_start.fraction": fraction, "data.cold_start.seed": seed})
    return cfg.override(parse_overrides(overrides)) if overrides else cfg


class NothingToFit(Exception):
    """The mixture rule found no valid target to fit on (no untrained valid target)."""


class OtherDataset(Exception):
    """A run directory holds a run of other data (one RUNS_DIR per dataset and draw of new items)."""


DATA_KEYS = ("data.source", "data.synthetic.", "data.options.")  # what names the dataset in a config


def _refuse_other_dataset(run: Path, data, cfg: PipelineConfig | None = None) -> None:
    """Raise OtherDataset when ``run`` was made on other data than ``data``'s target: its recorded
    fingerprint (a finished run's summary or metrics, a baseline's checkpoint record), else, for a
    pipeline run that never finished, a dataset key of its config.yaml differing from ``cfg``'s."""
    theirs = None
    for name, key in (("summary.json", "data"), ("metrics.json", "data"), ("checkpoints/settings.json", None)):
        if theirs is None and (run / name).is_file():
            record = json.loads((run / name).read_text())
            theirs = (record.get(key) or {}).get("fingerprint") if key else record.get("data_fingerprint")
    mine = data.target.fingerprint()
    if theirs is not None:
        if theirs != mine:
            raise OtherDataset(f"{run} holds a run of other data (data fingerprint {theirs}, this one's {mine}): "
                               "give each dataset its own --runs-dir")
        return
    differs = [k for k in config_differences(run / "config.yaml", cfg, ignore_reuse=True) or []
               if k.startswith(DATA_KEYS)] if cfg is not None else []
    if differs:
        raise OtherDataset(f"{run} holds an unfinished run of other data ({', '.join(differs)} differ): give each "
                           "dataset its own --runs-dir")


def _finished(run: Path, cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    """metrics.json of a finished run of this config (so an interrupted benchmark resumes)."""
    import yaml

    if not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
        return None
    if yaml.safe_load((run / "config.yaml").read_text()) != json.loads(json.dumps(cfg_dict, default=str)):
        return None
    return json.loads((run / "metrics.json").read_text())


def _reusing_qbert4rec(cfg: PipelineConfig, settings: dict[str, Any], overrides: list[str], runs_dir: Path,
                       stages: list[str], row: str) -> PipelineConfig:
    """``cfg`` with a row's ``settings`` and ``overrides``, reusing ``stages`` of the qbert4rec run in
    ``runs_dir`` when it made them with the same settings (else every stage trains)."""
    out = cfg.override(settings)
    out = out.override(parse_overrides(overrides)) if overrides else out
    reusing = out.override({"reuse.from_run": str(runs_dir / "qbert4rec"), "reuse.stages": stages})
    try:
        check_reuse(reusing)
    except ConfigError as e:
        log.info("%s trains every stage: %s", row, e)
        return out
    return reusing


def pipeline_row(cfg: PipelineConfig, data, run: Path, fit: bool = False) -> dict[str, Any]:
    """Train the run unless ``run`` holds one of these settings (whether it scored test or not), then
    score valid and test from its ``model.pt`` with ``cfg``'s ranking settings (``model.new_items``...),
    on the run's device and at its fine-tuning precision (as the run scored itself). ``main`` has
    refused a ``run`` of other data before anything trained. ``fit``: score with the mixture rule,
    pi and the weights fitted on valid (``fit_mixture``), instead of ``cfg``'s rule (which trains the run)."""
    diffs = config_differences(run / "config.yaml", cfg, ignore_reuse=True) if (run / "model.pt").is_file() else None
    if diffs is None or [k for k in diffs if k != "eval.test"]:
        run_pipeline(cfg, run, overwrite=True)
    device = pick_device(cfg.device)
    split = target_split(cfg, data)
    model = rescoring_model(run, cfg, split, device, data)
    fitted = None
    if fit:
        if model.item_content is None:
            model.set_item_content(run_content(run, cfg, model.num_items, data))
        try:
            fitted = fit_mixture(model, split, "valid", cfg.eval.batch_size)
        except ValueError as e:
            raise NothingToFit(f"{run}: {e}") from None
        fitted.apply(model)
        log.info("mixture rule fitted on valid: %s", fitted)
    with torch.no_grad():
        ranks = {w: split_ranks(model, split, w, cfg.eval.batch_size, device, ("kept", "excluded"),
                                cfg.finetune.precision) for w in ("valid", "test")}
    return {"stage3_item_table": bool(model.item_indexed_parameters()),
            "slices": cold_start_report(split, ranks, cfg.data.cold_start)["slices"],
            "concentration": _concentration(split, ranks),
            "new_items": {"rule": model.new_items, "weight": model.new_item_weight, "offset": model.new_item_offset,
                          "content": model.new_item_content, "neighbours": model.new_item_neighbours,
                          "peers_before_repeat": model.new_item_peers_before_repeat,
                          **({"share": model.new_item_share,
                              **{k.removeprefix("new_item_"): getattr(model, k) for k in FEATURES}}
                             if model.new_items == "mixture" else {}),
                          **({"fit": vars(fitted)} if fitted is not None else {}),
                          "untrained": int((~model.trained_items).sum())} if model.item_id == "none" else None}


def baseline_row(model: str, cfg: PipelineConfig, data, run: Path, quick: bool) -> dict[str, Any]:
    bcfg = BaselineConfig(model=model, max_len=cfg.data.max_len, cold_start=cfg.data.cold_start, progress=False,
                          **({"epochs": 3, "patience": 0} if quick else {"epochs": 100, "patience": 10}))
    metrics = (_finished(run, bcfg.resolved().to_dict())
               or run_baseline(bcfg, data.target, run, data_source=cfg.data.source))
    ranks = pq.read_table(run / "test_ranks.parquet", columns=["target", "rank_history_kept", "rank_history_excluded"])
    split = target_split(cfg, data)
    if not np.array_equal(ranks.column("target").to_numpy(), split.targets("test")):
        raise OtherDataset(f"{run / 'test_ranks.parquet'}: its test targets are not this split's")
    return {"stage3_item_table": True, "slices": metrics["cold_start"]["slices"],
            "concentration": _concentration(split, {"test": {p: ranks.column(f"rank_history_{p}").to_numpy()
                                                             for p in ("kept", "excluded")}})}


def heuristic_row(cfg: PipelineConfig, data, score_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    split = target_split(cfg, data)
    ranks = {w: rank_targets(score_fn, split.history(w, 0, 1), split.targets(w), split.num_items,
                             protocols=("kept", "excluded"), history_pad=0, history_shift=1) for w in ("valid", "test")}
    return {"stage3_item_table": None, "slices": cold_start_report(split, ranks)["slices"],
            "concentration": _concentration(split, ranks)}


def _concentration(split, ranks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per protocol (``kept``, ``excluded``) and split: how far single new targets carry the new slice
    (target_concentration; ``ranks``: {split: {protocol: ranks}})."""
    return {p: {w: target_concentration(r[p], split.targets(w), split.withheld) for w, r in ranks.items()}
            for p in ("kept", "excluded")}


def popularity_fn(cfg: PipelineConfig, data) -> Callable[[torch.Tensor], torch.Tensor]:
    pop = torch.as_tensor(np.log1p(target_split(cfg, data).train_counts()), dtype=torch.float32)
    return lambda h: pop.expand(len(h), -1)


def content_knn_fn(cfg: PipelineConfig, data) -> Callable[[torch.Tensor], torch.Tensor]:
    return content_knn_scorer(target_content(cfg, data))


def _row_key(row: dict[str, Any]) -> tuple:
    return row["dataset"], row["model"], row.get("fraction"), row.get("seed")


def merge_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``path`` with those of the same dataset, model and draw of new items (fraction,
    seed) as a row of ``rows`` replaced (in place; new ones at the end). Rows of a file written
    before rows carried their own command take the file's."""
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    meta = {k: old[k] for k in ("command", "git_commit", "machine", "date") if k in old}
    kept = [{**meta, **r} for r in old["rows"]]
    new = {_row_key(r) for r in rows}
    out, placed = [], set()
    for r in kept:
        key = _row_key(r)
        if key not in new:
            out.append(r)
        elif key not in placed:
            placed.add(key)
            out.extend(n for n in rows if _row_key(n) == key)
    return out + [r for r in rows if _row_key(r) not in placed]


def _draw(row: dict[str, Any]) -> str:
    """The draw of new items a row was scored on: the new share of the catalogue and the draw's seed."""
    return f"{row.get('fraction', '?')} / {row.get('seed', '?')}"


def over_draws(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each dataset, model, slice and new share scored on two draws (seeds) or more, the mean and
    sample standard deviation of each test metric over those draws."""
    groups: dict[tuple, dict[Any, dict[str, Any]]] = {}
    for r in rows:  # one row per draw (the last), draws whose slice has no test user left out
        if r["test"].get("users"):
            groups.setdefault((r["dataset"], r["model"], r["slice"], r.get("fraction")), {})[r.get("seed")] = r
    out = []
    for (dataset, model, slice_name, fraction), by_seed in groups.items():
        if len(by_seed) < 2:
            continue
        rs = [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s or 0))]
        stats = {}
        for protocol in ("test", "test_excl_history"):
            for m in METRICS:
                v = np.array([r[protocol][m] for r in rs], dtype=float)
                stats[f"{protocol}/{m}"] = (float(v.mean()), float(v.std(ddof=1)))
        out.append({"dataset": dataset, "model": model, "slice": slice_name, "fraction": fraction,
                    "seeds": [r.get("seed") for r in rs], "users": [r["test"]["users"] for r in rs], **stats})
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | model | item-ID table in stage 3 | draw (new share / seed) | slice | users | HR@10 | NDCG@10 "
             "| HR@10 (history excl.) | NDCG@10 (history excl.) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, e = r["test"], r["test_excl_history"]
        table = {True: "yes", False: "no", None: "n/a"}[r["stage3_item_table"]]
        lines.append(f"| {r['dataset']} | {r['model']} | {table} | {_draw(r)} | {r['slice']} | {t['users']} | "
                     + " | ".join(f"{t.get(m, float('nan')):.4f}" for m in METRICS) + " | "
                     + " | ".join(f"{e.get(m, float('nan')):.4f}" for m in METRICS) + " |")
    means = over_draws(rows)
    if means:
        lines += ["", "Test over draws of new items (mean ± sample std over the draws; each draw has its own "
                  "runs and its own set of new items), for what was scored on two draws or more.", "",
                  "| dataset | model | new share | draw seeds | slice | users per draw | HR@10 | NDCG@10 "
                  "| HR@10 (history excl.) | NDCG@10 (history excl.) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for g in means:
            cells = [f"{g[f'{p}/{m}'][0]:.4f} ± {g[f'{p}/{m}'][1]:.4f}"
                     for p in ("test", "test_excl_history") for m in METRICS]
            lines.append(f"| {g['dataset']} | {g['model']} | {g['fraction']} | {', '.join(map(str, g['seeds']))} | "
                         f"{g['slice']} | {', '.join(map(str, g['users']))} | " + " | ".join(cells) + " |")
    conc = [r for r in rows if r["slice"] == "new" and (r.get("new_target_concentration") or {}).get("test")]
    if conc:
        lines += ["", "New-target users of test, history kept: how far single items carry the slice's HR@10 "
                  "(`new_target_concentration`); the item-macro scores also with history excluded "
                  "(`new_target_concentration_excl_history`; n/a: a row scored before it was recorded).", "",
                  "| dataset | model | draw | users | hits | distinct targets | most frequent target: users, hits "
                  "| most hit target: users, hits | item-macro HR@10 | item-macro NDCG@10 "
                  "| item-macro HR@10 (history excl.) | item-macro NDCG@10 (history excl.) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in conc:
            c = r["new_target_concentration"]["test"]
            if not c["users"]:
                continue
            f, h = c["most_frequent_target"], c["most_hit_target"]
            most_hit = f"{h['item']}: {h['users']}, {h['hits']}" if c["hits"] else "none"
            excl = (r.get("new_target_concentration_excl_history") or {}).get("test", {}).get("item_macro")
            lines.append(f"| {r['dataset']} | {r['model']} | {_draw(r)} | {c['users']} | {c['hits']} | {c['distinct_targets']} | "
                         f"{f['item']}: {f['users']}, {f['hits']} | {most_hit} | "
                         f"{c['item_macro']['HR@10']:.4f} | {c['item_macro']['NDCG@10']:.4f} | "
                         + (f"{excl['HR@10']:.4f} | {excl['NDCG@10']:.4f} |" if excl else "n/a | n/a |"))
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge ``rows`` into ``out/cold_start.json`` and render ``out/cold_start.md``, under a lock
    (another draw or row may finish at the same time); returns every row."""
    with locked(out / "cold_start.json"):
        rows = merge_rows(out / "cold_start.json", rows)
        atomic_write_json(out / "cold_start.json", {"rows": rows})
        atomic_write_text(out / "cold_start.md", render(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="the paper's model (default: the synthetic quick start)")
    ap.add_argument("--hybrid-config", type=Path, default=None, help="the hybrid (default: --config with item IDs)")
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset-name", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for both Q-BERT4Rec runs")
    ap.add_argument("--models", default="qbert4rec,hybrid,sasrec,bert4rec,popularity,content_knn",
                    help="comma-separated; also qbert4rec-pseudo-new, qbert4rec-transfer (needs --pretrain-sources), "
                         "qbert4rec-content and qbert4rec-pseudo-new-content (needs --content-set), qbert4rec-neighbours "
                         "and qbert4rec-pseudo-new-neighbours (needs --neighbours-set), qbert4rec-mixture "
                         "and qbert4rec-pseudo-new-mixture (the mixture rule fitted on valid), qbert4rec-content-map")
    ap.add_argument("--pretrain-sources", nargs="*", default=[], help="other domains for qbert4rec-transfer")
    ap.add_argument("--reuse-from", type=Path, default=None,
                    help="a run over the same union of catalogues whose stages 1-2 qbert4rec-transfer reuses")
    ap.add_argument("--pseudo-new", type=float, default=0.1, help="finetune.pseudo_new of qbert4rec-pseudo-new")
    ap.add_argument("--pseudo-new-set", dest="pseudo_overrides", action="append", default=[],
                    help="override for the qbert4rec-pseudo-new run only")
    ap.add_argument("--content-dim", type=int, default=128, help="model.content_dim of qbert4rec-content-map")
    ap.add_argument("--content-map-set", dest="content_map_overrides", action="append", default=[],
                    help="override for the qbert4rec-content-map run only")
    ap.add_argument("--content-set", dest="content_overrides", action="append", default=[],
                    help="ranking settings (model.new_item_*) of the *-content rows, which re-score the run of "
                         "the row without the suffix, e.g. model.new_item_content=6")
    ap.add_argument("--neighbours-set", dest="neighbour_overrides", action="append", default=[],
                    help="ranking settings (model.new_item_*) of the *-neighbours rows, as --content-set, e.g. "
                         "model.new_item_neighbours=20")
    ap.add_argument("--neighbours-label", default="neighbours",
                    help="the *-neighbours rows are written as qbert4rec-LABEL and qbert4rec-pseudo-new-LABEL")
    ap.add_argument("--quick", action="store_true", help="synthetic data, few epochs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    models = list(dict.fromkeys(args.models.split(",")))  # a model listed twice is one row
    unknown = [m for m in models if m not in RUN_OF]
    if unknown or ("qbert4rec-transfer" in models and not args.pretrain_sources):
        print(f"error: --models {args.models}: " + (f"unknown {', '.join(unknown)} (known: {', '.join(RUN_OF)})"
              if unknown else "qbert4rec-transfer needs --pretrain-sources"), file=sys.stderr)
        return 2
    label = args.neighbours_label
    named = {m: m.removesuffix("-neighbours") + "-" + label for m in RUN_OF if m.endswith("-neighbours")}
    if (not re.fullmatch(r"[a-z0-9][a-z0-9-]*", label) or label.startswith("pseudo-new")
            or (label != "neighbours" and set(named.values()) & set(RUN_OF))):
        print(f"error: --neighbours-label {label!r}: lower-case letters, digits and '-', not starting with "
              "'pseudo-new', and no other row's name",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.overrides = ["finetune.epochs=3", "pretrain.epochs=1", "plots=false", *args.overrides]
    # the rules for new items are the paper's model's: the hybrid ranks with its item-ID head
    paper_only = {"model.new_items": "own", "model.new_item_content": 0.0, "model.new_item_neighbours": 0}
    try:
        base = PipelineConfig.from_yaml(args.config) if args.config else quickstart_config()
        cfg = _cold(base, args.fraction, args.seed, args.overrides)
        hybrid = _cold(PipelineConfig.from_yaml(args.hybrid_config).override(paper_only), args.fraction, args.seed,
                       [o for o in args.overrides if not o.startswith(tuple(paper_only))]) \
            if args.hybrid_config else cfg.override({**HYBRID_OVERRIDES, **paper_only})
        # the paper's model pretrained on other domains too (one vocabulary; docs/method.md), stages 1-2
        # optionally taken from a run over the same union of catalogues
        transfer = cfg.override({"pretrain_sources": args.pretrain_sources,
                                 **({"reuse.from_run": str(args.reuse_from), "reuse.stages": ["fusion", "quantize"]}
                                    if args.reuse_from else {})})
    except ConfigError as e:
        print(f"error: --config / --hybrid-config / --set: {e}", file=sys.stderr)
        return 2
    def pseudo() -> PipelineConfig:
        """Stages 1-3 from the qbert4rec run when it made them with these settings (they do not read
        pseudo_new), else trained here."""
        return _reusing_qbert4rec(cfg, {"finetune.pseudo_new": args.pseudo_new}, args.pseudo_overrides,
                                  args.runs_dir, ["fusion", "quantize", "pretrain"], "qbert4rec-pseudo-new")

    def content_map() -> PipelineConfig:
        """Stages 1-2 from the qbert4rec run when it made them with these settings (pretraining
        reads content_dim, so it trains here), else trained here."""
        return _reusing_qbert4rec(cfg, {"finetune.pseudo_new": args.pseudo_new, "model.content_dim": args.content_dim},
                                  args.content_map_overrides, args.runs_dir, ["fusion", "quantize"],
                                  "qbert4rec-content-map")

    try:
        content = parse_overrides(args.content_overrides)
        neighbours = parse_overrides(args.neighbour_overrides)
        for given in (content, neighbours):  # refused here, before anything trains, not at the row
            cfg.override(given)
        mapped = content_map() if "qbert4rec-content-map" in models else None
    except ConfigError as e:
        print(f"error: --content-set / --neighbours-set / --content-map-set / --content-dim: {e}", file=sys.stderr)
        return 2
    for flag, suffix, given in (("--content-set", "-content", content),
                                ("--neighbours-set", "-neighbours", neighbours)):
        not_ranking = [k for k in given if k not in RANKING_KEYS]
        if not_ranking or (any(m.endswith(suffix) for m in models) and not given):
            print(f"error: {flag}: {'; '.join(not_ranking) + ' would retrain' if not_ranking else 'missing'} (the "
                  f"{suffix} rows re-score a finished run: set only {', '.join(RANKING_KEYS)})", file=sys.stderr)
            return 2
    if {"qbert4rec-mixture", "qbert4rec-pseudo-new-mixture"} & set(models) and (
            cfg.model.item_id != "none" or cfg.model.head != "catalogue" or not cfg.fusion.feature_modalities):
        print("error: --models: the mixture rule needs the paper's model (model.item_id: none, "
              "model.head: catalogue) with a text or image modality (data.modalities)", file=sys.stderr)
        return 2
    data = load_data(cfg)
    name = args.dataset_name or (Path(cfg.data.source).name if cfg.data.source != "synthetic" else "synthetic")
    run = {m: args.runs_dir / r for m, r in RUN_OF.items() if r}
    makers = {
        "qbert4rec": lambda: pipeline_row(cfg, data, run["qbert4rec"]),
        "qbert4rec-transfer": lambda: pipeline_row(transfer, data, run["qbert4rec-transfer"]),
        "qbert4rec-pseudo-new": lambda: pipeline_row(pseudo(), data, run["qbert4rec-pseudo-new"]),
        # the same runs, re-scored with the backoff rule's content term (ranking only: nothing trains)
        "qbert4rec-content": lambda: pipeline_row(cfg.override(content), data, run["qbert4rec-content"]),
        "qbert4rec-pseudo-new-content": lambda: pipeline_row(pseudo().override(content), data,
                                                             run["qbert4rec-pseudo-new-content"]),
        "qbert4rec-neighbours": lambda: pipeline_row(cfg.override(neighbours), data, run["qbert4rec-neighbours"]),
        "qbert4rec-pseudo-new-neighbours": lambda: pipeline_row(pseudo().override(neighbours), data,
                                                                run["qbert4rec-pseudo-new-neighbours"]),
        "qbert4rec-mixture": lambda: pipeline_row(cfg, data, run["qbert4rec-mixture"], fit=True),
        "qbert4rec-pseudo-new-mixture": lambda: pipeline_row(pseudo(), data, run["qbert4rec-pseudo-new-mixture"],
                                                             fit=True),
        "qbert4rec-content-map": lambda: pipeline_row(mapped, data, run["qbert4rec-content-map"]),
        "hybrid": lambda: pipeline_row(hybrid, data, run["hybrid"]),
        "sasrec": lambda: baseline_row("sasrec", cfg, data, run["sasrec"], args.quick),
        "bert4rec": lambda: baseline_row("bert4rec", cfg, data, run["bert4rec"], args.quick),
        "popularity": lambda: heuristic_row(cfg, data, popularity_fn(cfg, data)),
        "content_knn": lambda: heuristic_row(cfg, data, content_knn_fn(cfg, data)),
    }
    assert makers.keys() == RUN_OF.keys()
    # the config whose dataset keys an unfinished run in each directory is checked against
    config_of = {"qbert4rec": cfg, "qbert4rec-pseudo-new": cfg, "qbert4rec-transfer": transfer, "hybrid": hybrid,
                 "qbert4rec-content-map": mapped, "sasrec": None, "bert4rec": None}
    try:  # before anything trains: a refusal late in the list would lose the rows before it
        for model in models:
            if RUN_OF[model]:
                _refuse_other_dataset(run[model], data, config_of[RUN_OF[model]])
    except OtherDataset as e:
        print(f"error: --runs-dir: {e}", file=sys.stderr)
        return 2
    meta = benchmark_meta("benchmarks/cold_start.py", argv, REPO)
    rows, failed = [], []
    for model in models:
        log.info("cold-start row: %s", model)
        try:
            res = makers[model]()
        except NothingToFit as e:  # the other rows are still written
            print(f"error: {model}: {e}", file=sys.stderr)
            failed.append(model)
            continue
        for slice_name in ("new", "known"):
            rows.append({"dataset": name, "model": named.get(model, model), "stage3_item_table": res["stage3_item_table"],
                         "slice": slice_name, "fraction": args.fraction, "seed": args.seed, **meta,
                         "test": res["slices"]["test"]["history_kept"][slice_name],
                         "test_excl_history": res["slices"]["test"]["history_excluded"][slice_name],
                         "valid": res["slices"]["valid"]["history_kept"][slice_name],
                         "valid_excl_history": res["slices"]["valid"]["history_excluded"][slice_name],
                         **({"new_items": res["new_items"]} if res.get("new_items") else {}),
                         **({"new_target_concentration": res["concentration"]["kept"],
                             "new_target_concentration_excl_history": res["concentration"]["excluded"]}
                            if slice_name == "new" else {})})
    out = args.runs_dir if args.quick else DEFAULT_OUT
    print(render(write_results(out, rows)))
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
