"""Stage 0 on Ray Data: items table -> encoder actor pool -> one committed parquet file per batch.

The planning, encoding and commit logic is :mod:`qbert.features.extract` (pure PyTorch /
pyarrow); this module only spreads the pending batches over
``map_batches(..., compute=ActorPoolStrategy(size=n))`` so that each actor loads the model once
and keeps it for every batch it gets. Actors commit their own part files (atomic per file), so
an interrupted run loses at most the batches in flight and a re-run skips everything already
written. The driver consumes one summary row per committed batch to drive a progress bar and
to report throughput and per-item failure counts.

When a batch fails, Ray Data stops handing out batches but lets the ones already running
finish. A small gate actor makes that end deterministic: it refuses writes once the run has
failed and counts the writes in progress, and the driver waits for those before it reports
(from the files themselves) how many items were committed. So the output does not change after
the command has returned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pyarrow as pa

from qbert.data.errors import DataError
from qbert.features.config import FeatureConfig
from qbert.features.extract import (BatchCommitter, CommitAborted, FeatureError, batches, done_item_ids, merge_into,
                                   plan, run_report)

log = logging.getLogger("qbert.platform.features")

SETTLE_TIMEOUT_S = 60.0  # how long a failed run waits for its in-flight writes


class _CommitGate:
    """Serialises "may this batch be written?" so a failed run can wait for writes already begun.

    A Ray actor runs one call at a time, so after :meth:`close` no write starts, and
    :meth:`writing` reaching 0 means every write that did start has finished.
    """

    def __init__(self) -> None:
        self.open, self.active = True, 0
        self.actors: list[Any] = []  # the encoder actors, so a failed run can stop them (_stop_actors)

    def register(self, actor: Any) -> None:
        self.actors.append(actor)

    def registered(self) -> list[Any]:
        return list(self.actors)

    def enter(self) -> bool:
        if self.open:
            self.active += 1
        return self.open

    def exit(self) -> None:
        self.active -= 1

    def close(self) -> int:
        self.open = False
        return self.active

    def writing(self) -> int:
        return self.active


@contextlib.contextmanager
def _gated(gate: Any):
    import ray

    if not ray.get(gate.enter.remote()):
        raise CommitAborted("the extraction run stopped before this batch was written")
    try:
        yield
    finally:
        ray.get(gate.exit.remote())


def _settle(gate: Any, timeout_s: float) -> int:
    """Close the gate and wait until no write is in progress; returns the writes still open.

    Never raises: it runs while another exception is propagating (if Ray itself is gone, the
    actors are too, and no write can land later).
    """
    import ray

    try:
        active = ray.get(gate.close.remote())
        deadline = time.monotonic() + timeout_s
        while active and time.monotonic() < deadline:
            time.sleep(0.05)
            active = ray.get(gate.writing.remote())
        return active
    except Exception as e:  # noqa: BLE001 - the original failure is what the user must see
        log.warning("could not reach the commit gate (%s); assuming no write is in progress", e)
        return 0


class _EncodeActor:
    """Stateful ``map_batches`` callable: the encoder is built once per actor."""

    def __init__(self, cfg: dict[str, Any], modality: str, endpoint: str | None, gate: Any):
        import ray

        gate.register.remote(ray.get_runtime_context().current_actor)
        self.committer = BatchCommitter(FeatureConfig.from_dict(cfg), modality, "auto", endpoint,
                                        guard=lambda: _gated(gate))

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.committer.commit(batch)
        return pa.table({
            "file": [s["file"]], "items": pa.array([s["items"]], pa.int64()),
            "missing": pa.array([s["missing"]], pa.int64()),
            "missing_items": pa.array([s["missing_items"]], pa.list_(pa.int64())),
            "missing_reasons": pa.array([s["missing_reasons"]], pa.list_(pa.string())),
            "seconds": pa.array([s["seconds"]], pa.float64()), "worker": [s["worker"]],
        })


def _gpus_per_actor(cfg: FeatureConfig) -> float:
    import ray

    if cfg.pipeline.num_gpus_per_actor is not None:
        return cfg.pipeline.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0  # CPU fallback


def _feature_error(exc: BaseException) -> FeatureError | None:
    """The FeatureError raised inside an actor, found through Ray's exception wrappers."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FeatureError):
            return e
        e = e.__cause__ or e.__context__
    text = str(exc)
    marker = "FeatureError: "
    if marker in text:
        return FeatureError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def extract_modality(cfg: FeatureConfig, modality: str) -> dict[str, Any]:
    """Encode every pending item of ``modality`` on the current Ray cluster; returns the run report."""
    import ray
    import ray.data

    p = plan(cfg, modality)
    if p.pending.num_rows == 0:
        log.info("%s: all %d items already extracted in %s", modality, p.total, p.dir)
        return run_report(p, [], 0.0, cfg.pipeline.actors)
    blocks = batches(p.pending, cfg.pipeline.batch_size)
    actors = min(cfg.pipeline.actors, len(blocks))
    gpus = _gpus_per_actor(cfg)
    gate = ray.remote(num_cpus=0)(_CommitGate).remote()
    ctx = ray.data.DataContext.get_current()
    saved_wait = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = int(cfg.pipeline.wait_for_actors_s) if cfg.pipeline.wait_for_actors_s > 0 else -1
    ds = ray.data.from_arrow(blocks).map_batches(
        _EncodeActor,
        fn_constructor_kwargs={"cfg": cfg.to_dict(), "modality": modality, "endpoint": p.endpoint, "gate": gate},
        batch_size=cfg.pipeline.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=cfg.pipeline.max_tasks_in_flight_per_actor),
        num_gpus=gpus,
        num_cpus=cfg.pipeline.num_cpus_per_actor,
    )
    bar = _progress(cfg, p, modality)
    summaries: list[dict[str, Any]] = []
    items = missing = 0  # running totals for the progress bar
    t0 = time.perf_counter()
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            summaries.append(dict(row))
            items, missing = items + int(row["items"]), missing + int(row["missing"])
            if bar is not None:
                bar.update(int(row["items"]))
                bar.set_postfix(items_s=f"{items / (time.perf_counter() - t0):.1f}", missing=missing)
    except BaseException as e:  # a failed batch, a timeout, Ctrl-C: the writes already begun finish first
        open_writes = _settle(gate, SETTLE_TIMEOUT_S)
        _release(rows)  # the actor pool holds its CPUs until its executor shuts down: a resume in this
        _stop_actors(gate)  # Ray session would otherwise wait for them forever on a small node
        if open_writes:
            log.warning("%s: %d batch write(s) did not finish within %ss of the failure; a re-run checks "
                        "what was committed", modality, open_writes, SETTLE_TIMEOUT_S)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            raise RuntimeError(f"{modality}: {actors} encoder actor(s) with {cfg.pipeline.num_cpus_per_actor} CPU and "
                               f"{gpus} GPU each did not start within {cfg.pipeline.wait_for_actors_s}s; the cluster "
                               f"has {ray.cluster_resources()} (lower pipeline.actors or num_gpus_per_actor)") from e
        fe = _feature_error(e) if isinstance(e, Exception) else None  # Ray wraps the actor's exception
        if fe is not None:
            written = len(done_item_ids(p.dir, p.endpoint)) - p.done  # read back: the run has settled
            raise FeatureError(f"{fe} [{written} items of this run were committed to {p.dir}; "
                               "a re-run resumes after fixing the input]") from e
        raise
    finally:
        ctx.wait_for_min_actors_s = saved_wait
        if bar is not None:
            bar.close()
        with contextlib.suppress(Exception):
            ray.kill(gate)
    report = run_report(p, summaries, time.perf_counter() - t0, actors)
    report["num_gpus_per_actor"] = gpus
    if report["missing"]:
        log.warning("%s: %d item(s) had unusable input and got zero vectors + missing_%s (first: %s)",
                    modality, report["missing"], modality, report["missing_reasons"][:1])
    log.info("%s: encoded %d items in %.1fs (%.1f items/s, %d actor(s)); %d skipped as done",
             modality, report["encoded"], report["seconds"], report["items_per_s"], actors, report["skipped_done"])
    return report


def _stop_actors(gate: Any) -> None:
    """Kill the encoder actors of a failed run. Closing its row iterator does not always shut the
    actor pool down at once (its executor can outlive the iterator until garbage collection), and
    while the pool holds its CPUs a resume in the same Ray session waits for them forever on a
    small node. Never raises (another exception is propagating)."""
    import ray

    with contextlib.suppress(Exception):
        for actor in ray.get(gate.registered.remote(), timeout=30):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def _release(rows: Any) -> None:
    """Shut down the streaming execution behind a Ray Data row iterator (its actors go with it)."""
    close = getattr(rows, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _progress(cfg: FeatureConfig, p: Any, modality: str) -> Any:
    if not cfg.pipeline.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=p.total, initial=p.done, desc=f"features[{modality}]", unit="item")


def extract_features(cfg: FeatureConfig, init_ray: bool = True) -> dict[str, Any]:
    """Run every configured modality (then optionally merge); connects to Ray when needed.

    ``ray.init()`` with no address joins the cluster of a ``ray job submit`` job (RAY_ADDRESS)
    or starts a local one.
    """
    import ray

    started = init_ray and not ray.is_initialized()
    if started:
        ray.init()
    try:
        reports = {m: extract_modality(cfg, m) for m in cfg.modalities}
    finally:
        if started:  # a Ray this call started (not a job's cluster connection made by the caller)
            ray.shutdown()
    result: dict[str, Any] = {"modalities": reports}
    if cfg.merge_into:
        incomplete = [m for m, r in reports.items() if r["remaining"]]
        if incomplete:
            raise DataError(f"cannot merge: modalities {incomplete} are incomplete (pipeline.limit is set?)")
        result["merged"] = str(merge_into(cfg.data, cfg.out, list(cfg.modalities), cfg.merge_into, cfg.s3_endpoint_url))
    return result
