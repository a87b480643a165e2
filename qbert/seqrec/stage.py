"""Stage 3 runners: multi-mask pretraining and fine-tuning of :class:`QBert4Rec`.

Both train through :func:`qbert.train.fit` (one loop for every stage) and take ``callbacks``,
``checkpoint_dir`` and an optional ``shard=(rank, world_size)`` so a distributed adapter can
give each worker a disjoint slice of every epoch's batches without touching this code.

Token matrices are the split's ``pad=0, shift=1`` views: 0 = padding, item i -> i + 1.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from qbert.config import Config
from qbert.data.split import LeaveOneOutSplit, windows
from qbert.eval.evaluator import history_mask, rank_targets
from qbert.eval.metrics import metrics_from_ranks, target_ranks
from qbert.seqrec import masks
from qbert.seqrec.batching import batch_indices
from qbert.seqrec.qbert4rec import QBert4Rec, masked_positions
from qbert.train.distributed import gather_interleaved, rank_world
from qbert.train.loop import Batches, Callback, FitResult, LoopConfig, fit
from qbert.train.optim import Precision, autocast, build_optimizer
from qbert.train.schedule import build_scheduler

MaskFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class SeqRecConfig(Config):
    """The bidirectional encoder over semantic IDs (paper: 4 layers, 4 heads, dropout 0.2).

    ``item_id`` none (the paper's model): items enter and leave the model only through their
    semantic IDs; ``input`` / ``input_and_head``: the hybrid baseline with an item-ID embedding
    (and an item-ID softmax). ``head``: how P(semantic ID | context) is estimated (see
    :mod:`qbert.seqrec.qbert4rec`).
    """

    hidden: int = Field(128, gt=0)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    ffn_mult: int = Field(4, ge=1)
    item_id: Literal["none", "input", "input_and_head"] = "none"
    head: Literal["catalogue", "levels"] = "catalogue"
    prefix_lengths: list[int] | None = None  # hashed prefix n-grams; None = lengths 2..K-1, [] = none
    prefix_buckets: int = Field(32768, ge=1)  # rows of the one shared prefix table (fixed; not the catalogue size)
    code_loss_weight: float = Field(1.0, ge=0.0)  # the per-level code cross-entropy next to the item softmax
    combine: Literal["sum", "concat"] = "sum"  # how an item's K code embeddings become one vector
    pre_ln: bool = False  # post-LN (BERT/RecBole) by default
    tie_codes: bool = False  # output code embeddings = input ones; untied trains much faster here
    # catalogue head: an item's output prefix rows = its input ones (biases stay separate), so a rare
    # item's rows learn from its occurrences in histories as well as from its few targets
    tie_prefix: bool = False
    code_score_weight: float = Field(1.0, ge=0.0)  # hybrid (item_id input_and_head): ranking weight of
    # the semantic-ID term next to the item-ID term
    repeat_bias: bool = False  # learn one logit shift for items already in the sequence
    prefix_bias: bool = False  # and one per code-prefix length for items sharing a prefix with them
    # ranking of items no training row held (cold-start items; paper's model only): "own" = their
    # composed score (the paper's rule); "backoff" to the trained items sharing their first code
    # (QBert4Rec.new_item_scores; weight and offset chosen on Instruments valid, docs/results.md);
    # "mixture": P(next is new) = new_item_share, then a softmax over the new items of
    # new_item_temperature x content cosine to the history + new_item_recency x to the last item +
    # new_item_cluster x log cluster share (QBert4Rec.mixture_scores; all fitted on valid by
    # likelihood: benchmarks/new_item_offset.py --mixture)
    new_items: Literal["own", "backoff", "mixture"] = "own"
    new_item_weight: float = Field(0.25, ge=0.0, le=1.0)
    new_item_offset: float = 1.5
    # > 0 (backoff only): add this times the cosine of a new item's content (stage 1's input features)
    # to the history's, which orders the new items of one cluster (chosen on valid; docs/method.md)
    new_item_content: float = Field(0.0, ge=0.0)
    # > 0 (backoff only): back off to the mean P of the new item's this many nearest trained items in
    # content (stage 1's input features) instead of the trained items sharing its first code
    new_item_neighbours: int = Field(0, ge=0)
    # backoff only: read the peers' P (first code or content neighbours) with the learned repeat shift
    # (repeat_bias) taken back off the history's items, so a new item like something the user already
    # has is not pushed down with it (ours; docs/method.md)
    new_item_peers_before_repeat: bool = False
    new_item_share: float = Field(0.1, gt=0.0, lt=1.0)  # mixture only
    new_item_temperature: float = 10.0  # mixture only
    new_item_recency: float = 0.0  # mixture only
    new_item_cluster: float = 0.0  # mixture only
    # > 0: each item's output vector and bias get a learned linear map of its content vector (stage
    # 1's input features, randomly projected to this many dimensions); the map is shared by all
    # items, so new items score from their content (not in the paper; docs/method.md)
    content_dim: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _content_term(self) -> "SeqRecConfig":
        if self.content_dim and (self.head != "catalogue" or self.item_id == "input_and_head"):
            raise ValueError(f"content_dim ({self.content_dim}) adds to the catalogue head's item vectors: it needs "
                             f"head: catalogue and no item-ID head (got head {self.head}, item_id {self.item_id})")
        backoff_rule = self.new_items == "backoff" and self.item_id == "none" and self.head == "catalogue"
        for name in ("new_item_content", "new_item_neighbours", "new_item_peers_before_repeat"):
            if getattr(self, name) and not backoff_rule:
                raise ValueError(f"{name} ({getattr(self, name)}) is a part of the backoff rule: it needs new_items: "
                                 f"backoff, item_id: none and head: catalogue (got {self.new_items}, "
                                 f"{self.item_id}, {self.head})")
        if self.new_item_peers_before_repeat and not self.repeat_bias:
            raise ValueError("new_item_peers_before_repeat reads the backoff rule's peers before the learned repeat "
                             "shift: it needs repeat_bias: true")
        if self.new_items == "mixture" and (self.item_id != "none" or self.head != "catalogue"):
            raise ValueError(f"new_items: mixture mixes the catalogue softmax of the paper's model with a content "
                             f"softmax: it needs item_id: none and head: catalogue (got {self.item_id}, {self.head})")
        return self


class ScheduleConfig(Config):
    """Learning-rate schedule of a training stage (``qbert.train.schedule``); constant = the paper's."""

    schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to min_lr_ratio * lr over `epochs`
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear warm-up from 0, in epochs (fractions allowed)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainStageConfig(ScheduleConfig):
    """What the two stage-3 training steps share besides the schedule."""

    # bf16: the step's matrix products in bfloat16 under autocast (weights, optimizer and ranking
    # scores stay fp32); auto: bf16 where the hardware has bf16 matrix units (docs/method.md, "Speed")
    precision: Precision = "auto"
    # the item softmax's negatives: "seen" = the items the training rows contain (an item no row
    # holds, e.g. a cold-start item, is never pushed down); "all" = the whole catalogue. Equal when
    # every item occurs in training (the usual leave-one-out case); "sampled" = per global batch, its
    # own targets plus `num_negatives` items drawn uniformly from the seen ones (a sampled softmax:
    # the step's cost no longer grows with the catalogue; ours, not the paper's)
    negatives: Literal["seen", "all", "sampled"] = "seen"
    num_negatives: int = Field(1024, ge=1)


class PretrainConfig(TrainStageConfig):
    """Multi-mask pretraining (Sec. 3.6): batch 512, lr 5e-4, span/multi-region/tail masks."""

    strategy: Literal["none", "mlm", "multi"] = "multi"  # Table 4 ablation rows
    epochs: int = Field(20, ge=0)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    span_ratio: float = Field(0.3, gt=0.0, le=1.0)
    multi_ratio: float = Field(0.15, gt=0.0, le=1.0)
    tail_ratio: float = Field(0.1, gt=0.0, le=1.0)
    strategy_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # span, multi-region, tail
    mlm_ratio: float = Field(0.3, gt=0.0, le=1.0)  # the single random mask of strategy "mlm"
    include_target: bool = True  # with pretrain_sources: also use the target's training part

    @field_validator("strategy_probs")
    @classmethod
    def _probs(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(p < 0 for p in v) or sum(v) <= 0:
            raise ValueError(f"strategy_probs must be non-negative with a positive sum, got {v}")
        return v


class FinetuneConfig(TrainStageConfig):
    """Target-domain fine-tuning: random mask 0.3, batch 256, lr 1e-4, early stop on valid NDCG@10."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    mask_ratio: float = Field(0.3, gt=0.0, le=1.0)
    last_prob: float = Field(0.5, ge=0.0, le=1.0)  # share of rows whose last item is also masked
    prefixes: bool = True  # train on every prefix of the training part (RecBole's augmented rows)
    # > 0 (with prefixes): each epoch trains on at most this many of a user's prefix rows, drawn
    # afresh every epoch, so a long history adds at most N rows to an epoch instead of one per item
    # (docs/results.md, "Cost growth"). 0: every prefix, every epoch (RecBole)
    max_rows_per_user: int = Field(0, ge=0)
    patience: int = Field(10, ge=0)
    monitor: str = "NDCG@10"
    eval_batch_size: int = Field(1024, ge=1)
    eval_every: int = Field(1, ge=1)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # > 0: validate, select and keep an EMA of the weights
    ema_ramp: float = Field(10.0, ge=1.0)  # decay at step t: min(ema_decay, (1 + t) / (ema_ramp + t)); see LoopConfig
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # of the item softmax (catalogue or item-ID head)
    # > 0: in each step this share of the softmax's items is scored as if it were new, without the
    # prefix rows no other trained item shares (QBert4Rec.pseudo_new_keep; the paper has none: 0)
    pseudo_new: float = Field(0.0, ge=0.0, lt=1.0)
    select_code_weight: list[float] = Field(default_factory=list)  # after training, re-rank valid
    # with each ranking weight of the semantic-ID term and keep the best (hybrid only; cheap:
    # the model runs once per user). Empty: keep model.code_score_weight

    @field_validator("select_code_weight")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        if any(w < 0 for w in v):
            raise ValueError(f"select_code_weight must hold weights >= 0, got {v}")
        return v


# ---------------------------------------------------------------------------- helpers
def build_model(cfg: SeqRecConfig, codes: np.ndarray | torch.Tensor, num_codes: int | list[int],
                max_len: int) -> QBert4Rec:
    """``num_codes``: one codebook size, or one per level (the model uses the largest)."""
    sizes = list(num_codes) if isinstance(num_codes, (list, tuple)) else None
    return QBert4Rec(torch.as_tensor(np.asarray(codes), dtype=torch.long), num_codes=max(sizes) if sizes else num_codes,
                     hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, dropout=cfg.dropout, max_len=max_len,
                     item_id=cfg.item_id, head=cfg.head, prefix_lengths=cfg.prefix_lengths,
                     prefix_buckets=cfg.prefix_buckets, code_loss_weight=cfg.code_loss_weight, combine=cfg.combine,
                     ffn_mult=cfg.ffn_mult, pre_ln=cfg.pre_ln, level_sizes=sizes, tie_codes=cfg.tie_codes,
                     tie_prefix=cfg.tie_prefix,
                     code_score_weight=cfg.code_score_weight, repeat_bias=cfg.repeat_bias,
                     prefix_bias=cfg.prefix_bias, new_items=cfg.new_items, new_item_weight=cfg.new_item_weight,
                     new_item_offset=cfg.new_item_offset, new_item_content=cfg.new_item_content,
                     content_dim=cfg.content_dim, new_item_share=cfg.new_item_share,
                     new_item_temperature=cfg.new_item_temperature, new_item_recency=cfg.new_item_recency,
                     new_item_cluster=cfg.new_item_cluster, new_item_neighbours=cfg.new_item_neighbours,
                     new_item_peers_before_repeat=cfg.new_item_peers_before_repeat)


def full_sequences(ds, max_len: int) -> np.ndarray:
    """[U, max_len] token rows of whole sequences (for source domains, which are never evaluated)."""
    return windows(ds.seq_items, ds.seq_offsets[:-1], ds.seq_offsets[1:], max_len, pad=0, shift=1)


def training_rows(split: LeaveOneOutSplit, max_len: int, prefixes: bool) -> np.ndarray:
    """Token rows of the target's training part only (never a valid or test target).

    ``prefixes``: one row per training-part prefix of length >= 2 (each ending at a training
    target, as RecBole's ``*.train.inter``), so the last position -- the one inference asks
    about -- is trained on every item; otherwise one row per user (its whole training part).
    """
    return training_rows_and_owners(split, max_len, prefixes)[0]


def training_rows_and_owners(split: LeaveOneOutSplit, max_len: int, prefixes: bool
                             ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`training_rows` and the user of each row."""
    if not prefixes:
        return split.train_sequences(pad=0, shift=1, max_len=max_len), np.arange(split.num_users)
    pos = split.train_target_positions()
    owners = split.train_owner(pos)
    rows = windows(split.train_items, split.train_start[owners], pos + 1, max_len, pad=0, shift=1)
    single = split.train_end - split.train_start == 1  # users whose training part is one item
    if single.any():
        rows = np.concatenate([rows, windows(split.train_items, split.train_start[single],
                                             split.train_end[single], max_len, pad=0, shift=1)])
        owners = np.concatenate([owners, np.flatnonzero(single)])
    return rows, owners


def rows_per_owner(owners: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``cap`` rows of each owner, drawn uniformly without replacement."""
    order = np.lexsort((rng.random(len(owners)), owners))  # grouped by owner, random within
    grouped = owners[order]
    rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return np.sort(order[rank < cap])


def row_draw_chance(owners: np.ndarray, cap: int) -> np.ndarray:
    """[rows] the chance that an epoch's :func:`rows_per_owner` draws each row: min(n, cap) / n for
    an owner with n rows (sums to the rows an epoch holds)."""
    per_owner = np.bincount(owners)
    return (np.minimum(per_owner, cap) / np.maximum(per_owner, 1))[owners]


def pretrain_mask_fn(cfg: PretrainConfig) -> MaskFn:
    if cfg.strategy == "mlm":
        return lambda valid, g: masks.random_mask(valid, cfg.mlm_ratio, g)
    if cfg.strategy == "multi":
        ratios = (cfg.span_ratio, cfg.multi_ratio, cfg.tail_ratio)
        return lambda valid, g: masks.multi_mask(valid, cfg.strategy_probs, ratios, g)[0]
    raise ValueError(f"pretraining strategy {cfg.strategy!r} has no mask")


def masked_batches(sequences: np.ndarray, batch_size: int, mask_fn: MaskFn, seed: int, device: torch.device,
                   shard: tuple[int, int] | None = None, bucket: bool = True,
                   pseudo_new: tuple[float, int] | None = None,
                   sampled: tuple[np.ndarray, int] | None = None,
                   per_owner: tuple[np.ndarray, int] | None = None) -> Callable[[int], Batches]:
    """``batches(epoch)``: shuffled rows with fresh masks each epoch, each batch trimmed to its
    longest row.

    ``bucket`` groups rows of similar length (:func:`batching.batch_indices`), so trimming
    removes most padding: Instruments' fine-tuning rows are mostly short prefixes.

    ``shard`` (rank, world): exact data parallelism (:mod:`qbert.train.distributed`). The epoch
    is cut into global batches of ``batch_size * world`` rows and each global batch's masks are
    drawn once from a generator without the rank in its seed, so every rank draws the masks one
    worker would draw; rank ``r`` then takes rows ``r::world``. Every batch carries ``norm``, the
    global batch's count of masked positions over ``world``: the loss divides by it instead of the
    local count (see
    :meth:`QBert4Rec.masked_loss`), so the ranks' averaged gradients are the global batch's. A
    rank left without rows by a short last batch gets one row with nothing masked (loss 0), so
    every rank takes the same steps.

    ``pseudo_new`` (share, catalogue size): every global batch also carries ``pseudo_new``, the [N]
    bool items its item softmax scores as new (:meth:`QBert4Rec.pseudo_new_keep`), drawn from a
    second rank-free generator (the same on every rank; the masks' draws are unchanged).

    ``sampled`` (pool of 0-based items, count): every global batch also carries ``candidates``, the
    sorted items of its sampled softmax: the global batch's masked targets plus ``count`` items of
    the pool that are not among them, drawn uniformly without replacement from a third rank-free
    generator, topped up to a multiple of 64 (fewer distinct matrix shapes) while the pool lasts.

    ``per_owner`` (owner of each row, cap): each epoch uses at most ``cap`` rows of each owner,
    drawn afresh from the epoch's generator (:func:`rows_per_owner`; the same on every rank).
    """
    rows = np.ascontiguousarray(sequences, dtype=np.int64)
    real = (rows != 0).any(axis=1)
    rows = rows[real]
    owners = np.asarray(per_owner[0])[real] if per_owner is not None else None
    pool = torch.as_tensor(np.asarray(sampled[0]), dtype=torch.long) if sampled is not None else None
    lengths = (rows != 0).sum(axis=1)
    rank, world = rank_world(shard)
    pin = torch.device(device).type == "cuda"

    def batches(epoch: int) -> Batches:
        rng = np.random.default_rng([seed, epoch])
        if owners is None:
            glob = batch_indices(lengths, batch_size * world, rng, bucket=bucket)
        else:
            kept = rows_per_owner(owners, per_owner[1], rng)
            glob = [kept[b] for b in batch_indices(lengths[kept], batch_size * world, rng, bucket=bucket)]
        return Batches(epoch_batches(epoch, glob), len(glob))

    def epoch_batches(epoch: int, glob: list[np.ndarray]) -> Iterator[dict[str, Any]]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # no rank: the masks of the global batch
        drops = torch.Generator().manual_seed(seed * 1_000_003 + epoch + (1 << 40))  # no rank: pseudo-new items
        negs = torch.Generator().manual_seed(seed * 1_000_003 + epoch + (2 << 40))  # no rank: sampled negatives
        for idx in glob:
            keep = int(lengths[idx].max())
            tokens = torch.from_numpy(rows[idx, rows.shape[1] - keep :])
            mask = mask_fn(tokens != 0, gen)
            batch: dict[str, Any] = {}
            if pseudo_new is not None:
                batch["pseudo_new"] = torch.rand(pseudo_new[1], generator=drops) < pseudo_new[0]
            if sampled is not None:
                batch["candidates"] = sampled_candidates(tokens[mask] - 1, pool, sampled[1], negs)
            if world > 1:
                batch["norm"] = max(int(mask.sum()), 1) / world
                if rank < len(idx):
                    tokens, mask = tokens[rank::world], mask[rank::world]
                else:  # a short last batch: one row, nothing masked
                    tokens, mask = tokens[:1], torch.zeros_like(mask[:1])
            # every data-dependent shape is settled here, on the host: the step never waits for the device
            tokens, mask, keep = masked_positions(tokens, mask, QBert4Rec.ROW_MULTIPLE)
            for name, t in (("tokens", tokens), ("mask", mask), ("keep", keep),
                            *((k, batch[k]) for k in ("pseudo_new", "candidates") if k in batch)):
                # page-locked host memory: the copy overlaps with the previous step on the GPU
                batch[name] = (t.pin_memory() if pin else t).to(device, non_blocking=True)
            yield batch

    return batches


def sampled_candidates(targets: torch.Tensor, pool: torch.Tensor, count: int, gen: torch.Generator,
                       multiple: int = 64) -> torch.Tensor:
    """Sorted 0-based items of one batch's sampled softmax: the distinct ``targets`` plus ``count``
    other items of ``pool``, uniformly without replacement, topped up to a multiple of ``multiple``
    while the pool lasts."""
    pos = torch.unique(targets)
    need = -(-(len(pos) + count) // multiple) * multiple - len(pos)
    if 4 * (need + len(pos)) < len(pool):  # few of many: i.i.d. draws, distinct in order of first draw
        draws = pool[torch.randint(len(pool), (2 * (need + len(pos)) + 64,), generator=gen)]
        order, where = torch.sort(draws, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = order[1:] != order[:-1]
        others = draws[torch.sort(where[first]).values]  # a uniformly random ordered sample of the pool
        others = others[~torch.isin(others, pos)]
        if len(others) >= need:  # else (rare): the permutation below
            return torch.sort(torch.cat([pos, others[:need]])).values
    others = pool[torch.randperm(len(pool), generator=gen)]
    others = others[~torch.isin(others, pos)]
    return torch.sort(torch.cat([pos, others[:need]])).values


def _sampled(rows: np.ndarray, cfg: TrainStageConfig) -> tuple[np.ndarray, int] | None:
    """``masked_batches``' ``sampled``: negatives from the items ``rows`` contain (``negatives: sampled``)."""
    return (np.unique(rows[rows > 0]) - 1, cfg.num_negatives) if cfg.negatives == "sampled" else None


@contextlib.contextmanager
def _candidates(model: QBert4Rec, rows: np.ndarray, negatives: str) -> Iterator[None]:
    """The training softmax over the items ``rows`` contain (``negatives: seen``, and the pool of
    ``sampled``) while training."""
    model.set_train_candidates(np.unique(rows[rows > 0]) - 1 if negatives != "all" else None)
    try:
        yield
    finally:
        model.set_train_candidates(None)


def masked_step(model: QBert4Rec, batch: dict[str, Any],
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    return model.masked_loss(batch["tokens"], batch["mask"], label_smoothing, norm=batch.get("norm"),
                             keep=batch.get("keep"), pseudo_new=batch.get("pseudo_new"),
                             candidates=batch.get("candidates"))


def split_ranks(model: QBert4Rec, split: LeaveOneOutSplit, which: str, batch_size: int = 1024,
                device: torch.device | str = "cpu", protocols: tuple[str, ...] = ("kept", "excluded"),
                precision: Precision = "fp32", progress: bool = False,
                shard: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Per-user 0-based target ranks of ``which`` in {'valid', 'test'} under each ranking protocol
    (history items kept / excluded), from one scoring pass. ``precision`` is the encoder's (the
    scores themselves are always fp32). ``shard`` (rank, world): each rank scores users
    ``rank::world`` and the ranks are gathered back in the users' order (every rank returns all)."""
    if model.num_items != split.num_items:
        raise ValueError(f"model catalogue has {model.num_items} items, split has {split.num_items}")
    rank, world = rank_world(shard)
    hist, tgt = split.history(which, pad=0, shift=1), split.targets(which)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            ranks = rank_targets(model.score, hist[rank::world], tgt[rank::world], split.num_items,
                                 batch_size=batch_size, protocols=protocols, history_pad=0, history_shift=1,
                                 device=device, progress=progress, desc=f"eval[{which}]")
    finally:
        model.train(was_training)
    return {p: gather_interleaved(r, len(tgt), (rank, world)) for p, r in ranks.items()}


def evaluate_split(model: QBert4Rec, split: LeaveOneOutSplit, which: str, batch_size: int = 1024,
                   device: torch.device | str = "cpu", exclude_history: bool = False,
                   precision: Precision = "fp32", progress: bool = False,
                   shard: tuple[int, int] | None = None) -> dict[str, float]:
    """Full-ranking metrics of ``which`` in {'valid', 'test'} with the foundation's evaluator
    (sharded by user over ranks with ``shard``)."""
    protocol = "excluded" if exclude_history else "kept"
    r = split_ranks(model, split, which, batch_size, device, (protocol,), precision, progress, shard)[protocol]
    return {**metrics_from_ranks(r), "users": int(len(r))}


@torch.no_grad()
def select_code_weight(model: QBert4Rec, split: LeaveOneOutSplit, weights: Sequence[float], monitor: str = "NDCG@10",
                       batch_size: int = 1024, device: torch.device | str = "cpu",
                       exclude_history: bool = False, precision: Precision = "fp32"
                       ) -> tuple[float, dict[float, dict[str, float]]]:
    """Choose the ranking weight of the semantic-ID term on **valid** (never test).

    Runs the model once per valid user and re-combines its two score parts for every weight.
    Sets ``model.code_score_weight`` to the best one (ties: the earlier in ``weights``) and
    returns it with the valid metrics of every weight.
    """
    if not weights:
        raise ValueError("select_code_weight needs at least one weight")
    if not model.id_head:
        raise ValueError("select_code_weight needs the hybrid's item-ID head (model.item_id: input_and_head): "
                         "without it the weight does not change the ranking")
    was_training = model.training
    model.eval()
    hist, tgt = split.history("valid", pad=0, shift=1), split.targets("valid")
    ranks: dict[float, list[torch.Tensor]] = {float(w): [] for w in weights}
    try:
        for lo in range(0, len(tgt), batch_size):
            h = torch.as_tensor(hist[lo : lo + batch_size], device=device)
            t = torch.as_tensor(tgt[lo : lo + batch_size], device=device)
            with autocast(device, precision):
                codes, ids = model.score_parts(h)
            assert ids is not None
            exclude = history_mask(h, split.num_items, pad=0, shift=1) if exclude_history else None
            for w in ranks:
                ranks[w].append(target_ranks(w * codes + ids, t, exclude).cpu())
    finally:
        model.train(was_training)
    table = {w: metrics_from_ranks(torch.cat(r)) for w, r in ranks.items()}
    if monitor not in next(iter(table.values())):
        raise ValueError(f"unknown monitor {monitor!r}; expected one of {sorted(next(iter(table.values())))}")
    best = max(table, key=lambda w: table[w][monitor])  # max keeps the first of equal values
    model.code_score_weight = best
    return best, table


def _scheduler(optimizer: torch.optim.Optimizer, cfg: PretrainConfig | FinetuneConfig, sequences: np.ndarray,
               shard: tuple[int, int] | None, per_owner: tuple[np.ndarray, int] | None = None):
    """Per-step schedule over the whole epoch budget; a step is one global batch (all ranks), as
    in :func:`masked_batches`, which drops all-padding rows (and keeps ``per_owner``'s cap)."""
    world = shard[1] if shard is not None else 1
    real = (np.asarray(sequences) != 0).any(axis=1)
    rows = int(real.sum()) if per_owner is None else round(float(
        row_draw_chance(np.asarray(per_owner[0])[real], per_owner[1]).sum()))
    steps = max(math.ceil(rows / (cfg.batch_size * world)), 1)
    return build_scheduler(optimizer, cfg.schedule, cfg.epochs * steps, round(cfg.warmup_epochs * steps),
                           cfg.min_lr_ratio)


# ---------------------------------------------------------------------------- runners
def pretrain(model: QBert4Rec, sequences: np.ndarray, cfg: PretrainConfig, device: torch.device | str = "cpu",
             seed: int = 0, callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
             shard: tuple[int, int] | None = None, progress: bool = True) -> FitResult | None:
    """Masked-item pretraining on token rows [M, L] (training parts only; the caller guarantees it).

    Returns None for strategy ``none``. The model's catalogue (``set_catalogue``) must cover
    every item token in ``sequences``.
    """
    if cfg.strategy == "none" or cfg.epochs == 0:
        return None
    seqs = np.asarray(sequences)
    if seqs.ndim != 2 or seqs.shape[1] > model.max_len:
        raise ValueError(f"pretraining sequences must be [rows, <= {model.max_len}], got shape {seqs.shape}")
    if seqs.size and (seqs.min() < 0 or seqs.max() > model.num_items):
        raise ValueError(f"pretraining tokens must lie in [0, {model.num_items}] (0 = padding), "
                         f"got range [{seqs.min()}, {seqs.max()}]")
    device = torch.device(device)
    model.to(device)
    loop = LoopConfig(epochs=cfg.epochs, patience=0, monitor="loss", mode="min", progress=progress,
                      precision=cfg.precision)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    batches = masked_batches(seqs, cfg.batch_size, pretrain_mask_fn(cfg), seed, device, shard,
                             sampled=_sampled(seqs, cfg))
    with _candidates(model, seqs, cfg.negatives):
        return fit(model, opt, batches, masked_step, loop, scheduler=_scheduler(opt, cfg, seqs, shard),
                   callbacks=callbacks, checkpoint_dir=checkpoint_dir, desc=f"pretrain[{cfg.strategy}]")


def finetune(model: QBert4Rec, split: LeaveOneOutSplit, cfg: FinetuneConfig, device: torch.device | str = "cpu",
             seed: int = 0, callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
             shard: tuple[int, int] | None = None, exclude_history: bool = False,
             progress: bool = True) -> FitResult:
    """Fine-tune on the target's training sequences; early stopping on valid ``cfg.monitor``.

    The best epoch's weights are loaded into ``model`` on return.
    """
    if model.num_items != split.num_items:
        raise ValueError(f"model catalogue has {model.num_items} items, target has {split.num_items}: "
                         "call set_catalogue with the target's semantic-ID table first")
    device = torch.device(device)
    model.to(device)
    seqs, owners = training_rows_and_owners(split, model.max_len, cfg.prefixes)
    per_owner = (owners, cfg.max_rows_per_user) if cfg.max_rows_per_user > 0 else None
    mask_fn: MaskFn = lambda valid, g: masks.finetune_mask(valid, cfg.mask_ratio, cfg.last_prob, g)  # noqa: E731

    def evaluate(m: torch.nn.Module, epoch: int) -> dict[str, float]:
        out = evaluate_split(model, split, "valid", cfg.eval_batch_size, device, exclude_history, cfg.precision,
                             shard=shard)
        out.pop("users", None)
        return out

    loop = LoopConfig(epochs=cfg.epochs, patience=cfg.patience, monitor=cfg.monitor, mode="max",
                      eval_every=cfg.eval_every, progress=progress, ema_decay=cfg.ema_decay,
                      ema_ramp=cfg.ema_ramp, precision=cfg.precision)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    batches = masked_batches(seqs, cfg.batch_size, mask_fn, seed, device, shard,
                             pseudo_new=(cfg.pseudo_new, model.num_items) if cfg.pseudo_new else None,
                             sampled=_sampled(seqs, cfg), per_owner=per_owner)
    step = partial(masked_step, label_smoothing=cfg.label_smoothing)
    model.set_trained_items(np.unique(seqs[seqs > 0]) - 1)  # the rest are ranked as new (new_item_scores)
    with _candidates(model, seqs, cfg.negatives):
        return fit(model, opt, batches, step, loop, evaluate=evaluate,
                   scheduler=_scheduler(opt, cfg, seqs, shard, per_owner),
                   callbacks=callbacks, checkpoint_dir=checkpoint_dir, desc="finetune")
