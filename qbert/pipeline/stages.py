"""The four stages, each defined once (:data:`REGISTRY`): what it runs, reads, writes and depends on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from qbert.data.dataset import SeqDataset
from qbert.data.errors import DataError
from qbert.eval.report import PROTOCOL_KEYS, by_protocol, cold_start_report, write_ranks
from qbert.pipeline.config import METRIC_KEYS, PipelineConfig
from qbert.pipeline.data import (
    PipelineData,
    content_vectors,
    pretraining_domains,
    pretraining_rows,
    stage_features,
    target_content,
    target_split,
)
from qbert.seqrec.stage import build_model, finetune, pretrain, select_code_weight, split_ranks
from qbert.train.loop import Callback
from qbert.utils.io import atomic_path, atomic_write_json, load_weights
from qbert.utils.runtime import pick_device, seed_everything

log = logging.getLogger(__name__)

def _cbs(callbacks: Iterable[Callback] | None) -> list[Callback]:
    return list(callbacks or ())


def run_fusion_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                     callbacks: Iterable[Callback] = (), shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stage 1 -> ``fused_embeddings.parquet``, ``fusion_report.json``, ``fusion_model.pt``."""
    from qbert.fusion.train import default_loop_config as fusion_loop_config
    from qbert.fusion.train import train_fusion, write_fusion_embeddings

    out = Path(out_dir)
    items = data.all_items
    loop = fusion_loop_config(cfg.fusion).model_copy(update={"progress": cfg.progress})
    res = train_fusion(stage_features(cfg, data), cfg.fusion, loop, callbacks=_cbs(callbacks),
                       checkpoint_dir=out / "checkpoints" / "fusion", num_items=items.num_items, shard=shard)
    write_fusion_embeddings(out / "fused_embeddings.parquet", res.embeddings, np.arange(items.num_items))
    with atomic_path(out / "fusion_model.pt") as tmp:
        torch.save({"config": cfg.fusion.to_dict(), "num_items": items.num_items,
                    "state_dict": res.model.state_dict()}, tmp)
    atomic_write_json(out / "fusion_report.json", res.report)
    return res.report


def run_quantize_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                       callbacks: Iterable[Callback] = (), shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stage 2: ``fused_embeddings.parquet`` -> ``rqvae.pt``, ``semantic_ids.parquet``, report."""
    from qbert.fusion.train import read_fusion_embeddings
    from qbert.quantize import train_rqvae
    from qbert.quantize.train import default_loop_config as rqvae_loop_config

    out = Path(out_dir)
    ids, emb = read_fusion_embeddings(out / "fused_embeddings.parquet")
    if len(ids) != data.all_items.num_items:
        raise DataError(f"{out / 'fused_embeddings.parquet'}: {len(ids)} items, data has {data.all_items.num_items}")
    loop = rqvae_loop_config(cfg.quantize).model_copy(update={"progress": cfg.progress})
    res = train_rqvae(emb, cfg.quantize, loop, callbacks=_cbs(callbacks),
                      checkpoint_dir=out / "checkpoints" / "quantize", shard=shard)
    res.save(out, ids, columns=item_columns(data.all_items))
    return dict(res.report)


def item_columns(items: SeqDataset) -> dict[str, Any]:
    """What the semantic-ID table carries beside the codes, so it reads without the dataset: the
    original item ID, the first text column (e.g. the title) and, in multi-domain runs, the domain."""
    table = items.items
    text = items.meta.get("text_columns") or []
    names = [c for c in ("orig_id", *text[:1], "domain") if c in table.column_names]
    return {c: table.column(c) for c in dict.fromkeys(names)}


def read_codes(out_dir: str | Path, num_items: int) -> np.ndarray:
    """[num_items, K] codes of items 0..num_items-1 of the run's semantic-ID table (read and
    validated by stage 2's one reader; a corrupt table is an error naming it)."""
    from qbert.quantize.semantic_ids import read_semantic_ids

    p = Path(out_dir) / "semantic_ids.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"semantic-ID table not found: {p} (run the quantize stage first)")
    ids, codes = read_semantic_ids(p, require_unique=False)  # sorted by item id
    if len(codes) < num_items or not np.array_equal(ids[:num_items], np.arange(num_items)):
        raise DataError(f"{p}: expected codes for items 0..{num_items - 1}, got {len(ids)} rows")
    return codes[:num_items]


def _model_for(cfg: PipelineConfig, codes: np.ndarray):
    return build_model(cfg.model, codes, cfg.quantize.sizes, cfg.data.max_len)


def run_pretrain_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                       callbacks: Iterable[Callback] = (), shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stage 3a: masked pretraining -> ``pretrain.pt``. Strategy ``none`` writes nothing."""
    out = Path(out_dir)
    if cfg.pretrain.strategy == "none" or cfg.pretrain.epochs == 0:
        (out / "pretrain.pt").unlink(missing_ok=True)
        return {"strategy": cfg.pretrain.strategy, "skipped": True}
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    codes = read_codes(out, data.all_items.num_items)
    rows = pretraining_rows(cfg, data)
    model = _model_for(cfg, codes)
    if model.content_out is not None:  # item vectors with a content term: every pretraining item's content
        model.set_item_content(content_vectors(stage_features(cfg, data)))
    res = pretrain(model, rows, cfg.pretrain, device, seed=cfg.seed, callbacks=_cbs(callbacks),
                   checkpoint_dir=out / "checkpoints" / "pretrain", shard=shard, progress=cfg.progress)
    with atomic_path(out / "pretrain.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "num_items": model.num_items, "multi_domain": data.multi_domain,
                    "strategy": cfg.pretrain.strategy}, tmp)
    assert res is not None
    return {"strategy": cfg.pretrain.strategy, "rows": int(len(rows)), "epochs": len(res.history),
            "final_loss": res.history[-1]["loss"] if res.history else None, "train_seconds": res.train_seconds,
            "samples_per_second": res.samples_per_second, "domains": pretraining_domains(cfg, data),
            "history": [{k: float(v) for k, v in h.items()} for h in res.history]}


def run_finetune_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                       callbacks: Iterable[Callback] = (), shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stage 3b: fine-tune on the target (from ``pretrain.pt`` when present) -> ``model.pt``;
    returns valid (best epoch) and test metrics."""
    out = Path(out_dir)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed + 1)
    split = target_split(cfg, data)
    model = _model_for(cfg, read_codes(out, data.target.num_items))
    if model.uses_content:  # content terms of the item vectors (content_dim) or of the backoff rule
        model.set_item_content(target_content(cfg, data))
    init = "scratch"
    pre = out / "pretrain.pt"
    if cfg.pretrain.strategy != "none" and pre.is_file():
        payload = load_weights(pre, "pretrained encoder")
        same_catalogue = not payload.get("multi_domain") and payload.get("num_items") == model.num_items
        model.load_encoder(payload["model"], with_catalogue=same_catalogue)
        init = "pretrained" + ("" if same_catalogue else " (shared encoder and code embeddings)")
    res = finetune(model, split, cfg.finetune, device, seed=cfg.seed, callbacks=_cbs(callbacks),
                   checkpoint_dir=out / "checkpoints" / "finetune", shard=shard,
                   exclude_history=cfg.eval.exclude_history, progress=cfg.progress)
    valid = {k: res.best_metrics[k] for k in METRIC_KEYS if k in res.best_metrics}
    weights: dict[str, Any] = {}
    if cfg.finetune.select_code_weight:  # on valid only, before test is looked at (hybrid only)
        best, table = select_code_weight(model, split, cfg.finetune.select_code_weight, cfg.finetune.monitor,
                                         cfg.eval.batch_size, device, cfg.eval.exclude_history,
                                         cfg.finetune.precision)
        valid = {k: table[best][k] for k in METRIC_KEYS}
        weights = {"code_score_weight": best, "code_weight_valid": {str(w): m for w, m in table.items()}}
        log.info("ranking weight of the semantic-ID term chosen on valid: %g (%s %.4f)", best,
                 cfg.finetune.monitor, table[best][cfg.finetune.monitor])
    if model.repeat_weight is not None:  # the learned logit shift of items already in the history
        weights["repeat_weight"] = float(model.repeat_weight.detach())
    if model.prefix_weight is not None:  # ... and of items sharing their first 1..K-1 codes with one
        weights["prefix_weight"] = [float(w) for w in model.prefix_weight.detach()]
    t0 = time.perf_counter()
    protocols = ("kept", "excluded")
    valid_ranks = split_ranks(model, split, "valid", cfg.eval.batch_size, device, protocols, cfg.finetune.precision,
                              shard=shard)
    ranks = {"valid": valid_ranks}
    if cfg.eval.test:
        ranks["test"] = split_ranks(model, split, "test", cfg.eval.batch_size, device, protocols,
                                    cfg.finetune.precision, shard=shard)
        write_ranks(out / "test_ranks.parquet", split.targets("test"), ranks["test"])
    by_split = {which: by_protocol(r) for which, r in ranks.items()}
    test = by_split["test"][PROTOCOL_KEYS["excluded" if cfg.eval.exclude_history else "kept"]] if cfg.eval.test else {}
    cold = cold_start_report(split, ranks, cfg.data.cold_start)  # users whose target is a new item vs the rest
    eval_seconds = time.perf_counter() - t0
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "config": cfg.to_dict(), "num_items": model.num_items,
                    "code_score_weight": model.code_score_weight,
                    "data_fingerprint": data.target.fingerprint()}, tmp)
    return {"init": init, "valid": valid, "test": {k: test[k] for k in METRIC_KEYS if k in test},
            "by_protocol": by_split, **weights, "best_epoch": res.best_epoch,
            "epochs_run": len(res.history), "stopped_early": res.stopped_early, "train_seconds": res.train_seconds,
            "untrained_items": int((~model.trained_items).sum()),
            "samples_per_second": res.samples_per_second,
            "eval_seconds_per_user": eval_seconds / (split.num_users * (2 if cfg.eval.test else 1)),
            "params": sum(p.numel() for p in model.parameters()),
            "item_indexed_parameters": model.item_indexed_parameters(), **({"cold_start": cold} if cold else {}),
            "history": [{k: v for k, v in h.items()} for h in res.history]}


@dataclass(frozen=True)
class Stage:
    """One step of the method, defined once; every driver and executor reads this.

    ``run(cfg, data, out_dir, callbacks=(), shard=None) -> report`` trains through
    :func:`qbert.train.fit`; ``depends_on`` are the config sections its output depends on (for
    reuse: with the stages before it); ``reads`` / ``writes`` the run-directory artifacts it needs
    from earlier stages / leaves; ``batch_keys`` the global batch sizes a data-parallel executor
    divides among its workers; ``model`` marks the stage whose model evaluation loads; ``ignores``
    dotted keys inside its ``depends_on`` sections that its output does not depend on (a later stage
    that does names them in its own ``depends_on``).
    """

    name: str
    run: Callable[..., dict[str, Any]]
    depends_on: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    batch_keys: tuple[str, ...] = ()
    model: bool = False
    ignores: tuple[str, ...] = ()


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("fusion", run_fusion_stage, ("data", "pretrain_sources", "fusion", "seed"), (),
          ("fused_embeddings.parquet", "fusion_model.pt", "fusion_report.json"), ("fusion.batch_size",),
          # stage 1 reads content only: the cold-start protocol withholds interactions, not content
          ignores=("data.cold_start",)),
    Stage("quantize", run_quantize_stage, ("quantize",), ("fused_embeddings.parquet",),
          ("rqvae.pt", "semantic_ids.parquet", "quantize_report.json"), ("quantize.batch_size",)),
    Stage("pretrain", run_pretrain_stage, ("model", "pretrain", "data.cold_start"), ("semantic_ids.parquet",),
          ("pretrain.pt",),
          ("pretrain.batch_size",)),
    Stage("finetune", run_finetune_stage, ("finetune", "eval"), ("semantic_ids.parquet", "pretrain.pt"),
          ("model.pt", "test_ranks.parquet"), ("finetune.batch_size",), model=True),
)}
STAGES = tuple(REGISTRY)  # in order; ReuseSection's first three
MODEL_STAGE = next(s.name for s in REGISTRY.values() if s.model)


