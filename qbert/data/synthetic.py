"""Synthetic dataset with planted structure: the embedded default of the quick start and tests.

Why planted structure: every stage can be checked against a known truth in seconds.

* Items belong to latent clusters (balanced, randomly permuted over item ids).
* ``feat_text`` and ``feat_image`` are two *different* random projections of the item's
  cluster latent plus an item-specific latent, plus noise: both modalities agree on the
  cluster (what fusion should align) and still tell items apart (what quantisation needs).
* ``title`` draws words from a per-cluster vocabulary (plus a brand word), so real text
  encoders see the same cluster structure.
* Users walk between clusters by a sparse transition matrix (each cluster has
  ``successors`` likely next clusters) and pick items inside a cluster by a Zipf-skewed
  popularity, so the next item is predictable from the history but not trivially.

Generation is vectorised numpy (loops only over time steps, never users or items) and a fixed
seed gives an identical dataset (same ``fingerprint()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from qbert.config import Config, ConfigError
from qbert.data.dataset import SeqDataset, numpy_to_fixed_list

_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vex", "sul", "bar", "dun", "pio", "zel", "qua", "fin",
              "gor", "hal", "jet", "nor", "pex", "ru", "sa", "ti", "vo", "wen", "yl", "xo", "bri", "cla", "dro")
_BRANDS = ("acme", "norda", "velto", "quark", "sonic", "orbis", "lumen", "kappa", "zenith", "fable")


class SyntheticConfig(Config):
    """Size and structure of the synthetic dataset (defaults: whole pipeline in minutes on 2 cores)."""

    name: str = "synthetic"
    seed: int = 0
    num_users: int = Field(1000, ge=1)
    num_items: int = Field(400, ge=2)
    num_clusters: int = Field(20, ge=1)
    min_len: int = Field(5, ge=3)  # leave-one-out needs >= 3
    max_len: int = Field(20, ge=3)
    latent_dim: int = Field(16, ge=1)
    text_dim: int = Field(64, ge=1)
    image_dim: int = Field(48, ge=1)
    successors: int = Field(3, ge=1)  # likely next clusters of each cluster
    popularity_exponent: float = Field(1.0, ge=0.0)  # Zipf exponent of item popularity in a cluster
    item_latent_scale: float = Field(0.5, ge=0.0)  # weight of the item-specific latent
    noise: float = Field(0.1, ge=0.0)  # feature noise std
    vocab_per_cluster: int = Field(12, ge=1)
    title_words: tuple[int, int] = (3, 6)  # min, max cluster words per title

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.max_len < self.min_len:
            raise ValueError(f"max_len ({self.max_len}) must be >= min_len ({self.min_len})")
        if self.num_items < self.num_clusters:
            raise ValueError(f"num_items ({self.num_items}) must be >= num_clusters ({self.num_clusters})")
        if self.successors > self.num_clusters:
            raise ValueError(f"successors ({self.successors}) must be <= num_clusters ({self.num_clusters})")
        lo, hi = self.title_words
        if not 1 <= lo <= hi:
            raise ValueError(f"title_words must be (min, max) with 1 <= min <= max, got {self.title_words}")
        return self


# short aliases accepted in spec strings such as "synthetic:seed=3,users=500"
SPEC_ALIASES = {"users": "num_users", "items": "num_items", "clusters": "num_clusters"}


def parse_synthetic_spec(spec: str) -> SyntheticConfig:
    """``synthetic`` or ``synthetic:key=value,...`` (keys: config fields or users/items/clusters)."""
    head, _, rest = spec.partition(":")
    if head.strip() != "synthetic":
        raise ConfigError(f"not a synthetic spec: {spec!r}")
    data: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"synthetic spec {spec!r}: expected key=value, got {part!r}")
        key = SPEC_ALIASES.get(key.strip(), key.strip())
        data[key] = value.strip()
    if "title_words" in data:
        data["title_words"] = tuple(str(data["title_words"]).split("-"))
    return SyntheticConfig.from_dict(data, source=f"synthetic spec {spec!r}")


@dataclass
class PlantedStructure:
    """The ground truth behind a synthetic dataset (tests check stages against it)."""

    item_cluster: np.ndarray  # [N] cluster of each item
    transition: np.ndarray  # [C, C] row-stochastic, `successors` non-zeros per row
    popularity: np.ndarray  # [N] probability of an item inside its cluster
    cluster_latent: np.ndarray  # [C, latent_dim]
    item_latent: np.ndarray  # [N, latent_dim] item-specific part


def planted_structure(cfg: SyntheticConfig) -> PlantedStructure:
    rng = np.random.default_rng([cfg.seed, 1])
    n, c = cfg.num_items, cfg.num_clusters
    item_cluster = rng.permutation(np.arange(n) % c).astype(np.int64)
    succ = np.argsort(rng.random((c, c)), axis=1)[:, : cfg.successors]
    weights = rng.gamma(1.0, size=(c, cfg.successors)) + 1e-3
    transition = np.zeros((c, c))
    np.put_along_axis(transition, succ, weights / weights.sum(1, keepdims=True), axis=1)
    # popularity rank inside each cluster: random order, Zipf weights
    order = np.lexsort((rng.random(n), item_cluster))
    sizes = np.bincount(item_cluster, minlength=c)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[item_cluster[order]]
    w = (rank + 1.0) ** -cfg.popularity_exponent
    popularity = w / np.bincount(item_cluster, weights=w, minlength=c)[item_cluster]
    return PlantedStructure(item_cluster, transition, popularity,
                            rng.normal(size=(c, cfg.latent_dim)), rng.normal(size=(n, cfg.latent_dim)))


def _features(cfg: SyntheticConfig, truth: PlantedStructure, dim: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, stream])
    k = cfg.latent_dim
    a = rng.normal(size=(k, dim)) / np.sqrt(k)
    b = rng.normal(size=(k, dim)) / np.sqrt(k)
    x = truth.cluster_latent[truth.item_cluster] @ a + cfg.item_latent_scale * truth.item_latent @ b
    return (x + cfg.noise * rng.normal(size=x.shape)).astype(np.float32)


def _titles(cfg: SyntheticConfig, truth: PlantedStructure) -> list[str]:
    rng = np.random.default_rng([cfg.seed, 4])
    c, v = cfg.num_clusters, cfg.vocab_per_cluster
    syl = rng.integers(len(_SYLLABLES), size=(c * v, 3))
    nsyl = rng.integers(2, 4, size=c * v)
    vocab = ["".join(_SYLLABLES[s] for s in row[:m]) for row, m in zip(syl, nsyl)]
    lo, hi = cfg.title_words
    n = cfg.num_items
    count = rng.integers(lo, hi + 1, size=n)
    words = truth.item_cluster[:, None] * v + rng.integers(v, size=(n, hi))
    brand = rng.integers(len(_BRANDS), size=n)
    return [" ".join([_BRANDS[brand[i]], *(vocab[w] for w in words[i, : count[i]])]) for i in range(n)]


def _sequences(cfg: SyntheticConfig, truth: PlantedStructure) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 5])
    u, c, t = cfg.num_users, cfg.num_clusters, cfg.max_len
    # per-cluster member table padded to the largest cluster, with cumulative popularity
    order = np.lexsort((-truth.popularity, truth.item_cluster))
    sizes = np.bincount(truth.item_cluster, minlength=c)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    col = np.arange(len(order)) - starts[truth.item_cluster[order]]
    members = np.zeros((c, sizes.max()), np.int64)
    cdf = np.full((c, sizes.max()), 2.0)  # padding never selected
    members[truth.item_cluster[order], col] = order
    cdf[truth.item_cluster[order], col] = truth.popularity[order]
    cdf = np.where(cdf > 1.5, 2.0, np.cumsum(np.where(cdf > 1.5, 0.0, cdf), axis=1))
    tcdf = np.cumsum(truth.transition, axis=1)

    clusters = np.empty((u, t), np.int64)
    clusters[:, 0] = rng.integers(c, size=u)
    for step in range(1, t):  # a loop over time steps only
        r = rng.random(u)[:, None]
        clusters[:, step] = np.minimum((tcdf[clusters[:, step - 1]] < r).sum(1), c - 1)
    r = rng.random((u, t))[..., None]
    pick = np.minimum((cdf[clusters] < r).sum(-1), sizes[clusters] - 1)
    items = members[clusters, pick]
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=u)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), items[mask]


def make_synthetic(cfg: SyntheticConfig | None = None) -> SeqDataset:
    """Generate the dataset described by ``cfg`` (identical for an identical config)."""
    cfg = cfg or SyntheticConfig()
    truth = planted_structure(cfg)
    offsets, flat = _sequences(cfg, truth)
    n = cfg.num_items
    items = pa.table({
        "item_id": pa.array(np.arange(n, dtype=np.int64)),
        "orig_id": pa.array([f"item{i}" for i in range(n)], pa.string()),
        "title": pa.array(_titles(cfg, truth), pa.string()),
        "cluster": pa.array(truth.item_cluster),
        "feat_text": numpy_to_fixed_list(_features(cfg, truth, cfg.text_dim, 2)),
        "feat_image": numpy_to_fixed_list(_features(cfg, truth, cfg.image_dim, 3)),
    })
    users = np.array([f"user{i}" for i in range(cfg.num_users)])
    meta = {"source": "synthetic", "text_columns": ["title"], "synthetic_config": cfg.to_dict()}
    return SeqDataset(cfg.name, items, offsets, flat, users, meta)
