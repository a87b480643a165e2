"""Stage-0 core without Ray: plan what is left to encode, encode one batch, commit it, merge.

Output layout, per modality, under ``<out>/<modality>/``::

    _manifest.json                 encoder config + dim + dataset identity (checked on resume)
    part-<first>-<last>-<hash>.parquet
        item_id (int64), feat_<modality> (fixed_size_list<float32>[d]), missing_<modality> (bool)

Each part file holds one batch and is committed atomically (tmp + rename; one S3 PUT). Its
name is a function of the batch's item ids, so a retried batch rewrites the same file, and a
re-run encodes only the items no committed file holds: every item is written exactly once.
Per-item failures (missing/corrupt image, empty text) follow ``on_error``: ``fail`` raises
:class:`FeatureError` naming the item and the file; ``zero`` writes a zero vector and sets
``missing_<modality>``; the counts are always reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qbert.data.dataset import FEATURE_PREFIX, SeqDataset, numpy_to_fixed_list
from qbert.data.errors import DataError
from qbert.features import storage
from qbert.features.config import FeatureConfig
from qbert.features.templates import assemble_texts, text_fields

log = logging.getLogger("qbert.features")

MANIFEST = "_manifest.json"
IMAGE_COLUMNS = ("image", "image_path", "image_url", "image_uri")
MISSING_PREFIX = "missing_"


class FeatureError(DataError):
    """An item's input is missing or unusable under ``on_error: fail``."""


# --------------------------------------------------------------------------- layout helpers
def feature_dir(out: str, modality: str) -> str:
    return storage.join(out, modality)


def items_uri(data: str) -> str:
    return storage.join(data, "items.parquet")


def part_name(item_ids: np.ndarray) -> str:
    ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    digest = hashlib.sha1(ids.tobytes()).hexdigest()[:12]
    return f"part-{int(ids.min()):09d}-{int(ids.max()):09d}-{digest}.parquet"


def image_column(schema: pa.Schema, configured: str | None) -> str:
    if configured is not None:
        if configured not in schema.names:
            raise DataError(f"image column {configured!r} is absent from the items table (columns: {schema.names})")
        return configured
    for name in IMAGE_COLUMNS:
        if name in schema.names:
            return name
    raise DataError(f"the items table has no image column (looked for {list(IMAGE_COLUMNS)}; columns: {schema.names}); "
                    "set image.image_column")


def input_columns(schema: pa.Schema, cfg: FeatureConfig, modality: str) -> list[str]:
    """The items-table columns an encoder of ``modality`` needs (validated, clear errors)."""
    base = ["item_id"] + (["orig_id"] if "orig_id" in schema.names else [])
    if modality == "text":
        return base + [c for c in text_fields(schema, cfg.text.template) if c not in base]
    return base + [image_column(schema, cfg.image.image_column)]


def encoder_identity(cfg: FeatureConfig, modality: str) -> dict[str, Any]:
    """What must match for vectors of two runs to be mixed in one feature dir."""
    enc = cfg.text if modality == "text" else cfg.image
    ident = enc.to_dict()
    ident.pop("batch_size", None)
    return {"modality": modality, "encoder": ident}


# --------------------------------------------------------------------------- encoding
@dataclass
class BatchResult:
    table: pa.Table  # the rows to commit
    missing: list[tuple[int, str]]  # (item_id, reason) of zero-filled items

    def summary(self, name: str, seconds: float) -> dict[str, Any]:
        return {"file": name, "items": self.table.num_rows, "missing": len(self.missing),
                "missing_items": [i for i, _ in self.missing[:20]],
                "missing_reasons": [r for _, r in self.missing[:5]], "seconds": seconds,
                "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _describe(batch: pa.Table, row: int) -> str:
    item = batch.column("item_id")[row].as_py()
    if "orig_id" in batch.column_names:
        return f"item {item} (orig_id {batch.column('orig_id')[row].as_py()!r})"
    return f"item {item}"


class ModalityEncoder:
    """One modality's encoder plus the missing-input policy; lives in one process (an actor)."""

    def __init__(self, cfg: FeatureConfig, modality: str, device: str = "auto", endpoint: str | None = None):
        self.cfg = cfg
        self.modality = modality
        self.endpoint = storage.resolve_endpoint(endpoint or cfg.s3_endpoint_url)
        if modality == "text":
            from qbert.features.text import TextEncoder

            self.encoder: Any = TextEncoder(cfg.text, device)
        elif modality == "image":
            from qbert.features.image import ImageEncoder

            self.encoder = ImageEncoder(cfg.image, device, self.endpoint)
        else:
            raise ValueError(f"unknown modality {modality!r}")
        self.dim = self.encoder.dim

    def _inputs(self, batch: pa.Table) -> tuple[list[Any], list[tuple[int, str]]]:
        """Per row the encoder input, and (row, reason) for rows whose input is unusable."""
        bad: list[tuple[int, str]] = []
        if self.modality == "text":
            texts = assemble_texts(batch, self.cfg.text.template)
            bad = [(i, "empty text") for i, t in enumerate(texts) if not t]
            return texts, bad
        from qbert.features.image import resolve_image_uri

        col = image_column(batch.schema, self.cfg.image.image_column)
        root = self.cfg.image.image_root or self.cfg.data
        values = batch.column(col).to_pylist()
        uris = [resolve_image_uri(v, root) if v and str(v).strip() else None for v in values]
        images: list[Any] = [None] * len(uris)
        present = [i for i, u in enumerate(uris) if u is not None]
        bad = [(i, f"no image (column {col!r} is empty)") for i, u in enumerate(uris) if u is None]
        for i, im in zip(present, self.encoder.load_many([uris[i] for i in present])):
            if isinstance(im, Exception):
                bad.append((i, str(im)))
            else:
                images[i] = im
        return images, sorted(bad)

    def encode_batch(self, batch: pa.Table) -> BatchResult:
        if batch.num_rows == 0:
            return BatchResult(self._table(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), np.zeros(0, bool)), [])
        inputs, bad = self._inputs(batch)
        if bad and self.cfg.on_error == "fail":
            row, reason = bad[0]
            more = f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            raise FeatureError(f"{self.modality} input of {_describe(batch, row)} is unusable: {reason}{more}; "
                               f"set on_error: zero to write a zero vector and a {MISSING_PREFIX}{self.modality} flag")
        missing = np.zeros(batch.num_rows, dtype=bool)
        missing[[r for r, _ in bad]] = True
        ok = np.flatnonzero(~missing)
        vectors = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        if ok.size:
            vectors[ok] = self.encoder.encode([inputs[i] for i in ok])
        item_ids = batch.column("item_id").to_numpy().astype(np.int64)
        if bad:
            log.warning("%s: %d item(s) zero-filled in this batch, e.g. %s: %s", self.modality, len(bad),
                        _describe(batch, bad[0][0]), bad[0][1])
        return BatchResult(self._table(item_ids, vectors, missing), [(int(item_ids[r]), why) for r, why in bad])

    def _table(self, item_ids: np.ndarray, vectors: np.ndarray, missing: np.ndarray) -> pa.Table:
        return pa.table({"item_id": pa.array(item_ids, pa.int64()),
                         FEATURE_PREFIX + self.modality: numpy_to_fixed_list(vectors.reshape(-1, self.dim)),
                         MISSING_PREFIX + self.modality: pa.array(missing, pa.bool_())})


class CommitAborted(RuntimeError):
    """The run this batch belongs to has stopped; the batch was encoded but not written."""


class BatchCommitter:
    """Encode a batch and commit it as one part file; returns a one-row summary table.

    ``guard`` (optional) is a context-manager factory wrapped around each write: the Ray pipeline
    passes one that refuses new writes once the run has failed and counts writes in progress, so
    that the driver can wait for them before it reports what was committed.
    """

    def __init__(self, cfg: FeatureConfig, modality: str, device: str = "auto", endpoint: str | None = None,
                 guard: Callable[[], ContextManager[Any]] | None = None):
        self.encoder = ModalityEncoder(cfg, modality, device, endpoint)
        self.dir = feature_dir(cfg.out, modality)
        self.guard = guard or contextlib.nullcontext

    def commit(self, batch: pa.Table) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self.encoder.encode_batch(batch)
        name = part_name(res.table.column("item_id").to_numpy())
        with self.guard():
            storage.write_parquet_atomic(storage.join(self.dir, name), res.table, self.encoder.endpoint)
        return res.summary(name, time.perf_counter() - t0)


# --------------------------------------------------------------------------- planning / resume
@dataclass
class Plan:
    modality: str
    dir: str
    total: int  # items in the dataset
    done: int  # items already committed by earlier runs
    pending: pa.Table  # rows (input columns) still to encode, item_id ascending
    endpoint: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def done_item_ids(fdir: str, endpoint: str | None = None) -> np.ndarray:
    """item_ids of every committed part file (sorted); an item in two files is an error."""
    files = storage.list_files(fdir, ".parquet", endpoint)
    if not files:
        return np.zeros(0, np.int64)
    ids = [storage.read_parquet(f, ["item_id"], endpoint).column("item_id").to_numpy() for f in files]
    allids = np.concatenate(ids).astype(np.int64)
    uniq, counts = np.unique(allids, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        holders = [f for f, a in zip(files, ids) if (a == dup).any()]
        raise DataError(f"{fdir}: item {dup} is stored in more than one part file: {holders}")
    return uniq


def _dataset_identity(items: pa.Table) -> dict[str, Any]:
    h = hashlib.sha256()
    if "orig_id" in items.column_names:
        h.update("\x1f".join(map(str, items.column("orig_id").to_pylist())).encode())
    return {"num_items": items.num_rows, "orig_id_sha256": h.hexdigest()[:16]}


def read_items(cfg: FeatureConfig, endpoint: str | None = None) -> pa.Table:
    uri = items_uri(cfg.data)
    try:
        items = storage.read_parquet(uri, None, endpoint)
    except FileNotFoundError:
        raise DataError(f"{cfg.data}: not a canonical dataset (missing items.parquet at {uri})") from None
    if "item_id" not in items.column_names:
        raise DataError(f"{uri}: items table lacks column 'item_id'")
    return items


def plan(cfg: FeatureConfig, modality: str, items: pa.Table | None = None) -> Plan:
    """What is left to encode for ``modality``; writes/validates the manifest of the feature dir."""
    endpoint = storage.resolve_endpoint(cfg.s3_endpoint_url)
    items = read_items(cfg, endpoint) if items is None else items
    cols = input_columns(items.schema, cfg, modality)
    fdir = feature_dir(cfg.out, modality)
    manifest = {**encoder_identity(cfg, modality), "dataset": _dataset_identity(items), "data": cfg.data}
    muri = storage.join(fdir, MANIFEST)
    if storage.exists(muri, endpoint):
        old = json.loads(storage.read_bytes(muri, endpoint))
        for key in ("modality", "encoder", "dataset"):
            if old.get(key) != manifest[key]:
                raise DataError(f"{fdir} holds features written with a different {key} "
                                f"({old.get(key)!r} != {manifest[key]!r}); use another `out` or delete that folder")
    else:
        storage.write_bytes_atomic(muri, (json.dumps(manifest, indent=2) + "\n").encode(), endpoint)
    done = done_item_ids(fdir, endpoint)
    table = items.select(cols).sort_by("item_id")
    if done.size:
        table = table.filter(pc.invert(pc.is_in(table.column("item_id"), pa.array(done))))
    if cfg.pipeline.limit is not None:
        table = table.slice(0, cfg.pipeline.limit)
    return Plan(modality, fdir, items.num_rows, int(done.size), table, endpoint, manifest)


def batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def extract_local(cfg: FeatureConfig, modality: str, device: str = "auto") -> dict[str, Any]:
    """Run one modality in this process (no Ray): the same plan, encoder and commits."""
    p = plan(cfg, modality)
    t0 = time.perf_counter()
    summaries = []
    if p.pending.num_rows:
        committer = BatchCommitter(cfg, modality, device, p.endpoint)
        summaries = [committer.commit(b) for b in batches(p.pending, cfg.pipeline.batch_size)]
    return run_report(p, summaries, time.perf_counter() - t0, actors=0)


def run_report(p: Plan, summaries: list[dict[str, Any]], seconds: float, actors: int) -> dict[str, Any]:
    encoded = sum(s["items"] for s in summaries)
    missing = sum(s["missing"] for s in summaries)
    busy: dict[str, float] = {}
    for s in summaries:
        busy[s["worker"]] = busy.get(s["worker"], 0.0) + float(s["seconds"])
    slowest = max(busy.values(), default=0.0)
    return {
        "modality": p.modality, "dir": p.dir, "total_items": p.total, "skipped_done": p.done,
        "encoded": encoded, "remaining": p.total - p.done - encoded, "missing": missing,
        "missing_items": [i for s in summaries for i in s["missing_items"]][:50],
        "missing_reasons": [r for s in summaries for r in s["missing_reasons"]][:10],
        "files": len(summaries), "seconds": round(seconds, 3),
        "items_per_s": round(encoded / seconds, 2) if seconds > 0 and encoded else 0.0, "actors": actors,
        # excluding actor start-up and model loading: items / busiest worker's encode+write time
        "encode_items_per_s": round(encoded / slowest, 2) if slowest > 0 else 0.0, "workers": len(busy),
    }


# --------------------------------------------------------------------------- reading back / merge
def load_features(out: str, modality: str, num_items: int | None = None,
                  endpoint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, d] matrix indexed by item_id, bool [N] missing flags) of a feature dir.

    Raises when an item is absent (the extraction is incomplete) or stored twice.
    """
    endpoint = storage.resolve_endpoint(endpoint)
    fdir = feature_dir(out, modality)
    files = storage.list_files(fdir, ".parquet", endpoint)
    if not files:
        raise DataError(f"no feature files for modality {modality!r} in {fdir}")
    table = pa.concat_tables([storage.read_parquet(f, None, endpoint) for f in files])
    ids = table.column("item_id").to_numpy().astype(np.int64)
    n = int(num_items if num_items is not None else ids.max() + 1)
    counts = np.bincount(ids, minlength=n) if ids.size else np.zeros(n, np.int64)
    if ids.min() < 0 or counts.size > n:
        raise DataError(f"{fdir}: item ids outside 0..{n - 1}")
    if (counts > 1).any():
        raise DataError(f"{fdir}: item {int(np.flatnonzero(counts > 1)[0])} is stored more than once")
    if (counts == 0).any():
        absent = np.flatnonzero(counts == 0)
        raise DataError(f"{fdir}: {absent.size} of {n} items have no {modality} feature yet (first: item {int(absent[0])}); "
                        "run the extraction again to finish it")
    from qbert.data.dataset import fixed_list_to_numpy

    vecs = fixed_list_to_numpy(table.column(FEATURE_PREFIX + modality), FEATURE_PREFIX + modality)
    matrix = np.empty_like(vecs)
    matrix[ids] = vecs
    missing = np.zeros(n, dtype=bool)
    missing[ids] = table.column(MISSING_PREFIX + modality).to_numpy(zero_copy_only=False)
    return matrix, missing


def merge_features(ds: SeqDataset, out: str, modalities: list[str], endpoint: str | None = None) -> SeqDataset:
    """``ds`` with ``feat_<modality>`` columns (and ``missing_<modality>`` where any item lacked input)."""
    for m in modalities:
        matrix, missing = load_features(out, m, ds.num_items, endpoint)
        ds = ds.with_feature(m, matrix)
        col = MISSING_PREFIX + m
        items = ds.items.drop_columns([col]) if col in ds.items.column_names else ds.items
        if missing.any():
            items = items.append_column(col, pa.array(missing, pa.bool_()))
        ds = SeqDataset(ds.name, items, ds.seq_offsets, ds.seq_items, ds.user_ids,
                        {**ds.meta, f"features_{m}": str(out)})
    return ds


def merge_into(data: str, out: str, modalities: list[str], dest: str | Path, endpoint: str | None = None) -> Path:
    """Load the canonical dataset ``data`` (local), add the features, save it atomically at ``dest``."""
    if storage.is_s3(data):
        raise DataError("merge_into needs a local dataset dir (copy it down first)")
    merged = merge_features(SeqDataset.load(data), out, modalities, endpoint)
    return merged.save(dest)
