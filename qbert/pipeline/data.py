"""The target dataset, the pretraining sources and their union in one item space; stage inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from qbert.config import ConfigError
from qbert.data.dataset import SeqDataset
from qbert.data.errors import DataError
from qbert.data.split import LeaveOneOutSplit
from qbert.data.synthetic import SyntheticConfig, make_synthetic
from qbert.pipeline.config import PipelineConfig
from qbert.quantize.config import check_capacity
from qbert.seqrec.stage import full_sequences


@dataclass
class PipelineData:
    """The target, the pretraining sources and their union (one item space, target first)."""

    target: SeqDataset
    sources: list[SeqDataset] = field(default_factory=list)
    union: SeqDataset | None = None  # None without sources: the target is the whole item space
    names: list[str] = field(default_factory=list)

    @property
    def all_items(self) -> SeqDataset:
        return self.union if self.union is not None else self.target

    @property
    def multi_domain(self) -> bool:
        return bool(self.sources)

    def domain_ranges(self) -> dict[str, tuple[int, int]]:
        if self.union is None:
            return {self.names[0] if self.names else self.target.name: (0, self.target.num_items)}
        return {n: (r["item_start"], r["item_end"]) for n, r in self.union.meta["domains"].items()}


def load_source(source: str, cfg: PipelineConfig | None = None) -> SeqDataset:
    """One dataset: ``synthetic`` (the config's SyntheticConfig), a synthetic spec, or a path."""
    from qbert.data.readers import read_source

    if source == "synthetic":
        return make_synthetic(cfg.data.synthetic if cfg is not None else SyntheticConfig())
    options = cfg.data.options if cfg is not None and not source.startswith("synthetic") else {}
    return read_source(source, **options)


def load_data(cfg: PipelineConfig) -> PipelineData:
    from qbert.data.multidomain import assemble_domains

    target = load_source(cfg.data.source, cfg)
    if not cfg.pretrain_sources:
        return PipelineData(target, names=["target"])
    sources = [load_source(s, cfg) for s in cfg.pretrain_sources]
    fp = target.fingerprint()
    for s, ds in zip(cfg.pretrain_sources, sources):
        if ds.fingerprint() == fp:
            raise ConfigError(f"pretrain source '{s}' is the target dataset itself: its valid/test targets would "
                              "leak into pretraining (leave pretrain_sources empty to pretrain on the target's "
                              "training part)")
    names = ["target"] + [f"source{i}" for i in range(len(sources))]
    renamed = [_only_features(d, cfg) for d in [target, *sources]]
    union = assemble_domains(renamed, names, name="pipeline")
    return PipelineData(target, sources, union, names)


def _only_features(ds: SeqDataset, cfg: PipelineConfig) -> SeqDataset:
    """Keep only the feature columns the enabled modalities use (domains must agree on them)."""
    wanted = {f"feat_{c}" for m in cfg.fusion.feature_modalities for c in cfg.data.columns(m)}
    drop = [c for c in ds.items.column_names if c.startswith("feat_") and c not in wanted]
    if not drop:
        return ds
    return SeqDataset(ds.name, ds.items.drop_columns(drop), ds.seq_offsets, ds.seq_items, ds.user_ids, dict(ds.meta))


def stage_features(cfg: PipelineConfig, data: PipelineData) -> dict[str, np.ndarray]:
    """{modality: [N, d]} over every item of every domain, for the enabled feature modalities."""
    return item_features(cfg, data.all_items)


def content_vectors(features: dict[str, np.ndarray]) -> np.ndarray:
    """[N, sum of d] unit content vectors: each modality's features (a sequence of token vectors
    [N, T, d] mean-pooled) L2-normalised, concatenated and normalised again (what content nearest
    neighbours and the backoff rule's content term compare)."""
    pooled = [f.reshape(len(f), -1, f.shape[-1]).mean(1) if f.ndim > 2 else f for f in features.values()]
    parts = [f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for f in pooled]
    x = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def target_content(cfg: PipelineConfig, data: PipelineData) -> np.ndarray:
    """[N, D] :func:`content_vectors` of the target's catalogue (the first items of the union)."""
    if not cfg.fusion.feature_modalities:
        raise ConfigError("content vectors need content features: enable a text or image modality "
                          "(data.modalities), or set model.content_dim, model.new_item_content and "
                          "model.new_item_neighbours to 0 and model.new_items to own or backoff")
    return content_vectors(stage_features(cfg, data))[: data.target.num_items]


CONTENT_FILE = "item_content.parquet"  # a run's content vectors, when its ranking reads them (qbert export)


def write_item_content(path: str | Path, content: np.ndarray) -> None:
    """[N, D] content vectors of items 0..N-1 as parquet (``item_id``, ``content``)."""
    from qbert.utils.io import atomic_write_parquet

    x = np.asarray(content, dtype=np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    atomic_write_parquet(path, pa.table({"item_id": pa.array(np.arange(len(x)), pa.int64()), "content": values}))


def read_item_content(path: str | Path, num_items: int) -> np.ndarray:
    """The [num_items, D] vectors :func:`write_item_content` wrote; refused when they are not items 0..N-1."""
    from qbert.utils.io import read_parquet

    table = read_parquet(path)
    ids = table.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(num_items)):
        raise DataError(f"{path}: expected the content of items 0..{num_items - 1}, got {len(ids)} rows")
    column = table.column("content").combine_chunks()
    return column.values.to_numpy().reshape(len(ids), -1)


def item_features(cfg: PipelineConfig, ds: SeqDataset) -> dict[str, np.ndarray]:
    """{modality: [N, d]} of the items of ``ds`` (anything with ``name``, ``feature_names`` and
    ``feature(column)``): one column as is, several L2-normalised and concatenated."""
    out = {}
    for m in cfg.fusion.feature_modalities:
        cols = cfg.data.columns(m)
        for col in cols:
            if col not in ds.feature_names:
                raise DataError(f"modality '{m}' is enabled but dataset '{ds.name}' has no feature column "
                                f"'feat_{col}' (has: {ds.feature_names}); set data.features.{m} or disable the modality")
        if len(cols) == 1:
            out[m] = np.array(ds.feature(cols[0]))  # a writable copy (arrow buffers are read-only)
            continue
        parts = []
        for col in cols:
            x = np.asarray(ds.feature(col), dtype=np.float32)
            if x.ndim != 2:
                raise DataError(f"feature column 'feat_{col}' of modality '{m}' must be one vector per item to be "
                                f"concatenated with {cols}, got shape {x.shape}")
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            if not (norm > 0).all():  # NaN/inf never reach here: the dataset refuses them
                bad = np.flatnonzero(~(norm[:, 0] > 0))
                raise DataError(f"{bad.size} items have no features (all zeros) in column 'feat_{col}' of enabled "
                                f"modality '{m}' (first: item {bad[0]})")
            parts.append(x / norm)
        out[m] = np.concatenate(parts, axis=1)
    return out


def check_inputs(cfg: PipelineConfig, data: PipelineData) -> None:
    """Every check that can fail before training: features, codebook capacity, split lengths."""
    from qbert.fusion.train import validate_features

    validate_features(stage_features(cfg, data), cfg.fusion, num_items=data.all_items.num_items)
    check_capacity(cfg.quantize.sizes, data.all_items.num_items)
    if cfg.data.max_len < 2:
        raise ConfigError("data.max_len must be >= 2 (one slot holds the [MASK])")




def target_split(cfg: PipelineConfig, data: PipelineData) -> LeaveOneOutSplit:
    """The target's leave-one-out split, with the cold-start protocol's new items withheld from
    its training views when ``data.cold_start`` is on (evaluation views are always the real ones)."""
    return cfg.data.cold_start.apply(LeaveOneOutSplit(data.target, cfg.data.max_len))


def pretraining_domains(cfg: PipelineConfig, data: PipelineData) -> list[str]:
    """The domains whose sequences pretraining reads, in order: the target (its training part
    only) unless ``pretrain.include_target`` is off with sources, then every source."""
    names = list(data.domain_ranges())
    return names if not data.multi_domain or cfg.pretrain.include_target else names[1:]


def pretraining_rows(cfg: PipelineConfig, data: PipelineData) -> np.ndarray:
    """Token rows for pretraining (union item space, +1 shift). Never a target's valid/test item."""
    L = cfg.data.max_len
    parts = []
    ranges = data.domain_ranges()
    for name in pretraining_domains(cfg, data):
        if name == next(iter(ranges)):  # the target first: offset 0, its training part only
            parts.append(target_split(cfg, data).train_sequences(pad=0, shift=1))
            continue
        rows = full_sequences(data.sources[data.names.index(name) - 1], L)
        parts.append(np.where(rows > 0, rows + ranges[name][0], 0))
    return np.concatenate(parts) if parts else np.zeros((0, L), np.int64)


