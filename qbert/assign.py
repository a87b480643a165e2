"""Semantic IDs for items added after training, without retraining (``qbert ids assign``).

A run's trained stage 1 (fusion) and stage 2 (RQ-VAE) turn a new item's content features into a
semantic ID; the collision rule of Sec. 3.4 then keeps it distinct from every existing ID (an
existing item never moves: a new item that lands on a taken tuple takes its next-nearest free
one). The IDs are appended to ``RUN/new_items.parquet``; :class:`qbert.recommend.Recommender` adds
them to the catalogue, so the paper's model ranks them by P(semantic ID | history) like any other
item. This is what an item-ID model cannot do: a run with an item-ID table in stage 3
(``model.item_id`` other than ``none``) is refused.

New items have no learned per-item ID query (stage 1's ``id`` modality): they get the mean of
the trained queries, so their ID is decided by their content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from qbert.data.dataset import FEATURE_PREFIX, ItemFeatures
from qbert.data.errors import DataError
from qbert.utils.io import atomic_write_parquet, load_weights, read_parquet

NEW_ITEMS = "new_items.parquet"
BASE_KEY = "qbert.semantic_ids_sha256"  # the semantic-ID table (and so the RQ-VAE) the new IDs extend


class _ItemTable(ItemFeatures):
    """New items: features without sequences (what ``item_features`` reads)."""

    def __init__(self, name: str, items: pa.Table):
        self.name, self.items = name, items


def read_new_items(path: str | Path) -> pa.Table:
    """A parquet table of new items: ``orig_id`` (unique strings), the run's feature columns
    (``feat_<name>``, one fixed-size float list per item, as in a prepared dataset) and any text
    columns (e.g. ``title``)."""
    p = Path(path)
    table = read_parquet(p, "new-items file")
    if "orig_id" not in table.column_names:
        raise DataError(f"{p}: needs a column 'orig_id' (the new items' original IDs), has {table.column_names}")
    if table.num_rows == 0:
        raise DataError(f"{p}: no items")
    ids = [str(x) for x in table.column("orig_id").to_pylist()]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise DataError(f"{p}: duplicate orig_id {dup!r}")
    return table.set_column(table.column_names.index("orig_id"), "orig_id", pa.array(ids, pa.string()))


def _existing(run: Path) -> tuple[pa.Table, pa.Table | None]:
    from qbert.explore import load_table

    base = load_table(run)
    added = read_added_items(run)
    return base, added


def _codes(table: pa.Table, levels: int) -> np.ndarray:
    return np.stack([table.column(f"code_{j}").to_numpy().astype(np.int64) for j in range(levels)], 1)


def _fusion_model(run: Path, cfg, feats: dict[str, np.ndarray], device: torch.device):
    from qbert.fusion.modules import FusionModel

    payload = load_weights(run / "fusion_model.pt", "fusion model")
    fusion_cfg = cfg.fusion
    n_train = int(payload["num_items"])
    dims = {m: a.shape[-1] for m, a in feats.items()}
    model = FusionModel(fusion_cfg, n_train, dims)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:  # a feature width that differs from the training data's
        raise DataError(f"new items' features do not fit the run's fusion model ({str(e).splitlines()[-1].strip()})"
                        ) from None
    return model.to(device).eval()


@torch.no_grad()
def assign_new_items(run_dir: str | Path, items: pa.Table, device: str | torch.device = "cpu",
                     source: str = "new items") -> pa.Table:
    """Give ``items`` semantic IDs with the run's trained fusion and RQ-VAE, distinct from every
    existing ID, and append them to ``RUN/new_items.parquet``; returns the appended rows."""
    from qbert.utils.rundir import run_lock
    from qbert.utils.runtime import pick_device

    run = Path(run_dir)
    device = pick_device(str(device))
    with run_lock(run):  # one writer of new_items.parquet at a time, and never beside a running pipeline
        return _assign(run, items, device, source)


@torch.no_grad()
def _assign(run: Path, items: pa.Table, device: torch.device, source: str) -> pa.Table:
    from qbert.fusion.train import infer_fusion, validate_features
    from qbert.pipeline.data import content_vectors, item_features
    from qbert.pipeline.runs import load_run_model
    from qbert.quantize.reallocate import reallocate_collisions
    from qbert.quantize.rqvae import RQVAE
    from qbert.quantize.semantic_ids import sid_strings
    from qbert.quantize.train import assign_codes, code_distances

    _, cfg = load_run_model(run, "cpu")  # also checks that the run finished (model.pt)
    if cfg.model.item_id != "none":
        raise DataError(f"{run}: this run's stage 3 has an item-ID table (model.item_id={cfg.model.item_id!r}); "
                        "items added after training cannot be ranked without retraining it. Semantic-ID runs "
                        "(model.item_id: none) can.")
    base, added = _existing(run)
    taken = {*base.column("orig_id").to_pylist()} if "orig_id" in base.column_names else set()
    if added is not None:
        taken |= set(added.column("orig_id").to_pylist())
    clash = [x for x in items.column("orig_id").to_pylist() if x in taken]
    if clash:
        raise DataError(f"{source}: item {clash[0]!r} is already in the run's catalogue ({len(clash)} such items)")

    feats, _ = validate_features(item_features(cfg, _ItemTable(source, items)), cfg.fusion, items.num_rows)
    fusion = _fusion_model(run, cfg, feats, device)
    if fusion.cfg.use_id:  # no learned query for a new item: the mean of the trained ones
        mean = fusion.id_embedding.weight.mean(0, keepdim=True)
        fusion.id_embedding = torch.nn.Embedding.from_pretrained(mean.expand(items.num_rows, -1).clone())
        fusion.num_items = items.num_rows
    tensors = {m: torch.from_numpy(a).to(device) for m, a in feats.items()}
    emb = infer_fusion(fusion, tensors, items.num_rows)[0]

    rq = load_weights(run / "rqvae.pt", "RQ-VAE")
    rqvae = RQVAE(int(rq["in_dim"]), cfg.quantize)
    rqvae.load_state_dict(rq["state_dict"])
    rqvae = rqvae.to(device).eval()
    x = torch.from_numpy(emb).to(device)
    raw = assign_codes(rqvae, x, cfg.quantize.infer_batch_size)

    levels = raw.shape[1]
    existing = _codes(base, levels) if added is None else np.concatenate([_codes(base, levels), _codes(added, levels)])
    n_old = existing.shape[0]

    def distances(idx: np.ndarray) -> np.ndarray:
        """Existing items rank first in every collision group, so they keep their IDs."""
        out = np.full((idx.size, levels, max(cfg.quantize.sizes)), -1e300)
        new = idx >= n_old
        if new.any():
            out[new] = code_distances(rqvae, x, idx[new] - n_old, cfg.quantize.infer_batch_size)
        return out

    if cfg.quantize.reallocate:  # the run's IDs are unique: keep them so, existing items first
        codes, _ = reallocate_collisions(np.concatenate([existing, raw]), distances, cfg.quantize.sizes)
        if not np.array_equal(codes[:n_old], existing):
            raise RuntimeError("an existing item's semantic ID moved (bug)")
        new_codes = codes[n_old:]
    else:  # the run kept colliding IDs (quantize.reallocate: false): so do its new items
        new_codes = raw
    first_id = int(base.column("item_id").to_numpy().max()) + 1 + (0 if added is None else added.num_rows)
    columns: dict[str, Any] = {"item_id": pa.array(np.arange(first_id, first_id + items.num_rows), pa.int64())}
    columns |= {f"code_{j}": pa.array(new_codes[:, j], pa.int64()) for j in range(levels)}
    columns["sid"] = pa.array(sid_strings(new_codes).tolist(), pa.string())
    columns["moved"] = pa.array((new_codes != raw).any(1))  # the collision rule gave it another tuple
    # what the backoff rule's content term and neighbours compare (model.new_item_content, new_item_neighbours;
    # qbert.pipeline.data.content_vectors)
    columns["content"] = pa.array(list(content_vectors(feats)), pa.list_(pa.float32()))
    for c in items.column_names:
        if not c.startswith(FEATURE_PREFIX) and c not in columns:
            columns[c] = items.column(c)
    rows = pa.table(columns)
    try:
        table = rows if added is None else pa.concat_tables([added, rows], promote_options="permissive")
    except pa.ArrowException as e:
        raise DataError(f"{source}: its columns do not fit those of {run / NEW_ITEMS} ({e})") from None
    table = table.replace_schema_metadata({BASE_KEY: base_table_hash(run)})
    atomic_write_parquet(run / NEW_ITEMS, table)
    return rows


def base_table_hash(run: Path) -> str:
    from qbert.pipeline.ownership import file_hash

    return file_hash(run / "semantic_ids.parquet")


def read_added_items(run_dir: str | Path) -> pa.Table | None:
    """``RUN/new_items.parquet`` when ``qbert ids assign`` has added items, else None; refused when
    the run's semantic-ID table changed since (stage 2 ran again: the IDs may collide)."""
    path = Path(run_dir) / NEW_ITEMS
    if not path.is_file():
        return None
    table = read_parquet(path)
    made_for = (table.schema.metadata or {}).get(BASE_KEY.encode(), b"").decode()
    if made_for != base_table_hash(Path(run_dir)):
        raise DataError(f"{path}: assigned against another semantic-ID table than the run's (stage 2 ran again); "
                        "remove it and run `qbert ids assign` again")
    return table
