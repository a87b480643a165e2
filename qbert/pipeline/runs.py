"""Run directories: reuse of finished stages, the driver, and reloading a finished run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbert.config import ConfigError, flatten_dict
from qbert.data.errors import DataError
from qbert.pipeline.config import METRIC_KEYS, CallbacksFactory, PipelineConfig
from qbert.pipeline.data import (CONTENT_FILE, PipelineData, check_inputs, load_data, read_item_content, target_content,
                                 target_split)
from qbert.pipeline.ownership import (check_artifacts, claim_checkpoints, read_manifest, record_artifacts, run_id,
                                      settings_hash)
from qbert.pipeline.reports import finish_run
from qbert.pipeline.stages import REGISTRY, STAGES, read_codes
from qbert.seqrec.stage import build_model, evaluate_split
from qbert.utils.io import atomic_path, load_weights
from qbert.utils.runtime import git_commit, seed_everything

log = logging.getLogger(__name__)

# where a stage ran, not what it computed; and settings only ranking reads (no stage output depends on them)
_WHERE_KEYS = {"device", "progress"}
NEW_ITEM_KEYS = ("new_items", "new_item_weight", "new_item_offset", "new_item_content", "new_item_neighbours",
                 "new_item_peers_before_repeat", "new_item_share", "new_item_temperature", "new_item_recency", "new_item_cluster")  # model.* settings only ranking reads
_RUNTIME_KEYS = _WHERE_KEYS | {"code_score_weight", *NEW_ITEM_KEYS}
# settings added after run directories existed: they enter a stage's hash only when set to another
# value than their default, so those directories keep their hashes (stay resumable and reusable)
_HASHED_WHEN_SET = {"finetune.pseudo_new", "pretrain.num_negatives", "finetune.num_negatives", "model.content_dim",
                    "model.tie_prefix"}


def _stage_inputs(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The settings ``stage``'s output depends on (its own and every earlier stage's), by section.

    A key a stage ``ignores`` enters at its default value (so its hash is the one of a config
    that leaves it unset) until a later stage names it in ``depends_on`` (then its real value)."""
    d = cfg.to_dict()
    defaults = type(cfg)().to_dict()

    def clean(v: Any) -> Any:
        return {k: clean(x) for k, x in v.items() if k not in _RUNTIME_KEYS} if isinstance(v, dict) else v

    out: dict[str, Any] = {}

    def put(key: str, source: dict[str, Any]) -> None:  # out's value at a dotted key := source's
        *parents, leaf = key.split(".")
        dst = out
        for p in parents:
            dst, source = dst[p], source[p]
        dst[leaf] = clean(source[leaf])

    for s in STAGES[: STAGES.index(stage) + 1]:
        for dep in REGISTRY[s].depends_on:
            put(dep, d)  # a dotted key: one key of a section an earlier stage read, its real value
            for key in REGISTRY[s].ignores:
                if key.split(".")[0] == dep:
                    put(key, defaults)
    for key in _HASHED_WHEN_SET:
        section, leaf = key.split(".")
        if section in out and out[section].get(leaf) == defaults[section][leaf]:
            del out[section][leaf]
    return out


def _require_same_stage_settings(cfg: PipelineConfig, made_with: PipelineConfig, stage: str, where: str) -> None:
    """ConfigError naming the first settings ``stage``'s output depends on that differ between the
    config it was made with and ``cfg``."""
    mine, theirs = _stage_inputs(cfg, stage), _stage_inputs(made_with, stage)
    if mine != theirs:
        a, b = flatten_dict(mine), flatten_dict(theirs)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{where}: its {stage} stage was made with other settings "
                          f"({', '.join(f'{k}: {b.get(k)!r} there, {a.get(k)!r} here' for k in diff[:3])})")


def check_reuse(cfg: PipelineConfig) -> None:
    """Before anything runs: every reused stage's source was made with the same settings (for it
    and every stage before it) and has its artifacts. ConfigError names the first difference."""
    if not cfg.reuse.stages:
        return
    src = Path(cfg.reuse.from_run or "")
    src_cfg_path = src / "config.yaml"
    if not src_cfg_path.is_file():
        raise ConfigError(f"reuse.from_run: no finished run at {src} (missing {src_cfg_path})")
    src_cfg = PipelineConfig.from_yaml(src_cfg_path)
    for stage in cfg.reuse.stages:
        _require_same_stage_settings(cfg, src_cfg, stage, f"reuse.from_run {src}")
        if stage == "pretrain" and cfg.pretrain.strategy == "none":
            continue
        missing = [n for n in REGISTRY[stage].writes if not (src / n).is_file()]
        if missing:
            raise ConfigError(f"reuse.from_run {src}: missing {', '.join(missing)} of the {stage} stage")


def reuse_stage(cfg: PipelineConfig, stage: str, out_dir: str | Path) -> dict[str, Any]:
    """Copy ``stage``'s artifacts from ``cfg.reuse.from_run`` into ``out_dir``; return its report
    (the source's, plus ``reused_from``). :func:`check_reuse` must have passed."""
    src = Path(cfg.reuse.from_run or "")
    if stage == "pretrain" and cfg.pretrain.strategy == "none":
        return {"strategy": "none", "skipped": True}
    out = Path(out_dir)
    for name in REGISTRY[stage].writes:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src / name, tmp)
    report: dict[str, Any] = {}
    metrics = src / "metrics.json"
    if metrics.is_file():
        report = json.loads(metrics.read_text()).get("stages", {}).get(stage, {})
    elif (src / f"{stage}_report.json").is_file():
        report = json.loads((src / f"{stage}_report.json").read_text())
    return {**report, "reused_from": str(src.resolve())}


def config_differences(path: Path, cfg: PipelineConfig, ignore_reuse: bool = False) -> list[str] | None:
    """Dotted keys where the run config at ``path`` differs from ``cfg`` (settings of where a run
    executes, such as device, progress bars and Ray resources, and ranking-only settings, aside);
    None when there is no config there. ``ignore_reuse``: also the run that reused stages came
    from (they were made with the same settings, so a *finished* run computed the same; a run to
    resume is not the same, its later checkpoints were trained on the other stages' outputs)."""
    if not path.is_file():
        return None
    try:
        theirs = comparable_settings(PipelineConfig.from_yaml(path), ignore_reuse)
    except ConfigError:
        return [f"{path.name} (unreadable with this version)"]
    mine = comparable_settings(cfg, ignore_reuse)
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def comparable_settings(cfg: PipelineConfig, ignore_reuse: bool = True, ranking: bool = False) -> dict[str, Any]:
    """``cfg`` as dotted keys, without the settings of where a run executes and ranking-only ones
    (what :func:`config_differences` compares; ``ignore_reuse``: also without ``reuse.*``;
    ``ranking``: with the ranking-only ones, which the run's scores depend on)."""
    skipped = ("resources.", "reuse.") if ignore_reuse else ("resources.",)
    drop = _WHERE_KEYS if ranking else _RUNTIME_KEYS
    return {k: v for k, v in flatten_dict(cfg.to_dict()).items()
            if k.split(".")[-1] not in drop and not k.startswith(skipped)}


def finished_test_run(run_dir: str | Path, cfg: PipelineConfig) -> dict[str, Any] | None:
    """``metrics.json`` of a finished run in ``run_dir`` made with ``cfg``'s settings, ranking ones
    included (its scores depend on them), and with test scored, else None (benchmarks read such a
    run instead of training it again)."""
    run = Path(run_dir)
    if not (run / "metrics.json").is_file() or not (run / "config.yaml").is_file():
        return None
    try:
        theirs = comparable_settings(PipelineConfig.from_yaml(run / "config.yaml"), ranking=True)
    except ConfigError:
        return None
    if theirs != comparable_settings(cfg, ranking=True):
        return None
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics if metrics.get("test") else None


class LocalExecutor:
    """Runs each stage in this process, with ``callbacks_factory(stage)``'s callbacks (MLflow, Tune)."""

    def __init__(self, callbacks_factory: CallbacksFactory | None = None):
        self.callbacks_factory = callbacks_factory or (lambda stage: ())

    def run(self, cfg: PipelineConfig, out: Path, data: PipelineData, stages: list[str],
            reports: dict[str, Any]) -> dict[str, float]:
        """Run ``stages`` in order, adding each one's report to ``reports``; return seconds per stage."""
        timings: dict[str, float] = {}
        for stage in stages:
            t0 = time.perf_counter()
            log.info("stage %s", stage)
            reports[stage] = REGISTRY[stage].run(cfg, data, out, self.callbacks_factory(stage))
            timings[stage] = time.perf_counter() - t0
        return timings

    def describe(self) -> dict[str, Any]:
        """Fields the executor adds to ``metrics.json`` and ``summary.json``."""
        return {}


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, callbacks_factory: CallbacksFactory | None = None,
                 resume: bool = True, overwrite: bool = False, executor: Any = None,
                 stages: list[str] | None = None) -> dict[str, Any]:
    """Run every stage in order; return the metrics dict also written to ``metrics.json``.

    The one driver of local, ``ray job submit``, KubeRay and Tune runs: ``executor`` runs the
    stages (default :class:`LocalExecutor` with ``callbacks_factory``;
    :class:`qbert.platform.ray_train.RayExecutor` on Ray Train workers). All inputs are checked
    before the first stage trains. The run holds ``out_dir``'s lock throughout (a second run on it
    fails at once). With ``resume`` an interrupted run of the *same* config continues from its
    stage checkpoints (``resume=False`` discards them); a directory holding a run of another config
    is refused unless ``overwrite`` (which empties it). Stages in ``reuse.stages`` are copied from
    a finished run first.

    ``stages``: run only these, inside a directory that holds the earlier stages' outputs (e.g.
    another fine-tuning config on the same semantic IDs): the settings those outputs depend on must
    equal the directory's; returns the stages' reports instead of writing ``metrics.json``.
    """
    from qbert.utils.rundir import claim_run_dir, run_lock

    executor = executor if executor is not None else LocalExecutor(callbacks_factory)
    out = Path(out_dir).resolve()  # executors on other processes and nodes get absolute paths
    started = time.time()
    commit = git_commit()  # the code this run executes (the tree may change while it trains)
    seed_everything(cfg.seed)
    data = load_data(cfg)
    check_inputs(cfg, data)
    check_reuse(cfg)
    subset = [s for s in STAGES if s in stages] if stages is not None else list(STAGES)
    if stages is not None and (unknown := sorted(set(stages) - set(STAGES))):
        raise ConfigError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    if not subset:
        raise ConfigError("stages is empty: name at least one stage to run")
    partial = subset != list(STAGES)
    with run_lock(out):
        if partial and subset[0] != STAGES[0]:
            _check_partial_run(cfg, out, subset)
        else:
            claim_run_dir(out, config_differences(out / "config.yaml", cfg), overwrite)
        if partial:  # the directory no longer holds the finished run its metrics described
            for name in ("metrics.json", "summary.json"):
                (out / name).unlink(missing_ok=True)
        ckpts = out / "checkpoints"
        if ckpts.exists() and not resume:
            log.info("discarding checkpoints of %s (resume off)", out)
            shutil.rmtree(ckpts)
        cfg.to_yaml(out / "config.yaml")
        rid = run_id(out)
        hashes = {s: settings_hash(_stage_inputs(cfg, s)) for s in STAGES}
        if partial:  # the outputs of the stages it skips are the ones recorded for these settings
            for stage in [s for s in STAGES[: STAGES.index(subset[-1])] if s not in subset]:
                check_artifacts(out, stage, list(REGISTRY[stage].writes), hashes[stage])
        reports: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for stage in cfg.reuse.stages:
            t0 = time.perf_counter()
            log.info("stage %s: reused from %s", stage, cfg.reuse.from_run)
            reports[stage] = reuse_stage(cfg, stage, out)
            source = read_manifest(Path(cfg.reuse.from_run or "")).get("run_id", rid)
            record_artifacts(out, stage, list(REGISTRY[stage].writes), source, hashes[stage])
            timings[stage] = time.perf_counter() - t0
        todo = [s for s in subset if s not in reports]
        for stage in todo:
            claim_checkpoints(out, stage, rid, hashes[stage])
        timings.update(executor.run(cfg, out, data, todo, reports))
        for stage in todo:
            record_artifacts(out, stage, list(REGISTRY[stage].writes), rid, hashes[stage])
        if partial:
            return {s: reports[s] for s in subset}
        return finish_run(cfg, out, data, reports, timings, started, commit,
                          extra={"run_id": rid, **(executor.describe() or {})})


def _check_partial_run(cfg: PipelineConfig, out: Path, subset: list[str]) -> None:
    """Before running ``subset`` alone in ``out``: every stage it skips (before its last) has its
    outputs there, made with the settings ``cfg`` gives them (ConfigError naming the first
    differences); a stage it runs whose settings changed loses its checkpoints (they belong to the
    other settings, and resuming them would bring back that run's weights and optimizer)."""
    path = out / "config.yaml"
    skipped = [s for s in STAGES[: STAGES.index(subset[-1])] if s not in subset]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the earlier stages ({', '.join(skipped)}) in {out} first")
    theirs = PipelineConfig.from_yaml(path)
    for stage in skipped:
        _require_same_stage_settings(cfg, theirs, stage, str(out))
        optional = {"pretrain.pt"} if cfg.pretrain.strategy == "none" or cfg.pretrain.epochs == 0 else set()
        missing = [f for f in REGISTRY[stage].writes if f not in optional and f != "test_ranks.parquet"
                   and not (out / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{out}: missing {', '.join(missing)} of the {stage} stage: run it first")
    for stage in subset:
        if _stage_inputs(cfg, stage) != _stage_inputs(theirs, stage) and (out / "checkpoints" / stage).exists():
            log.info("discarding the %s checkpoints of %s (its settings changed)", stage, out)
            shutil.rmtree(out / "checkpoints" / stage)




def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, config) of a finished pipeline run, rebuilt from ``model.pt`` and its semantic IDs."""
    model, cfg, _ = _load_run(run_dir, device)
    return model, cfg


def _load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, config, the rest of the ``model.pt`` payload), reading the checkpoint once."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no fine-tuned model in {run_dir} (model.pt missing)")
    payload = load_weights(path, "model file")
    cfg = PipelineConfig.from_dict(payload["config"], source=str(path))
    codes = read_codes(run_dir, int(payload["num_items"]))
    model = build_model(cfg.model, codes, cfg.quantize.sizes, cfg.data.max_len)
    model.load_state_dict(payload["model"])
    model.code_score_weight = float(payload.get("code_score_weight", cfg.model.code_score_weight))  # chosen on valid
    if model.uses_content:  # content terms (content_dim, backoff rule): the run's stored vectors, else the dataset's
        model.set_item_content(run_content(run_dir, cfg, model.num_items))
    rest = {k: v for k, v in payload.items() if k != "model"}
    rest["records_trained_items"] = "trained_items" in payload["model"]
    return model.to(device).eval(), cfg, rest


def run_content(run_dir: str | Path, cfg: PipelineConfig, num_items: int, data: PipelineData | None = None) -> np.ndarray:
    """[N, D] content vectors of a run's catalogue: ``RUN/item_content.parquet`` when the run has it
    (``qbert export`` writes it, so a served model needs no dataset), else from the data."""
    stored = Path(run_dir) / CONTENT_FILE
    if stored.is_file():
        return read_item_content(stored, num_items)
    return target_content(cfg, data if data is not None else load_data(cfg))


def trained_items_of(cfg: PipelineConfig, split) -> np.ndarray:
    """0-based items fine-tuning trains on (its rows: every training-part prefix), as it records
    them in ``model.pt`` (``trained_items``); for runs saved before that record existed."""
    from qbert.seqrec.stage import training_rows

    rows = training_rows(split, cfg.data.max_len, cfg.finetune.prefixes)
    return np.unique(rows[rows > 0]) - 1


def rescoring_model(run_dir: str | Path, cfg: PipelineConfig, split, device: str | torch.device = "cpu",
                    data: PipelineData | None = None):
    """A finished run's model, ready to re-score ``split`` under ``cfg``'s ranking-only settings
    (``model.new_items...``): its own record of the trained items, or for runs saved before the
    record, :func:`trained_items_of`; with ``model.new_item_content`` also the items' content
    (from ``data``, loaded when None)."""
    model, _, payload = _load_run(run_dir, device)
    if not payload["records_trained_items"]:
        model.set_trained_items(trained_items_of(cfg, split))
    for key in NEW_ITEM_KEYS:
        setattr(model, key, getattr(cfg.model, key))
    if model.uses_content and model.item_content is None:
        model.set_item_content(run_content(run_dir, cfg, model.num_items, data))
    return model


def evaluate_run(run_dir: str | Path, which: str = "test", exclude_history: bool | None = None,
                 device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Any]:
    """Re-evaluate a finished pipeline run's ``model.pt`` on its own data (at its chosen ranking weight).

    ``exclude_history`` None keeps the run's ``eval.exclude_history``. Refuses data whose
    fingerprint differs from the one the model was trained on.
    """
    model, cfg, payload = _load_run(run_dir, device)
    data = load_data(cfg)
    trained_on = payload.get("data_fingerprint")
    if trained_on not in (None, data.target.fingerprint()):
        raise DataError(f"{cfg.data.source}: fingerprint {data.target.fingerprint()} differs from the one "
                        f"{run_dir} was trained on ({trained_on}); evaluate on the data the model was trained on")
    split = target_split(cfg, data)
    excl = cfg.eval.exclude_history if exclude_history is None else exclude_history
    res = evaluate_split(model, split, which, cfg.eval.batch_size, device, excl, cfg.finetune.precision, progress)
    return {**{k: res[k] for k in METRIC_KEYS}, "users": res.get("users"), "exclude_history": excl,
            "code_score_weight": model.code_score_weight}


