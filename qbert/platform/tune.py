"""Ray Tune sweeps: the paper's hyper-parameter figures (Figs. 3-5) and ablation tables (Tables 3-5).

A sweep file names a base pipeline config and one or more *grids*; each grid is a set of dotted
config overrides (``seqrec.layers: [1, 2, 3, 4]``; several keys in one grid form their
product). All trials of all grids go into one ``Tuner(trial_fn, param_space={"trial":
tune.grid_search([...])}, tune_config=TuneConfig(max_concurrent_trials=k))`` — the trainable
is a driver function (which may itself start a ``TorchTrainer`` per stage), never the
deprecated ``Tuner(trainer)``.

Every trial is a child MLflow run of the sweep's parent run. Trials are compared on the
*valid* split (``metric``); test numbers are reported beside them, never used for selection.
The sweep writes ``results.csv``, ``results.md`` (one paper-style table per grid, best valid
row marked) and ``plot_<grid>.png`` (metric vs hyper-parameter) into the sweep directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, model_validator

from qbert.config import Config, ConfigError, load_yaml
from qbert.platform.tracking import TrackingConfig
from qbert.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

REPORT_METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


class GridConfig(Config):
    """One figure or ablation table.

    Either ``params`` (dotted keys -> values; the product over keys) or ``cases`` (explicit
    rows, each a dict of dotted overrides plus an optional ``label``; for rows that must set
    several keys together, e.g. ``data.modalities`` and ``fusion.modalities``).
    """

    name: str
    title: str | None = None
    params: dict[str, list[Any]] | None = None
    cases: list[dict[str, Any]] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # every trial of this grid (after the sweep's)

    @model_validator(mode="after")
    def _one_form(self) -> "GridConfig":
        if (self.params is None) == (self.cases is None):
            raise ValueError(f"grid '{self.name}' needs exactly one of params or cases")
        if self.params is not None and (not self.params or any(len(v) == 0 for v in self.params.values())):
            raise ValueError(f"grid '{self.name}' needs at least one key with at least one value")
        if self.cases is not None and (not self.cases or any(not {k for k in c if k != "label"} for c in self.cases)):
            raise ValueError(f"grid '{self.name}': every case needs at least one override")
        return self


class SweepConfig(Config):
    """A sweep file (see ``configs/sweeps/``)."""

    name: str = "sweep"
    base_config: str  # pipeline config file, relative to the sweep file
    overrides: dict[str, Any] = Field(default_factory=dict)  # applied to every trial (e.g. tiny epochs)
    grids: list[GridConfig]
    metric: str = "NDCG@10"  # selection metric, read from the *valid* split
    mode: str = "max"
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    tracking: TrackingConfig = TrackingConfig()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepConfig":
        cfg = cls.from_dict(load_yaml(path), source=str(path))
        base = Path(cfg.base_config)
        if not base.is_absolute():
            rel = (Path(path).parent / base)
            base = rel if rel.is_file() else base  # relative to the sweep file, else to the cwd
        if not base.is_file():  # a bundled sweep copied elsewhere (`qbert configs copy`): its base by name
            from qbert.bundled import bundled_names, resolve_config

            if Path(cfg.base_config).stem in bundled_names():
                base = resolve_config(Path(cfg.base_config).stem)
        return cfg.model_copy(update={"base_config": str(base)})


def expand_trials(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every trial as ``{"grid", "index", "overrides"}`` (grid values in file order)."""
    trials = []
    for grid in sweep.grids:
        if grid.cases is not None:
            for i, case in enumerate(grid.cases):
                ov = {k: v for k, v in case.items() if k != "label"}
                trials.append({"grid": grid.name, "index": i, "overrides": ov, "grid_overrides": grid.overrides,
                               "label": case.get("label") or trial_label(ov)})
            continue
        keys = list(grid.params)
        for i, values in enumerate(itertools.product(*(grid.params[k] for k in keys))):
            ov = dict(zip(keys, values))
            trials.append({"grid": grid.name, "index": i, "overrides": ov, "grid_overrides": grid.overrides,
                           "label": trial_label(ov)})
    return trials


def trial_config(base: Config, sweep_overrides: dict[str, Any], trial: dict[str, Any]) -> Config:
    """A trial's config: base, then the sweep's overrides, the grid's, and the trial's own values."""
    return base.override(sweep_overrides).override(trial.get("grid_overrides") or {}).override(trial["overrides"])


def trial_label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in overrides.items())


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return str(v)


# TrialFn(cfg, out_dir, tracked_run or None) -> {"valid": {...}, "test": {...}, ...}
TrialFn = Callable[[Any, Path, Any], dict[str, Any]]


def pipeline_trial(cfg: Any, out_dir: Path, run: Any) -> dict[str, Any]:
    """The default trial: the local pipeline in the trial's process, each stage logging to the child run."""
    from qbert.pipeline import run_pipeline
    from qbert.platform.tracking import MLflowCallback

    def callbacks(stage: str) -> list:
        return [MLflowCallback(run, prefix=f"{stage}/")] if run is not None else []

    return run_pipeline(cfg, out_dir, callbacks_factory=callbacks)


def _trainable(trial_fn: TrialFn, config_cls: type[Config], base: dict[str, Any], fixed: dict[str, Any],
               sweep_dir: str, tracking: dict[str, Any], parent: dict[str, Any] | None) -> Callable[[dict], None]:
    cwd = os.getcwd()

    def run_trial(config: dict[str, Any]) -> None:
        from ray import tune

        from qbert.platform.tracking import start_run

        os.chdir(cwd)  # Tune may start trials in their own dir; config paths are relative to the launch dir
        t = config["trial"]
        cfg = trial_config(config_cls.from_dict(base, source="sweep base"), fixed, t)
        out = Path(sweep_dir) / "trials" / f"{t['grid']}-{t['index']:02d}"
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")
        run = None
        tcfg = TrackingConfig.from_dict(tracking)
        if tcfg.enabled:
            if parent and not tcfg.tracking_uri:
                tcfg = tcfg.model_copy(update={"tracking_uri": parent["tracking_uri"]})
            run = start_run(tcfg, out, f"{t['grid']}: {t['label']}", config=cfg,
                            parent_run_id=parent["run_id"] if parent else None,
                            tags={"qbert.sweep.grid": t["grid"], **{f"qbert.sweep.{k}": v for k, v in t["overrides"].items()}})
        try:
            result = trial_fn(cfg, out, run)
        except BaseException:
            if run is not None:
                run.end("FAILED")
            raise
        row = flat_result(result)
        if run is not None:
            run.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=0, prefix="final/")
            run.log_run_dir(out)
            run.end()
        atomic_write_json(out / "trial_result.json", {"trial": t, "metrics": row})
        tune.report({**row, "grid": t["grid"], "index": t["index"]})

    return run_trial


def flat_result(result: dict[str, Any]) -> dict[str, float]:
    """``{"valid": {"NDCG@10": x}, "test": {...}}`` -> ``{"valid/NDCG@10": x, "test/...": ...}``."""
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        for k, v in (result.get(split) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{split}/{k}"] = float(v)
    return out


def run_sweep(sweep: SweepConfig, out_dir: str | os.PathLike, trial_fn: TrialFn, config_cls: type[Config],
              base_override: dict[str, Any] | None = None, storage_path: str | None = None) -> list[dict[str, Any]]:
    """Run every trial with Ray Tune; write results.csv/md and plots; return the result rows."""
    import ray
    from ray import tune

    from qbert.platform.storage import ray_storage_path
    from qbert.platform.tracking import start_run

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = config_cls.from_yaml(sweep.base_config)
    if base_override:
        base_cfg = base_cfg.override(base_override)
    trials = expand_trials(sweep)
    for t in trials:  # fail before any training when a grid names a wrong key or value
        trial_config(base_cfg, sweep.overrides, t)
    sweep.to_yaml(out / "sweep.yaml")
    base_cfg.to_yaml(out / "base_config.yaml")

    parent = None
    tracking = sweep.tracking
    if tracking.enabled:
        run = start_run(tracking, out, f"sweep {sweep.name}", config=base_cfg,
                        tags={"qbert.sweep": sweep.name, "qbert.sweep.trials": len(trials)})
        parent = {"tracking_uri": run.tracking_uri, "run_id": run.run_id}
    if not ray.is_initialized():
        ray.init()
    trainable = tune.with_resources(
        _trainable(trial_fn, config_cls, base_cfg.to_dict(), sweep.overrides, str(out), tracking.to_dict(), parent),
        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=sweep.name, storage_path=ray_storage_path(storage_path or out / "tune")),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(trials)} sweep trials failed; first: {errors[0]}")
    rows = []
    for r in grid:
        t = r.config["trial"]
        rows.append({"grid": t["grid"], "index": t["index"], "label": t["label"],
                     "overrides": t["overrides"], **{k: v for k, v in r.metrics.items() if "/" in k}})
    rows.sort(key=lambda r: ([g.name for g in sweep.grids].index(r["grid"]), r["index"]))
    mark_best(rows, sweep.metric, sweep.mode)
    export_results(rows, sweep, out)
    if parent is not None:
        run.log_metrics(_best_summary(rows, sweep.metric), step=0)
        run.log_run_dir(out)
        run.end()
    return rows


def mark_best(rows: list[dict[str, Any]], metric: str, mode: str) -> None:
    """Per grid, flag the trial with the best *valid* metric."""
    key = f"valid/{metric}"
    for g in {r["grid"] for r in rows}:
        cand = [r for r in rows if r["grid"] == g and isinstance(r.get(key), float) and not math.isnan(r[key])]
        for r in rows:
            if r["grid"] == g:
                r["best"] = False
        if cand:
            best = (max if mode == "max" else min)(cand, key=lambda r: r[key])
            best["best"] = True


def _best_summary(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    return {f"best/{r['grid']}/{s}_{metric}": r[f"{s}/{metric}"] for r in rows if r.get("best")
            for s in ("valid", "test") if f"{s}/{metric}" in r}


def export_results(rows: list[dict[str, Any]], sweep: SweepConfig, out: Path) -> None:
    """results.csv (one row per trial), results.md (paper-style tables), plot_<grid>.png."""
    import csv
    import io

    metric_cols = [f"{s}/{m}" for s in ("valid", "test") for m in REPORT_METRICS]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["grid", "index", "label", "overrides", "best", *metric_cols])
    for r in rows:
        w.writerow([r["grid"], r["index"], r["label"], json.dumps(r["overrides"]), r.get("best", False),
                    *(_num(r.get(c)) for c in metric_cols)])
    atomic_write_text(out / "results.csv", buf.getvalue())

    lines = [f"# Sweep `{sweep.name}`", "",
             f"Selection on valid {sweep.metric} ({sweep.mode}); ** marks each grid's selected trial. "
             "Test metrics are reported, never used for selection.", ""]
    for grid in sweep.grids:
        lines += [f"## {grid.title or grid.name}", "",
                  "| setting | " + " | ".join(f"valid {m}" for m in ("HR@10", "NDCG@10")) + " | "
                  + " | ".join(f"test {m}" for m in REPORT_METRICS) + " |",
                  "|---|" + "---:|" * (2 + len(REPORT_METRICS))]
        for r in (r for r in rows if r["grid"] == grid.name):
            label = f"**{r['label']}**" if r.get("best") else r["label"]
            cells = [_num(r.get(f"valid/{m}")) for m in ("HR@10", "NDCG@10")] + [_num(r.get(f"test/{m}")) for m in REPORT_METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        plot_grid(rows, grid, sweep.metric, out / f"plot_{grid.name}.png")
        lines += [f"![{grid.name}](plot_{grid.name}.png)", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def plot_grid(rows: list[dict[str, Any]], grid: GridConfig, metric: str, path: Path) -> None:
    """Metric vs hyper-parameter (line for one numeric key, bars otherwise), valid and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbert.utils.io import atomic_path

    sel = [r for r in rows if r["grid"] == grid.name]
    keys = list(grid.params or {})
    numeric = len(keys) == 1 and all(isinstance(r["overrides"][keys[0]], (int, float)) for r in sel)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for split, style in (("valid", "o-"), ("test", "s--")):
        for m in ("HR@10", metric) if metric != "HR@10" else ("HR@10",):
            ys = [r.get(f"{split}/{m}", float("nan")) for r in sel]
            if numeric:
                ax.plot([r["overrides"][keys[0]] for r in sel], ys, style, label=f"{split} {m}")
            else:
                ax.plot(range(len(sel)), ys, style, label=f"{split} {m}")
    if numeric:
        ax.set_xlabel(keys[0])
    else:
        ax.set_xticks(range(len(sel)), [r["label"] for r in sel], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("metric")
    ax.set_title(grid.title or grid.name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    try:
        return SweepConfig.load(path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - pydantic errors are ConfigError already
        raise ConfigError(f"invalid sweep file {path}: {e}") from e
