"""MLflow tracking for every job: params, metrics, provenance tags, artifacts and the model.

Embedded default: an sqlite store inside the run directory (``sqlite:///<run_dir>/mlflow.db``,
artifacts under ``<run_dir>/mlartifacts``) because MLflow 3 refuses the file store. Remote:
``MLFLOW_TRACKING_URI`` (a tracking server, which proxies artifacts to its S3 store).

Only rank 0 logs. The run id is stored in ``<run_dir>/mlflow_run.json`` (next to the
checkpoints) so a restarted job keeps logging into the same run instead of duplicating it.
Every call to the tracking server is retried with bounded backoff; when the budget is spent
the error says which server failed. The training loop writes its checkpoint *before* calling
callbacks, so a tracking failure never loses an epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from qbert.config import Config, flatten_dict
from qbert.platform.retry import RetryConfig, with_retries
from qbert.train.loop import Callback, FitResult, LoopState, unwrap
from qbert.utils.io import atomic_write_json
from qbert.utils.runtime import git_commit, machine_info

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
MAX_PARAM_VALUE = 6000  # MLflow 3's limit (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_KEY = 250
BATCH = 100  # params/tags per log_batch request
ARTIFACT_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".md", ".png", ".parquet", ".txt")
SKIP_DIRS = {"checkpoints", "mlartifacts", "ray_storage", "__pycache__"}


class TrackingConfig(Config):
    """Where and how to track; ``tracking_uri`` None -> ``MLFLOW_TRACKING_URI`` or the embedded store."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "qbert"
    log_model: bool = True
    retry: RetryConfig = RetryConfig()


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | os.PathLike) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def metric_key(name: str) -> str:
    """MLflow keys allow ``[/\\w.\\- :]``: ``HR@10`` -> ``HR_10``."""
    key = re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_"))
    return key[:MAX_KEY]


def param_value(value: Any) -> str:
    """Stringify and truncate to MLflow's limit (with a visible marker)."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if len(text) > MAX_PARAM_VALUE:
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VALUE - len(marker)] + marker
    return text


def _quiet_http_retries() -> None:
    # MLflow's own HTTP retries (7 with backoff factor 2) would hang minutes on a dead server;
    # with_retries owns the budget instead. A value set by the user wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore it *and* ``MLFLOW_TRACKING_URI``
    (``mlflow.set_tracking_uri`` also writes the env var, which would leak into later runs)."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    old = getattr(tracking_utils, "_tracking_uri", None)
    try:
        mlflow.set_tracking_uri(uri)
        yield
    finally:
        tracking_utils._tracking_uri = old
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


class TrackedRun:
    """One MLflow run behind a retried client (no global fluent state)."""

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str, retry: RetryConfig):
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id, self.experiment_id, self.retry = tracking_uri, run_id, experiment_id, retry
        self.client = MlflowClient(tracking_uri)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return with_retries(lambda: fn(*args, **kwargs), f"MLflow {what} at {self.tracking_uri}", self.retry)

    # ------------------------------------------------------------------ logging
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:MAX_KEY], param_value(v)) for k, v in params.items()]
        existing = self._call("get_run", self.client.get_run, self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable: a resumed run keeps its own
        for i in range(0, len(items), BATCH):
            self._call("log_batch(params)", self.client.log_batch, self.run_id, params=items[i:i + BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k[:MAX_KEY], param_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), BATCH):
            self._call("log_batch(tags)", self.client.log_batch, self.run_id, tags=items[i:i + BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "", model_id: str | None = None) -> None:
        """Log numeric, finite ``metrics``; with ``model_id`` they are also the LoggedModel's metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(prefix + k), float(v), now, step, model_id=model_id) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self._call("log_batch(metrics)", self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call(f"log_artifact({Path(path).name})", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_run_dir(self, run_dir: str | os.PathLike, artifact_path: str | None = None) -> list[str]:
        """Log the small, human-facing files of a run dir (configs, tables, plots, metrics), not checkpoints."""
        root = Path(run_dir)
        logged = []
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if not p.is_file() or p.suffix not in ARTIFACT_SUFFIXES or p.name == RUN_ID_FILE:
                continue
            if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
                continue
            sub = "/".join(x for x in (artifact_path, rel.parent.as_posix()) if x and x != ".") or None
            self.log_artifact(p, sub)
            logged.append(rel.as_posix())
        return logged

    def log_model(self, model: nn.Module, name: str) -> str:
        """Log ``model`` with ``mlflow.pytorch``; returns its ``model_uri`` (load with ``mlflow.pytorch.load_model``)."""
        import mlflow
        import mlflow.pytorch

        model = unwrap(model)
        req = [f"torch=={torch.__version__.split('+')[0]}"]

        def do() -> str:
            with use_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pytorch.log_model(model, name=name, pip_requirements=req,
                                               serialization_format="pickle")
            return info.model_uri

        uri = with_retries(do, f"MLflow log_model({name}) at {self.tracking_uri}", self.retry)
        self.set_tags({f"qbert.model_uri.{name}": uri})
        return uri

    def register_model(self, stage: str, name: str) -> tuple[str, str] | None:
        """Register the model ``stage``'s callback logged to this run (tag ``qbert.model_uri.<stage>``)
        as a new version of registered model ``name``; return (model_id, version), None if no model."""
        tags = self._call("get_run", self.client.get_run, self.run_id).data.tags
        uri = tags.get(f"qbert.model_uri.{stage}")
        if not uri:
            return None
        model_id = uri.removeprefix("models:/").split("/")[0]
        if tags.get("qbert.registered_model"):  # a resumed, already finished run: no second version
            return model_id, tags["qbert.registered_model"].rsplit("/", 1)[-1]
        if not self._call("search_registered_models", self.client.search_registered_models,
                          filter_string=f"name = '{name}'"):
            self._call("create_registered_model", self.client.create_registered_model, name)
        version = self._call("create_model_version", self.client.create_model_version, name, uri,
                             run_id=self.run_id, model_id=model_id)
        self.set_tags({"qbert.registered_model": f"models:/{name}/{version.version}"})
        return model_id, str(version.version)

    def end(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", self.client.set_terminated, self.run_id, status)


def start_run(tracking: TrackingConfig, run_dir: str | os.PathLike, run_name: str, *,
              config: Config | dict[str, Any] | None = None, dataset_fingerprint: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
              reuse: bool = True) -> TrackedRun:
    """Create (or, with ``reuse`` and a ``mlflow_run.json`` in ``run_dir``, resume) a run and log provenance.

    Logs the flattened config as params and tags: git commit, dataset fingerprint, machine info,
    parent run id (sweeps). Writes ``run_dir/mlflow_run.json`` with the run id.
    """
    from mlflow.tracking import MlflowClient

    _quiet_http_retries()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(tracking, run_dir)
    client = MlflowClient(uri)
    retry = tracking.retry
    stored = run_dir / RUN_ID_FILE
    if reuse and stored.is_file():
        meta = json.loads(stored.read_text())
        if meta.get("tracking_uri") == uri:
            run = TrackedRun(uri, meta["run_id"], meta["experiment_id"], retry)
            status = with_retries(lambda: client.get_run(run.run_id), f"MLflow get_run at {uri}", retry).info.status
            if status != "RUNNING":
                run._call("update_run", client.update_run, run.run_id, "RUNNING")
            log.info("resuming MLflow run %s (%s)", run.run_id, uri)
            return run

    def experiment_id() -> str:
        exp = client.get_experiment_by_name(tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None if "://" in uri and not uri.startswith("sqlite") else (run_dir.resolve() / "mlartifacts").as_uri()
        return client.create_experiment(tracking.experiment, artifact_location=location)

    exp_id = with_retries(experiment_id, f"MLflow experiment {tracking.experiment!r} at {uri}", retry)
    all_tags: dict[str, Any] = {"mlflow.runName": run_name, "qbert.git_commit": git_commit(),
                                **{f"qbert.sys.{k}": v for k, v in machine_info().items()}}
    if dataset_fingerprint:
        all_tags["qbert.dataset_fingerprint"] = dataset_fingerprint
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    created = with_retries(lambda: client.create_run(exp_id, run_name=run_name), f"MLflow create_run at {uri}", retry)
    run = TrackedRun(uri, created.info.run_id, exp_id, retry)
    atomic_write_json(stored, {"run_id": run.run_id, "experiment_id": exp_id, "tracking_uri": uri, "run_name": run_name})
    run.set_tags(all_tags)
    if config is not None:
        run.log_params(config.flat() if isinstance(config, Config) else flatten_dict(config))
    return run


def attach_run(tracking_uri: str, run_id: str, experiment_id: str, retry: RetryConfig | None = None) -> TrackedRun:
    """A handle on an existing run (what a Ray worker gets from its driver)."""
    _quiet_http_retries()
    return TrackedRun(tracking_uri, run_id, experiment_id, retry or RetryConfig())


class MLflowCallback(Callback):
    """Logs per-epoch metrics (``<prefix>loss``, ``<prefix>NDCG_10``...) and, at the end, best metrics and the model.

    Pass an existing :class:`TrackedRun` (a pipeline run shared by the stages), or ``tracking`` +
    ``run_dir`` + ``config`` to start/resume one lazily on rank 0. Ranks other than 0 do nothing.
    """

    def __init__(self, run: TrackedRun | None = None, *, tracking: TrackingConfig | None = None,
                 run_dir: str | os.PathLike | None = None, config: Config | dict[str, Any] | None = None,
                 run_name: str = "qbert", dataset_fingerprint: str | None = None, prefix: str = "",
                 model_name: str | None = None, artifacts: Iterable[str | os.PathLike] = (), rank: int = 0,
                 end_run: bool = False):
        if run is None and (tracking is None or run_dir is None):
            raise ValueError("MLflowCallback needs a TrackedRun or tracking + run_dir")
        self.run, self.tracking, self.run_dir, self.config = run, tracking, run_dir, config
        self.run_name, self.fingerprint, self.prefix = run_name, dataset_fingerprint, prefix
        self.model_name, self.artifacts, self.rank, self.end_run = model_name, list(artifacts), rank, end_run
        self.model_uri: str | None = None

    @property
    def active(self) -> bool:
        return self.rank == 0 and (self.run is not None or bool(self.tracking and self.tracking.enabled))

    def on_fit_start(self, model: nn.Module, state: LoopState) -> None:
        if not self.active:
            return
        if self.run is None:
            self.run = start_run(self.tracking, self.run_dir, self.run_name, config=self.config,
                                 dataset_fingerprint=self.fingerprint)
        if state.epoch:
            self.run.set_tags({f"qbert.resumed_at_epoch.{self.prefix.strip('/') or 'fit'}": state.epoch})

    def on_epoch_end(self, model: nn.Module, state: LoopState, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if self.active:
            self.run.log_metrics(metrics, step=state.epoch, prefix=self.prefix)

    def on_fit_end(self, model: nn.Module, state: LoopState, result: FitResult) -> None:
        if not self.active:
            return
        best = {f"best_{k}": v for k, v in result.best_metrics.items()}
        best["best_epoch"] = result.best_epoch
        best["samples_per_second"] = result.samples_per_second
        self.run.log_metrics(best, step=state.epoch, prefix=self.prefix)
        for path in self.artifacts:
            if Path(path).is_file():
                self.run.log_artifact(path)
        if self.model_name and (self.tracking is None or self.tracking.log_model):
            self.model_uri = self.run.log_model(model, self.model_name)
        if self.end_run:
            self.run.end()


def stage_callbacks(run: TrackedRun | None, log_model: bool = True) -> Any:
    """``callbacks_factory(stage)`` for the pipeline: an :class:`MLflowCallback` per stage, logging
    the model of the stage evaluation loads (``qbert.pipeline.MODEL_STAGE``)."""
    from qbert.pipeline import REGISTRY

    def factory(stage: str) -> list[Callback]:
        if run is None:
            return []
        model = stage if REGISTRY[stage].model and log_model else None
        return [MLflowCallback(run, prefix=f"{stage}/", model_name=model)]

    return factory


def registered_model_name(cfg: Any) -> str:
    """What the fine-tuned model is registered as: ``qbert4rec-<dataset>`` (``qbert4rec-hybrid-<dataset>``
    for the item-ID hybrid), the dataset named by the last part of ``data.source``."""
    src = str(cfg.data.source).rstrip("/")
    dataset = "synthetic" if src.startswith("synthetic") else src.rsplit("/", 1)[-1]
    model = "qbert4rec" if cfg.model.item_id == "none" else "qbert4rec-hybrid"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{dataset}")


def tracked_pipeline(cfg: Any, run_dir: str | os.PathLike, name: str, execute: Any, *,
                     tracking: TrackingConfig | None = None, tags: dict[str, Any] | None = None,
                     artifacts_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The one MLflow path of every entry point (``qbert pipeline``, ``ray_jobs/*``): start (or
    resume) the run with the config, git commit and data fingerprint, ``execute(run)`` the stages,
    then log the final metrics and the run directory and end the run (FAILED if ``execute`` raised)."""
    from qbert.pipeline import MODEL_STAGE, config_differences, load_data
    from qbert.utils.rundir import run_lock

    tracking = tracking or TrackingConfig()
    with run_lock(run_dir):  # before MLflow: a second run on the directory must not touch this one's run
        same = config_differences(Path(run_dir) / "config.yaml", cfg) == []  # resume its MLflow run only then
        run = start_run(tracking, run_dir, name, config=cfg, dataset_fingerprint=load_data(cfg).target.fingerprint(),
                        tags=tags, reuse=same)
        try:
            result = execute(run)
        except BaseException:
            try:
                run.end("FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                log.exception("could not mark the MLflow run failed")
            raise
        final = {f"{split}/{k}": v for split in ("valid", "test") for k, v in (result.get(split) or {}).items()}
        registered = None
        if "valid" in result:
            try:  # the run succeeded: a registry that refuses must not turn it into a failure
                registered = run.register_model(MODEL_STAGE, registered_model_name(cfg))
            except Exception as e:  # noqa: BLE001
                log.warning("the model was not registered in MLflow (%s); the run and its model are logged", e)
        # the final metrics belong to the run and, when a model was logged, to that model too
        run.log_metrics(final, step=0, prefix="final/", model_id=registered[0] if registered else None)
        run.log_run_dir(artifacts_dir or run_dir)
        run.end()
    return result
