"""End to end: stage 1 (fusion) -> stage 2 (RQ-VAE semantic IDs) -> stage 3 (pretrain, finetune)
-> full-ranking evaluation, every artifact under one run directory.

Each stage is a function of ``(cfg, data, out_dir, callbacks)`` that reads its inputs from and
writes its outputs to ``out_dir``, so a platform adapter (Ray Train worker, Tune trial) can run
one stage alone. ``run_pipeline`` chains them and adds the run summary and plots.

Run directory::

    config.yaml               the exact PipelineConfig
    fused_embeddings.parquet  item_id, embedding (stage 1; over every domain's items)
    fusion_report.json        activated-layer distribution, modality-vs-fused MSE
    rqvae.pt                  RQ-VAE weights and codebooks (stage 2)
    semantic_ids.parquet      item_id, code_0..code_{K-1}, sid[, domain]
    quantize_report.json      collisions before/after reallocation, utilisation, perplexity
    pretrain.pt               encoder after pretraining (absent for strategy "none")
    model.pt                  fine-tuned model (best valid epoch)
    checkpoints/<stage>/      last.pt of each stage (resume)
    metrics.json              test/valid HR@1/5/10, NDCG@5/10 (both ranking protocols) + per-stage reports
    test_ranks.parquet        user, target, 0-based test rank with history kept / excluded
    summary.json              git commit, data fingerprints, machine, timings, config
    plots/*.png               activated layers, codebook utilisation

Multi-domain: with ``pretrain_sources`` the target and the sources are assembled into one
item space (target first, so its item ids are unchanged); fusion and the RQ-VAE run over all
items, so every domain's semantic IDs come from one shared code vocabulary. Pretraining then
uses the sources' whole sequences plus (``pretrain.include_target``) the target's training
part; fine-tuning and evaluation use the target alone with its own rows of the table.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator

from qbert.config import Config, ConfigError, flatten_dict
from qbert.data.dataset import SeqDataset
from qbert.data.errors import DataError
from qbert.data.split import LeaveOneOutSplit
from qbert.data.synthetic import SyntheticConfig, make_synthetic
from qbert.fusion.config import FusionConfig
from qbert.quantize.config import QuantizeConfig, check_capacity
from qbert.eval.metrics import metrics_from_ranks
from qbert.seqrec.stage import (FinetuneConfig, PretrainConfig, SeqRecConfig, build_model, evaluate_split, finetune,
                                full_sequences, pretrain, select_code_weight, split_ranks)
from qbert.train.loop import Callback
from qbert.train.optim import resolve_precision
from qbert.utils.io import atomic_path, atomic_write_json, load_weights
from qbert.utils.runtime import git_commit, machine_info, pick_device, seed_everything

log = logging.getLogger(__name__)

Modality = Literal["text", "image", "id"]
METRIC_KEYS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
STAGES = ("fusion", "quantize", "pretrain", "finetune")
CallbacksFactory = Callable[[str], Iterable[Callback]]


class DataSection(Config):
    """Where the target dataset comes from and which modality inputs feed stage 1."""

    source: str = "synthetic"  # "synthetic", "synthetic:k=v,...", or a path read_source understands
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)  # used when source == "synthetic"
    options: dict[str, Any] = Field(default_factory=dict)  # reader options (e.g. with_codes: true)
    max_len: int = Field(50, ge=2)  # history length (the [MASK] takes one slot at inference)
    modalities: list[Modality] | None = None  # None: fusion.modalities; else it overrides fusion.modalities
    features: dict[str, str | list[str]] = Field(default_factory=lambda: {"text": "text", "image": "image"})
    # modality -> feature column name without "feat_" (e.g. {"text": "lemb_codes"} on Instruments),
    # or a list of columns: each is L2-normalised, then they are concatenated into one vector, so
    # two views of one modality (real title embeddings and the LLaMA code file) weigh equally

    def columns(self, modality: str) -> list[str]:
        col = self.features[modality]
        return [col] if isinstance(col, str) else list(col)

    @field_validator("features")
    @classmethod
    def _columns(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for m, col in v.items():
            if not isinstance(col, str) and (not col or len(set(col)) != len(col)):
                raise ValueError(f"data.features.{m} must be a column name or a non-empty list of distinct "
                                 f"column names, got {col!r}")
        return v


class EvalSection(Config):
    exclude_history: bool = False  # the protocol that selects on valid; RecBole's full sort keeps history items
    batch_size: int = Field(1024, ge=1)
    test: bool = True  # False: never score test (search runs choose on valid and keep it off)


class ReuseSection(Config):
    """Take the first stages' outputs from a finished run instead of training them again.

    For sweeps over later-stage settings (Fig. 5's fine-tuning mask probability needs neither a
    new fusion, nor new semantic IDs, nor a new pretraining): the run copies those stages'
    artifacts from ``from_run`` after checking that every setting they depend on is the same.
    """

    from_run: str | None = None  # a run directory of an earlier `qbert pipeline`
    stages: list[Literal["fusion", "quantize", "pretrain"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _prefix(self) -> "ReuseSection":
        if self.stages and self.stages != list(STAGES[: len(self.stages)]):
            raise ValueError(f"reuse.stages must be the first stages in order {list(STAGES[:3])}, got {self.stages}")
        if self.stages and not self.from_run:
            raise ValueError("reuse.stages is set but reuse.from_run names no run directory")
        return self


class PipelineConfig(Config):
    """Everything one Q-BERT4Rec run needs. The top-level ``seed``/``device`` apply to every stage."""

    data: DataSection = Field(default_factory=DataSection)
    pretrain_sources: list[str] = Field(default_factory=list)  # extra domains; empty = target's training part
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    model: SeqRecConfig = Field(default_factory=SeqRecConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    reuse: ReuseSection = Field(default_factory=ReuseSection)
    seed: int = 42
    device: str = "auto"
    progress: bool = False
    plots: bool = True

    @model_validator(mode="after")
    def _sync(self) -> "PipelineConfig":
        # data.modalities (when set) is the one switch: stage 1 and stage 3 both follow it
        if self.data.modalities is not None and self.fusion.modalities != self.data.modalities:
            fusion = FusionConfig.from_dict({**self.fusion.to_dict(), "modalities": list(self.data.modalities)})
            object.__setattr__(self, "fusion", fusion)
        for m in self.fusion.feature_modalities:
            if m not in self.data.features:
                raise ValueError(f"modality '{m}' is enabled but data.features names no column for it")
        if self.finetune.label_smoothing and self.model.head == "levels" and self.model.item_id != "input_and_head":
            raise ValueError(f"finetune.label_smoothing ({self.finetune.label_smoothing}) smooths an item softmax: "
                             "it needs model.head 'catalogue' or model.item_id 'input_and_head'")
        if self.finetune.select_code_weight and self.model.item_id != "input_and_head":
            raise ValueError("finetune.select_code_weight chooses the hybrid's ranking weight: it needs "
                             f"model.item_id 'input_and_head' (got {self.model.item_id!r})")
        object.__setattr__(self, "fusion", self.fusion.model_copy(update={"seed": self.seed, "device": self.device}))
        object.__setattr__(self, "quantize", self.quantize.model_copy(update={"seed": self.seed, "device": self.device}))
        return self


def quickstart_config() -> PipelineConfig:
    """The embedded default of ``qbert pipeline`` (= ``configs/synthetic.yaml``; a test keeps them
    equal): synthetic data, sized for a few minutes on 2 CPU cores. Built in, so an installed
    package without the repository's ``configs/`` still runs the quick start."""
    return PipelineConfig.from_dict({
        "data": {"source": "synthetic", "max_len": 20, "modalities": ["text", "image", "id"],
                 "synthetic": {"seed": 0, "num_users": 1000, "num_items": 400, "num_clusters": 20}},
        "fusion": {"dim": 64, "epochs": 20, "batch_size": 256},
        "quantize": {"levels": 3, "codebook_size": 32, "hidden": [128, 64], "code_dim": 16, "epochs": 60,
                     "batch_size": 256},
        "model": {"hidden": 64, "layers": 2, "heads": 2, "dropout": 0.1, "prefix_buckets": 1024},
        "pretrain": {"strategy": "multi", "epochs": 10, "batch_size": 128, "lr": 1e-3},
        "finetune": {"epochs": 40, "batch_size": 64, "lr": 1e-3, "patience": 5},
        "eval": {"exclude_history": False},
        "seed": 42, "device": "auto",
    }, source="quickstart_config")


# ------------------------------------------------------------------------------------------ data
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
    ds = data.all_items
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


# ---------------------------------------------------------------------------------------- stages
def _cbs(callbacks: Iterable[Callback] | None) -> list[Callback]:
    return list(callbacks or ())


def run_fusion_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                     callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Stage 1 -> ``fused_embeddings.parquet``, ``fusion_report.json``, ``fusion_model.pt``."""
    from qbert.fusion.train import train_fusion, write_fusion_embeddings

    out = Path(out_dir)
    items = data.all_items
    res = train_fusion(stage_features(cfg, data), cfg.fusion, callbacks=_cbs(callbacks),
                       checkpoint_dir=out / "checkpoints" / "fusion", num_items=items.num_items)
    write_fusion_embeddings(out / "fused_embeddings.parquet", res.embeddings, np.arange(items.num_items))
    with atomic_path(out / "fusion_model.pt") as tmp:
        torch.save({"config": cfg.fusion.to_dict(), "num_items": items.num_items,
                    "state_dict": res.model.state_dict()}, tmp)
    atomic_write_json(out / "fusion_report.json", res.report)
    return res.report


def run_quantize_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                       callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Stage 2: ``fused_embeddings.parquet`` -> ``rqvae.pt``, ``semantic_ids.parquet``, report."""
    from qbert.fusion.train import read_fusion_embeddings
    from qbert.quantize import train_rqvae
    from qbert.quantize.semantic_ids import semantic_id_table

    out = Path(out_dir)
    ids, emb = read_fusion_embeddings(out / "fused_embeddings.parquet")
    if len(ids) != data.all_items.num_items:
        raise DataError(f"{out / 'fused_embeddings.parquet'}: {len(ids)} items, data has {data.all_items.num_items}")
    res = train_rqvae(emb, cfg.quantize, callbacks=_cbs(callbacks), checkpoint_dir=out / "checkpoints" / "quantize")
    codes = np.asarray(res.codes, dtype=np.int64)
    if np.unique(codes, axis=0).shape[0] != len(codes) and cfg.quantize.reallocate:
        raise DataError("stage 2 returned colliding semantic IDs despite reallocation")
    table = semantic_id_table(codes, ids)
    if data.union is not None:
        table = table.append_column("domain", data.union.items.column("domain"))
    with atomic_path(out / "semantic_ids.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out / "rqvae.pt") as tmp:
        torch.save({"config": cfg.quantize.to_dict(), "state_dict": res.model.state_dict()}, tmp)
    report = dict(res.report)
    report["utilisation_per_level"] = codebook_utilisation(codes, cfg.quantize.sizes)
    atomic_write_json(out / "quantize_report.json", report)
    return report


def read_codes(out_dir: str | Path, num_items: int) -> np.ndarray:
    """[num_items, K] codes of items 0..num_items-1 of the run's semantic-ID table."""
    p = Path(out_dir) / "semantic_ids.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"semantic-ID table not found: {p} (run the quantize stage first)")
    t = pq.read_table(p)
    ids = t.column("item_id").to_numpy()
    K = sum(1 for c in t.column_names if c.startswith("code_"))
    codes = np.stack([t.column(f"code_{l}").to_numpy() for l in range(K)], 1).astype(np.int64)
    codes = codes[np.argsort(ids, kind="stable")]
    if len(codes) < num_items or not np.array_equal(np.sort(ids)[:num_items], np.arange(num_items)):
        raise DataError(f"{p}: expected codes for items 0..{num_items - 1}, got {len(ids)} rows")
    return codes[:num_items]


def pretraining_rows(cfg: PipelineConfig, data: PipelineData) -> np.ndarray:
    """Token rows for pretraining (union item space, +1 shift). Never a target's valid/test item."""
    L = cfg.data.max_len
    parts = []
    if not data.multi_domain or cfg.pretrain.include_target:
        parts.append(LeaveOneOutSplit(data.target, L).train_sequences(pad=0, shift=1))  # target first: offset 0
    for name, (start, _) in list(data.domain_ranges().items())[1:]:
        src = data.sources[data.names.index(name) - 1]
        rows = full_sequences(src, L)
        parts.append(np.where(rows > 0, rows + start, 0))
    return np.concatenate(parts) if parts else np.zeros((0, L), np.int64)


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
    res = pretrain(model, rows, cfg.pretrain, device, seed=cfg.seed, callbacks=_cbs(callbacks),
                   checkpoint_dir=out / "checkpoints" / "pretrain", shard=shard, progress=cfg.progress)
    with atomic_path(out / "pretrain.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "num_items": model.num_items, "multi_domain": data.multi_domain,
                    "strategy": cfg.pretrain.strategy}, tmp)
    assert res is not None
    return {"strategy": cfg.pretrain.strategy, "rows": int(len(rows)), "epochs": len(res.history),
            "final_loss": res.history[-1]["loss"] if res.history else None, "train_seconds": res.train_seconds,
            "samples_per_second": res.samples_per_second, "domains": list(data.domain_ranges())}


def run_finetune_stage(cfg: PipelineConfig, data: PipelineData, out_dir: str | Path,
                       callbacks: Iterable[Callback] = (), shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Stage 3b: fine-tune on the target (from ``pretrain.pt`` when present) -> ``model.pt``;
    returns valid (best epoch) and test metrics."""
    out = Path(out_dir)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed + 1)
    split = LeaveOneOutSplit(data.target, cfg.data.max_len)
    model = _model_for(cfg, read_codes(out, data.target.num_items))
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
    valid_ranks = split_ranks(model, split, "valid", cfg.eval.batch_size, device, protocols, cfg.finetune.precision)
    by_protocol = {"valid": {PROTOCOL_KEYS[p]: metrics_from_ranks(r) for p, r in valid_ranks.items()}}
    test: dict[str, float] = {}
    if cfg.eval.test:
        test_ranks = split_ranks(model, split, "test", cfg.eval.batch_size, device, protocols, cfg.finetune.precision)
        by_protocol["test"] = {PROTOCOL_KEYS[p]: metrics_from_ranks(r) for p, r in test_ranks.items()}
        test = by_protocol["test"][PROTOCOL_KEYS["excluded" if cfg.eval.exclude_history else "kept"]]
        write_ranks(out / "test_ranks.parquet", split, "test", test_ranks)
    eval_seconds = time.perf_counter() - t0
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "config": cfg.to_dict(), "num_items": model.num_items,
                    "code_score_weight": model.code_score_weight,
                    "data_fingerprint": data.target.fingerprint()}, tmp)
    return {"init": init, "valid": valid, "test": {k: test[k] for k in METRIC_KEYS if k in test},
            "by_protocol": by_protocol, **weights, "best_epoch": res.best_epoch,
            "epochs_run": len(res.history), "stopped_early": res.stopped_early, "train_seconds": res.train_seconds,
            "samples_per_second": res.samples_per_second,
            "eval_seconds_per_user": eval_seconds / (split.num_users * (2 if cfg.eval.test else 1)),
            "params": sum(p.numel() for p in model.parameters()),
            "item_indexed_parameters": model.item_indexed_parameters(),
            "history": [{k: v for k, v in h.items()} for h in res.history]}


PROTOCOL_KEYS = {"kept": "history_kept", "excluded": "history_excluded"}


def write_ranks(path: Path, split: LeaveOneOutSplit, which: str, ranks: dict[str, torch.Tensor]) -> None:
    """Per-user target ranks (0-based, both protocols) beside the run, so slices such as
    cold-start targets are computed from the one test evaluation instead of a second one."""
    import pyarrow as pa

    cols = {"user": pa.array(np.arange(split.num_users, dtype=np.int64)),
            "target": pa.array(np.asarray(split.targets(which), dtype=np.int64))}
    cols.update({f"rank_{PROTOCOL_KEYS[p]}": pa.array(r.numpy().astype(np.int64)) for p, r in ranks.items()})
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


# ---------------------------------------------------------------------------------------- reports
def codebook_utilisation(codes: np.ndarray, sizes: list[int]) -> list[dict[str, float]]:
    """Per level: share of codes used, perplexity of the code distribution."""
    out = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=size).astype(float)
        p = counts / counts.sum()
        nz = p[p > 0]
        out.append({"used": int((counts > 0).sum()), "size": int(size), "utilisation": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))})
    return out


def write_plots(out_dir: str | Path, fusion_report: dict[str, Any], codes: np.ndarray, sizes: list[int]) -> list[str]:
    """Activated-layer histogram (paper Fig. 7) and per-level codebook usage, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = Path(out_dir) / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    written = []
    counts = fusion_report.get("activated_layer_counts")
    if counts:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(np.arange(1, len(counts) + 1), counts)
        ax.set_xlabel("activated layers")
        ax.set_ylabel("items")
        ax.set_title(f"fusion depth (median {fusion_report.get('activated_layers_median')})")
        fig.tight_layout()
        with atomic_path(pdir / "activated_layers.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(str(pdir / "activated_layers.png"))
    fig, axes = plt.subplots(1, len(sizes), figsize=(3 * len(sizes), 2.6), squeeze=False)
    for level, (ax, size) in enumerate(zip(axes[0], sizes)):
        c = np.sort(np.bincount(codes[:, level], minlength=size))[::-1]
        ax.bar(np.arange(size), c, width=1.0)
        ax.set_title(f"level {level}: {int((c > 0).sum())}/{size} used")
        ax.set_xlabel("code (by frequency)")
    axes[0][0].set_ylabel("items")
    fig.tight_layout()
    with atomic_path(pdir / "codebook_utilisation.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    written.append(str(pdir / "codebook_utilisation.png"))
    return written


# ---------------------------------------------------------------------------------------- reuse
# What each stage's output depends on (config sections, dotted) and the files it leaves.
STAGE_INPUTS = {
    "fusion": ("data", "pretrain_sources", "fusion", "seed"),
    "quantize": ("quantize",),
    "pretrain": ("model", "pretrain"),
}
STAGE_ARTIFACTS = {
    "fusion": ("fused_embeddings.parquet", "fusion_model.pt", "fusion_report.json"),
    "quantize": ("rqvae.pt", "semantic_ids.parquet", "quantize_report.json"),
    "pretrain": ("pretrain.pt",),
    "finetune": ("model.pt",),
}
# where a stage ran, not what it computed; and settings only ranking reads (no stage output depends on them)
_RUNTIME_KEYS = {"device", "progress", "code_score_weight"}


def _stage_inputs(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    d = cfg.to_dict()
    deps = [k for s in STAGES[: STAGES.index(stage) + 1] for k in STAGE_INPUTS.get(s, ())]

    def clean(v: Any) -> Any:
        return {k: clean(x) for k, x in v.items() if k not in _RUNTIME_KEYS} if isinstance(v, dict) else v

    return {k: clean(d[k]) for k in deps}


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
        mine, theirs = _stage_inputs(cfg, stage), _stage_inputs(src_cfg, stage)
        if mine != theirs:
            a, b = flatten_dict(mine), flatten_dict(theirs)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"reuse.from_run {src}: its {stage} stage was made with other settings "
                              f"({', '.join(f'{k}: {b.get(k)!r} there, {a.get(k)!r} here' for k in diff[:3])})")
        if stage == "pretrain" and cfg.pretrain.strategy == "none":
            continue
        missing = [n for n in STAGE_ARTIFACTS[stage] if not (src / n).is_file()]
        if missing:
            raise ConfigError(f"reuse.from_run {src}: missing {', '.join(missing)} of the {stage} stage")


def reuse_stage(cfg: PipelineConfig, stage: str, out_dir: str | Path) -> dict[str, Any]:
    """Copy ``stage``'s artifacts from ``cfg.reuse.from_run`` into ``out_dir``; return its report
    (the source's, plus ``reused_from``). :func:`check_reuse` must have passed."""
    src = Path(cfg.reuse.from_run or "")
    if stage == "pretrain" and cfg.pretrain.strategy == "none":
        return {"strategy": "none", "skipped": True}
    out = Path(out_dir)
    for name in STAGE_ARTIFACTS[stage]:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src / name, tmp)
    report: dict[str, Any] = {}
    metrics = src / "metrics.json"
    if metrics.is_file():
        report = json.loads(metrics.read_text()).get("stages", {}).get(stage, {})
    elif (src / f"{stage}_report.json").is_file():
        report = json.loads((src / f"{stage}_report.json").read_text())
    return {**report, "reused_from": str(src.resolve())}


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
    return model.to(device).eval(), cfg, {k: v for k, v in payload.items() if k != "model"}


def evaluate_run(run_dir: str | Path, which: str = "test", exclude_history: bool | None = None,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
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
    split = LeaveOneOutSplit(data.target, cfg.data.max_len)
    excl = cfg.eval.exclude_history if exclude_history is None else exclude_history
    res = evaluate_split(model, split, which, cfg.eval.batch_size, device, excl, cfg.finetune.precision)
    return {**{k: res[k] for k in METRIC_KEYS}, "users": res.get("users"), "exclude_history": excl,
            "code_score_weight": model.code_score_weight}


# ---------------------------------------------------------------------------------------- driver
def config_differences(path: Path, cfg: PipelineConfig) -> list[str] | None:
    """Dotted keys where the run config at ``path`` differs from ``cfg`` (settings of where a run
    executes, such as device and progress bars, aside); None when there is no config there."""
    if not path.is_file():
        return None
    try:
        theirs = flatten_dict(PipelineConfig.from_yaml(path).to_dict())
    except ConfigError:
        return [f"{path.name} (unreadable with this version)"]
    mine = flatten_dict(cfg.to_dict())
    skip = lambda k: k.split(".")[-1] in _RUNTIME_KEYS  # noqa: E731
    return sorted(k for k in set(mine) | set(theirs) if not skip(k) and mine.get(k) != theirs.get(k))


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, callbacks_factory: CallbacksFactory | None = None,
                 resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage in order; return the metrics dict also written to ``metrics.json``.

    ``callbacks_factory(stage)`` gives the training callbacks of each stage (MLflow, Ray).
    All inputs are checked before the first stage trains. The run holds ``out_dir``'s lock
    throughout (a second run on it fails at once). With ``resume`` an interrupted run of the
    *same* config continues from its stage checkpoints (``resume=False`` discards them); a
    directory holding a run of another config is refused unless ``overwrite`` (which empties it).
    """
    from qbert.utils.rundir import claim_run_dir, run_lock

    out = Path(out_dir)
    started = time.time()
    commit = git_commit()  # the code this run executes (the tree may change while it trains)
    seed_everything(cfg.seed)
    data = load_data(cfg)
    check_inputs(cfg, data)
    check_reuse(cfg)
    with run_lock(out):
        claim_run_dir(out, config_differences(out / "config.yaml", cfg), overwrite)
        ckpts = out / "checkpoints"
        if ckpts.exists() and not resume:
            log.info("discarding checkpoints of %s (resume off)", out)
            shutil.rmtree(ckpts)
        return _run_stages(cfg, out, data, callbacks_factory, started, commit)


def _run_stages(cfg: PipelineConfig, out: Path, data: PipelineData, callbacks_factory: CallbacksFactory | None,
                started: float, commit: str) -> dict[str, Any]:
    cfg.to_yaml(out / "config.yaml")
    cbs = callbacks_factory or (lambda stage: ())
    timings: dict[str, float] = {}
    reports: dict[str, Any] = {}
    stage_fns = {"fusion": run_fusion_stage, "quantize": run_quantize_stage,
                 "pretrain": run_pretrain_stage, "finetune": run_finetune_stage}
    for stage in STAGES:
        t0 = time.perf_counter()
        if stage in cfg.reuse.stages:
            log.info("stage %s: reused from %s", stage, cfg.reuse.from_run)
            reports[stage] = reuse_stage(cfg, stage, out)
        else:
            log.info("stage %s", stage)
            reports[stage] = stage_fns[stage](cfg, data, out, cbs(stage))
        timings[stage] = time.perf_counter() - t0
    return finish_run(cfg, out, data, reports, timings, started, commit)


def finish_run(cfg: PipelineConfig, out: Path, data: PipelineData, reports: dict[str, Any],
               timings: dict[str, float], started: float, commit: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``metrics.json``, ``summary.json`` and plots from its stage reports; the one
    writer of both files for local and Ray runs (``extra`` adds executor fields to both)."""
    ft = reports["finetune"]
    history = ft.pop("history", [])
    metrics = {
        "model": "qbert4rec",
        "test": ft["test"],
        "valid": ft["valid"],
        "by_protocol": ft.get("by_protocol", {}),
        "stage3_item_table": bool(ft.get("item_indexed_parameters")),
        "best_epoch": ft["best_epoch"],
        "epochs_run": ft["epochs_run"],
        "params": ft["params"],
        "stages": reports,
        "timing": {"stage_seconds": timings, "total_seconds": time.time() - started,
                   "eval_seconds_per_user": ft["eval_seconds_per_user"],
                   "finetune_samples_per_s": ft["samples_per_second"]},
        "history": history,
        **(extra or {}),
    }
    plots: list[str] = []
    if cfg.plots:
        plots = write_plots(out, reports["fusion"], read_codes(out, data.all_items.num_items), cfg.quantize.sizes)
    summary = {
        "git_commit": commit,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine_info(),
        "device": str(pick_device(cfg.device)),
        "precision": {s: resolve_precision(getattr(cfg, s).precision, pick_device(cfg.device))
                      for s in ("pretrain", "finetune")},  # what "auto" resolved to on this machine
        "data": {"source": cfg.data.source, "fingerprint": data.target.fingerprint(), "stats": data.target.stats(),
                 "pretrain_sources": [{"source": s, "fingerprint": d.fingerprint(), "stats": d.stats()}
                                      for s, d in zip(cfg.pretrain_sources, data.sources)]},
        "timings": {**timings, "total": time.time() - started},
        "test": metrics["test"],
        "valid": metrics["valid"],
        "plots": plots,
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "summary.json", summary)
    return metrics
