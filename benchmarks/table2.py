"""Benchmark: a Table 2 row (paper Sec. 4.2), the mean ± std over seeds of one final setup.

    python benchmarks/table2.py --config configs/instruments-tuned.yaml --model qbert4rec \
        --runs-dir runs/table2                                  # the paper's model, seeds 42 43 44
    python benchmarks/table2.py --config configs/instruments-hybrid.yaml --model hybrid --runs-dir runs/table2
    python benchmarks/table2.py --config configs/instruments.yaml --baseline sasrec --runs-dir runs/table2
    python benchmarks/table2.py --quick --runs-dir /tmp/t2     # embedded synthetic data, few epochs
    python benchmarks/table2.py --config configs/instruments-tuned.yaml \
        --hybrid-config configs/instruments-hybrid.yaml --set data.source=../shared/datasets/amazon-games \
        --all-rows --runs-dir runs/table2                        # one domain's four rows, one command

A setup is chosen on valid first (search runs keep ``eval.test=false``); this command then trains
it once per seed with test on and scores test once per seed. Each run lives in
``RUNS_DIR/<dataset>/<model>/seed<S>/``; a finished run of the same settings is read, not re-run (so the
command resumes, and a run made by ``qbert pipeline`` with the same config counts). ``--baseline``
trains one of our ID-only baselines (SASRec, BERT4Rec at RecBole's settings) on ``--config``'s
data instead of the pipeline; a baseline seed stopped part-way continues from its last epoch's
checkpoint when that was made with the same settings and data.

Writes ``benchmarks/results/table2.{json,md}`` (``--quick``: under ``RUNS_DIR``), replacing the
row of the same dataset and model and keeping the others. Each row holds the means over seeds of
valid NDCG@10 and of the test metrics under both ranking protocols (history kept, as RecBole and
the paper; history excluded), the standard deviations, the per-seed numbers, the command and the
git commit.

Each finished seed is also kept in ``benchmarks/results/table2_seeds.json`` (its numbers, the
settings compared, ranking ones included, the data fingerprints, git commit, machine, device,
precision and date), so a row can be completed across machines and sessions whose runs
directories are gone: a seed with no finished run is read from its record when the settings and
the data are the same, and only trained when neither exists (``--ignore-records``: train it).
Records of other settings stay beside it. ``--collect`` trains nothing: it writes the records of
the finished runs it finds, and the row when every seed has a run or a record (exit status 3
when some seed has neither).

``--all-rows`` runs a domain's four rows one after the other: the paper's model (``--config``),
the hybrid (``--hybrid-config``, default ``--config`` with item IDs), SASRec and BERT4Rec, each
with the same ``--set`` overrides, seeds and runs directory, and each row recording the command
that makes it alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.baselines import BaselineConfig, run_baseline  # noqa: E402
from qbert.config import ConfigError, parse_overrides  # noqa: E402
from qbert.eval.report import PROTOCOL_KEYS  # noqa: E402
from qbert.pipeline import HYBRID_OVERRIDES, PipelineConfig, load_data, quickstart_config, run_pipeline  # noqa: E402
from qbert.pipeline.runs import comparable_settings, finished_test_run  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text, locked  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

log = logging.getLogger("bench.table2")
DEFAULT_OUT = REPO / "benchmarks" / "results"
TEST_METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
SEED_RECORDS = "table2_seeds.json"


def _finished_baseline(run: Path, bcfg: BaselineConfig) -> dict[str, Any] | None:
    import yaml

    if not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
        return None
    mine = {k: v for k, v in json.loads(json.dumps(bcfg.to_dict(), default=str)).items() if k != "num_threads"}
    theirs = {k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items() if k != "num_threads"}
    return json.loads((run / "metrics.json").read_text()) if mine == theirs else None


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def run_record(run: Path, metrics: dict[str, Any], baseline: bool) -> dict[str, Any]:
    """What a seed record keeps of a finished run besides its numbers: provenance and data."""
    info = metrics if baseline else json.loads((run / "summary.json").read_text())
    data = info.get("data", {})
    timing = metrics["timing"]["train_seconds"] if baseline else info.get("timings", {}).get("total")
    precision = (metrics.get("config") or {}).get("precision") if baseline else info.get("precision")
    return {"git_commit": info.get("git_commit"), "machine": info.get("machine"), "seconds": timing,
            "device": info.get("device"), "precision": precision,
            "data": {"target": data.get("fingerprint"),
                     "pretrain_sources": [d["fingerprint"] for d in data.get("pretrain_sources", [])]},
            "run": str(run), "started_utc": info.get("started_utc"),
            "stage3_item_table": True if baseline else metrics["stage3_item_table"]}


def read_seed_records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plain(settings), sort_keys=True).encode()).hexdigest()[:16]


def save_seed_record(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to ``path``, replacing the one of the same dataset, model, seed and settings
    (a record of the same run is kept as it is: reading a finished run again changes nothing);
    records of other settings stay."""
    key = lambda r: (r["dataset"], r["model"], r["seed"], _settings_key(r["settings"]))  # noqa: E731
    same_run = lambda r: {k: v for k, v in r.items() if k not in ("command", "date")}  # noqa: E731
    with locked(path):
        old = read_seed_records(path)
        if any(same_run(r) == same_run(record) for r in old):
            return
        records = [r for r in old if key(r) != key(record)]
        records = sorted([*records, record], key=key)
        atomic_write_json(path, {"records": records})


def find_seed_record(records: list[dict[str, Any]], dataset: str, model: str, seed: int,
                     settings: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record of this row's seed made with the same settings, else None. A setting the record
    lacks matches when ``settings`` has it at its value in ``defaults`` (a setting added to the code
    after the record was made, left at the default that reproduces the code of then)."""
    mine = _plain(settings)
    base = _plain(defaults or {})

    def same(theirs: dict[str, Any]) -> bool:
        return theirs == {k: v for k, v in mine.items() if k in theirs or k not in base or v != base[k]}

    ours = [r for r in records if (r["dataset"], r["model"], r["seed"]) == (dataset, model, seed)]
    return next((r for r in ours if r["settings"] == mine), None) or next((r for r in ours if same(r["settings"])), None)


def seed_result(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one seed's run that a Table 2 row keeps."""
    test = metrics["by_protocol"]["test"]
    return {"valid": {"NDCG@10": metrics["valid"]["NDCG@10"]},
            "test": {k: test[PROTOCOL_KEYS["kept"]][k] for k in TEST_METRICS},
            "test_excl_history": {k: test[PROTOCOL_KEYS["excluded"]][k] for k in TEST_METRICS},
            "best_epoch": metrics.get("best_epoch")}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and (population-free, ddof=1) standard deviations over seeds, per part and metric."""
    out: dict[str, Any] = {}
    for part in ("valid", "test", "test_excl_history"):
        values = {k: np.array([s[part][k] for s in per_seed]) for k in per_seed[0][part]}
        out[part] = {k: float(v.mean()) for k, v in values.items()}
        out[f"{part}_std"] = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | model | item-ID table in stage 3 | seeds | valid NDCG@10 | HR@1 | HR@5 | HR@10 | NDCG@5 | "
             "NDCG@10 | HR@10 (history excl.) | NDCG@10 (history excl.) |", "|---|---|---|---|" + "---|" * 8]
    for r in rows:
        t, s, e, es = r["test"], r["test_std"], r["test_excl_history"], r["test_excl_history_std"]
        table = {True: "yes", False: "no", None: "n/a"}[r["stage3_item_table"]]
        one = len(r["seeds"]) == 1  # no spread to show
        pm = lambda v, sd: f"{v:.4f}" if one else f"{v:.4f} ± {sd:.4f}"  # noqa: E731
        cells = [pm(t[k], s[k]) for k in TEST_METRICS] + [pm(e[k], es[k]) for k in ("HR@10", "NDCG@10")]
        lines.append(f"| {r['dataset']} | {r['model']} | {table} | {len(r['seeds'])} | "
                     f"{pm(r['valid']['NDCG@10'], r['valid_std']['NDCG@10'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merge_rows(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``path`` with ``row`` replacing the one of the same dataset and model."""
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if (r["dataset"], r["model"]) != (row["dataset"], row["model"])]
    return rows + [row]


def _all_rows(args: argparse.Namespace) -> int:
    """The four rows of one domain, each by its own command line (so each row records it)."""
    common = ["--runs-dir", str(args.runs_dir), "--seeds", *map(str, args.seeds),
              *(["--dataset-name", args.dataset_name] if args.dataset_name else []),
              *[a for o in args.overrides for a in ("--set", o)], *(["--quick"] if args.quick else []),
              *(["--threads", str(args.threads)] if args.threads else []), *(["--collect"] if args.collect else []),
              *(["--ignore-records"] if args.ignore_records else [])]
    config = ["--config", str(args.config)] if args.config else []
    hybrid = ["--config", str(args.hybrid_config)] if args.hybrid_config else \
        [*config, *[a for k, v in HYBRID_OVERRIDES.items() for a in ("--set", f"{k}={v}")]]
    rows = [[*config, "--model", "qbert4rec"], [*hybrid, "--model", "hybrid"],
            [*config, "--baseline", "sasrec"], [*config, "--baseline", "bert4rec"]]
    missing = 0
    for row in rows:
        log.info("row: %s", " ".join(row))
        rc = main([*row, *common])
        if rc == 3 and args.collect:  # a row not complete yet: the others are still collected
            missing = 3
        elif rc:
            return rc
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="pipeline config (default: the synthetic quick start)")
    ap.add_argument("--model", default=None, help="row name (default: qbert4rec, or the baseline's name)")
    ap.add_argument("--baseline", choices=("sasrec", "bert4rec"), default=None,
                    help="train this ID-only baseline on --config's data instead of the pipeline")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--dataset-name", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline config override (repeatable)")
    ap.add_argument("--quick", action="store_true", help="synthetic data, few epochs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: record the finished runs, write the row if every seed has a run or record")
    ap.add_argument("--ignore-records", action="store_true",
                    help="train a seed with no finished run even when table2_seeds.json has its record")
    ap.add_argument("--all-rows", action="store_true",
                    help="the paper's model, the hybrid, SASRec and BERT4Rec, one after the other")
    ap.add_argument("--hybrid-config", type=Path, default=None,
                    help="with --all-rows: the hybrid's config (default: --config with item IDs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.all_rows or args.hybrid_config:
        if not args.all_rows or args.model or args.baseline:
            print("error: --all-rows names its rows itself (no --model or --baseline); --hybrid-config goes "
                  "with --all-rows", file=sys.stderr)
            return 2
        return _all_rows(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = PipelineConfig.from_yaml(args.config) if args.config else quickstart_config()
        if args.quick:
            args.overrides = ["finetune.epochs=3", "pretrain.epochs=1", "plots=false", *args.overrides]
        base = base.override({"eval.test": True})
        if args.overrides:
            base = base.override(parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model or args.baseline or "qbert4rec"
    name = args.dataset_name or (Path(base.data.source).name.removeprefix("amazon-")
                                 if base.data.source != "synthetic" else "synthetic")
    out = args.runs_dir if args.quick else DEFAULT_OUT
    records_path = out / SEED_RECORDS
    data = load_data(base) if args.baseline else None
    fingerprints: dict[str, Any] = {}

    def data_now() -> dict[str, Any]:  # the data this command reads, fingerprinted once and only if needed
        if not fingerprints:
            d = data or load_data(base)
            fingerprints.update(target=d.target.fingerprint(),  # a baseline trains on the target alone
                                pretrain_sources=[] if args.baseline else [x.fingerprint() for x in d.sources])
        return fingerprints

    per_seed, missing = [], []
    for seed in args.seeds:
        run = args.runs_dir / name / model / f"seed{seed}"  # the dataset in the path: rows never share runs
        if args.baseline:
            bcfg = BaselineConfig(model=args.baseline, max_len=base.data.max_len, seed=seed, progress=False,
                                  **({"epochs": 3, "patience": 0} if args.quick else {}))
            settings = {k: v for k, v in bcfg.resolved().to_dict().items() if k != "num_threads"}
            defaults = BaselineConfig(model=args.baseline).resolved().to_dict()
            metrics = _finished_baseline(run, bcfg.resolved())
        else:
            cfg = base.override({"seed": seed})
            settings = comparable_settings(cfg, ranking=True)  # test ranks depend on the ranking settings
            defaults = comparable_settings(PipelineConfig(), ranking=True)
            metrics = finished_test_run(run, cfg)
        record = None
        if metrics is None and not args.ignore_records:
            record = find_seed_record(read_seed_records(records_path), name, model, seed, settings, defaults)
            if record is not None and record["data"] != data_now():
                log.warning("%s, seed %d: the record in %s was made on other data; not used", model, seed,
                            records_path)
                record = None
            if record is not None:
                log.info("%s, seed %d: read from %s (git %s, %s)", model, seed, records_path,
                         str(record["git_commit"])[:7], record["date"])
        if metrics is None and record is None:
            if args.collect:
                missing.append(seed)
                continue
            log.info("%s, seed %d: %s", model, seed, run)
            metrics = (run_baseline(bcfg, data.target, run, data_source=base.data.source, resume=True)
                       if args.baseline else run_pipeline(cfg, run, overwrite=True))
        if record is None and metrics is not None and not args.ignore_records:
            # a run whose record was made before a setting was added (at its default now): keep that
            # record rather than add a second one of the same run under the longer settings
            same = find_seed_record(read_seed_records(records_path), name, model, seed, settings, defaults)
            if (same is not None and same["settings"] != _plain(settings) and same["data"] == data_now()
                    and same["result"] == seed_result(metrics)):
                record = same
        if record is None:
            meta = benchmark_meta("benchmarks/table2.py", argv, REPO)  # its git and machine: the run's, below
            record = {"dataset": name, "model": model, "seed": seed, "settings": _plain(settings),
                      "result": seed_result(metrics), "command": meta["command"], "date": meta["date"],
                      **run_record(run, metrics, bool(args.baseline))}
            save_seed_record(records_path, record)
        per_seed.append({"seed": seed, "run": record["run"], "git_commit": record["git_commit"], **record["result"]})
        item_table = record["stage3_item_table"]
    if missing:
        print(f"no finished run or record for seeds {' '.join(map(str, missing))} of {name}/{model} "
              f"(without --collect they are trained); the row was not written", file=sys.stderr)
        return 3
    row = {"dataset": name, "model": model, "stage3_item_table": item_table, "seeds": list(args.seeds),
           **aggregate(per_seed), "per_seed": per_seed,
           **benchmark_meta("benchmarks/table2.py", argv, REPO)}
    with locked(out / "table2.json"):  # another row's command may finish at the same time
        rows = merge_rows(out / "table2.json", row)
        atomic_write_json(out / "table2.json", {"rows": rows})
        atomic_write_text(out / "table2.md", render(rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
