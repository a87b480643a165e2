"""Top-K recommendations from a finished pipeline run, in the dataset's original IDs.

    rec = Recommender.from_run("runs/instruments")
    table = rec.recommend(k=10)                      # every user of the run's dataset
    table = rec.recommend(users=["A2IBPI20UZIR0U"])  # some users (original user IDs)
    table = rec.recommend(histories={"u1": ["B0002E1G5C", "B0002GLDQM"]})  # any histories

One row per (user, rank): ``user_id, rank, item_id, score, sid`` -- the original user and item
IDs (ASINs on the Amazon datasets), the model's log P(semantic ID | history) and the item's
semantic ID. A user's history is their whole sequence (valid and test items included: the
recommendation is for what comes after everything the dataset has). Scoring is the evaluator's
batched, length-sorted pass (:func:`qbert.eval.evaluator.top_k`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from qbert.data.errors import DataError
from qbert.data.split import windows
from qbert.eval.evaluator import top_k
from qbert.train.optim import autocast

COLUMNS = ("user_id", "rank", "item_id", "score", "sid")


# what using a run reads (item_content.parquet: only runs whose ranking reads content, after qbert export)
RUN_FILES = ("model.pt", "config.yaml", "semantic_ids.parquet", "new_items.parquet", "item_content.parquet")


def catalogue_ids(run_dir: str | Path, num_items: int) -> list[str]:
    """The original IDs of the run's first ``num_items`` items, from its semantic-ID table."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "semantic_ids.parquet"
    if not path.is_file() or "orig_id" not in pq.read_schema(path).names:
        raise DataError(f"{path}: no orig_id column (runs made before it was recorded need their dataset)")
    table = pq.read_table(path, columns=["item_id", "orig_id"])
    order = np.argsort(table.column("item_id").to_numpy(), kind="stable")[:num_items]
    return [str(x) for x in np.asarray(table.column("orig_id").to_pylist(), dtype=object)[order]]


class Recommender:
    """A trained model with its catalogue: ``recommend`` answers in original IDs."""

    def __init__(self, model, cfg, dataset, sids: np.ndarray, device: torch.device | str = "cpu",
                 added_items: Sequence[str] = (), catalogue: Sequence[str] | None = None):
        """``dataset`` None: histories only (``catalogue``: the original item IDs, from the run's
        semantic-ID table), so a served model needs no copy of the training data."""
        self.model, self.cfg, self.dataset = model.eval(), cfg, dataset
        self.device = torch.device(device)
        self.sids = np.asarray(sids, dtype=object)
        known = catalogue if dataset is None else dataset.items.column("orig_id").to_pylist()
        self.item_ids = np.asarray([*known, *added_items], dtype=object)
        if len(self.item_ids) != model.num_items:
            raise ValueError(f"{len(self.item_ids)} item IDs for a catalogue of {model.num_items} items")
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        self._user_index = {} if dataset is None else {user: u for u, user in enumerate(dataset.user_ids)}

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", with_dataset: bool = True
                 ) -> "Recommender":
        """Load ``model.pt``, the semantic-ID table and the dataset of a finished ``qbert pipeline`` run,
        plus the items ``qbert ids assign`` added after training (``new_items.parquet``)."""
        from qbert.assign import read_added_items
        from qbert.pipeline import load_data, load_run_model
        from qbert.quantize.semantic_ids import sid_strings

        model, cfg = load_run_model(run_dir, device)  # with the catalogue's content when ranking reads it
        added = read_added_items(run_dir)
        added_ids: list[str] = []
        if added is not None:
            catalogue_content = model.catalogue_content.cpu() if model.uses_content else None
            new = np.stack([added.column(f"code_{j}").to_numpy() for j in range(model.K)], 1)
            trained = model.trained_items.nonzero()[:, 0].cpu()
            model.set_catalogue(torch.cat([model.codes.cpu(), torch.as_tensor(new, dtype=torch.long)]))
            model.set_trained_items(trained)  # the added items are new: ranked by model.new_item_scores
            added_ids = [str(x) for x in added.column("orig_id").to_pylist()]
            if catalogue_content is not None:  # the backoff rule's content term: the added items' too
                model.set_item_content(torch.cat([catalogue_content, _added_content(added, run_dir)]))
        sids = sid_strings(model.codes.cpu().numpy())
        if with_dataset:
            return cls(model, cfg, load_data(cfg).target, sids, device, added_ids)
        return cls(model, cfg, None, sids, device, added_ids, catalogue=catalogue_ids(run_dir, model.num_items
                                                                                      - len(added_ids)))

    # ------------------------------------------------------------------ histories
    def user_histories(self, users: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(original user IDs, token rows [U, max_len]) of the dataset's users (all when None)."""
        ds = self.dataset
        if ds is None:
            raise DataError("this recommender was loaded without the run's dataset: give histories, not users")
        if users is None:
            rows = np.arange(ds.num_users)
        else:
            missing = [u for u in users if u not in self._user_index]
            if missing:
                raise DataError(f"{len(missing)} user(s) not in dataset '{ds.name}' (first: {missing[0]!r})")
            rows = np.asarray([self._user_index[u] for u in users], dtype=np.int64)
        tokens = windows(ds.seq_items, ds.seq_offsets[rows], ds.seq_offsets[rows + 1], self.model.max_len,
                         pad=0, shift=1)
        return ds.user_ids[rows], tokens

    def history_tokens(self, histories: Mapping[str, Iterable[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, token rows) of histories given as original item IDs, oldest first."""
        keys = list(histories)
        seqs = []
        for key in keys:
            items = list(histories[key])
            unknown = [i for i in items if i not in self._item_index]
            if unknown:
                raise DataError(f"history of {key!r}: item {unknown[0]!r} is not in the catalogue "
                                "(new items get semantic IDs with `qbert ids assign` first)")
            if not items:
                raise DataError(f"history of {key!r} is empty")
            seqs.append([self._item_index[i] for i in items])
        lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
        flat = np.asarray([i for s in seqs for i in s], dtype=np.int64)
        ends = np.cumsum(lengths)
        tokens = windows(flat, ends - lengths, ends, self.model.max_len, pad=0, shift=1)
        return np.asarray(keys, dtype=object), tokens

    # ------------------------------------------------------------------ recommend
    def top_k(self, tokens: np.ndarray, k: int = 10, exclude_history: bool = False, batch_size: int = 1024,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(item rows [U, k], scores [U, k]) for token histories (``pad=0, shift=1``)."""
        with autocast(self.device, self.cfg.finetune.precision):
            return top_k(self.model.score, tokens, self.model.num_items, k, batch_size, exclude_history,
                         history_pad=0, history_shift=1, device=self.device, progress=progress)

    def recommend(self, users: Sequence[str] | None = None, histories: Mapping[str, Iterable[str]] | None = None,
                  k: int = 10, exclude_history: bool = False, batch_size: int = 1024,
                  progress: bool = False) -> pa.Table:
        """The ``k`` best items for each user (or each given history), as a table of ``COLUMNS``."""
        if users is not None and histories is not None:
            raise ValueError("give users or histories, not both")
        keys, tokens = self.history_tokens(histories) if histories is not None else self.user_histories(users)
        items, scores = self.top_k(tokens, k, exclude_history, batch_size, progress)
        n, kk = items.shape
        return pa.table({
            "user_id": pa.array(np.repeat(np.asarray(keys, dtype=object), kk).tolist(), pa.string()),
            "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), n)),
            "item_id": pa.array(self.item_ids[items.reshape(-1)].tolist(), pa.string()),
            "score": pa.array(scores.reshape(-1)),
            "sid": pa.array(self.sids[items.reshape(-1)].tolist(), pa.string()),
        })


def _added_content(added: pa.Table, run_dir: str | Path) -> torch.Tensor:
    """[A, D] content vectors ``qbert ids assign`` stored for the items it added."""
    column = added.column("content") if "content" in added.column_names else None
    if column is None or column.null_count:
        raise DataError(f"{Path(run_dir) / 'new_items.parquet'}: some items have no 'content' (assigned by an "
                        "older qbert); the model's content terms (model.content_dim, model.new_item_content, "
                        "model.new_item_neighbours, new_items: mixture) need it: remove the file and run `qbert ids "
                        "assign` again")
    return torch.as_tensor(np.asarray(column.to_pylist(), dtype=np.float32))
