"""Stage 2 runner: train the RQ-VAE with the shared loop, assign codes, reallocate
collisions (Sec. 3.4) and report utilisation, perplexity, reconstruction and collisions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from qbert.data.errors import DataError
from qbert.quantize.config import QuantizeConfig, check_capacity
from qbert.quantize.reallocate import ReallocationInfo, collision_rate, reallocate_collisions
from qbert.quantize.rqvae import RQVAE
from qbert.quantize.semantic_ids import write_semantic_ids
from qbert.train import Batches, Callback, FitResult, LoopConfig, fit
from qbert.train.distributed import rank_world, sum_over_ranks
from qbert.train.loop import unwrap
from qbert.train.optim import build_optimizer
from qbert.utils.io import atomic_path, atomic_write_json
from qbert.utils.runtime import pick_device, seed_everything


@dataclass
class QuantizeResult:
    codes: np.ndarray  # [N, K] int64, unique after reallocation
    report: dict[str, Any]
    model: RQVAE
    codes_before: np.ndarray | None = None  # raw RQ-VAE codes before reallocation
    fit: FitResult | None = None
    reallocation: ReallocationInfo | None = None

    def save(self, directory: str | Path, item_ids: np.ndarray | None = None,
             columns: dict[str, Any] | None = None) -> Path:
        """``semantic_ids.parquet`` (plus ``columns``, e.g. each item's domain), ``quantize_report.json``,
        ``rqvae.pt`` (incl. codebooks): the one writer of stage 2's artifacts.

        Uniqueness of the written IDs is enforced unless reallocation was switched off."""
        d = Path(directory)
        write_semantic_ids(d / "semantic_ids.parquet", self.codes, item_ids, self.model.cfg.sizes,
                           require_unique=self.model.cfg.reallocate, columns=columns)
        atomic_write_json(d / "quantize_report.json", self.report)
        with atomic_path(d / "rqvae.pt") as tmp:
            torch.save({"config": self.model.cfg.to_dict(), "in_dim": self.model.in_dim,
                        "state_dict": self.model.state_dict()}, tmp)
        return d


def validate_embeddings(embeddings: Any) -> np.ndarray:
    """A finite float32 [N, D] matrix, or a DataError naming what is wrong."""
    x = np.asarray(embeddings)
    if x.dtype.kind not in "fiub":
        raise DataError(f"embeddings must be numeric, got dtype {x.dtype}")
    if x.ndim != 2 or min(x.shape) == 0:
        raise DataError(f"embeddings must be a non-empty [items, dim] matrix, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"embeddings contain NaN/inf for {bad.size} items (first: item {bad[0]})")
    return x


class _UsageOverRanks(Callback):
    """At each epoch's end, every code's usage count becomes its sum over the ranks (after the
    gradient callback's end-of-epoch sync, before the checkpoint), so a code is dead only when no
    rank used it and every rank re-seeds the same codes. Only with re-seeding (which resets the
    counts each epoch; without it the counts are unused and stay per rank)."""

    def on_train_epoch_end(self, model: RQVAE, state: Any, metrics: dict[str, float]) -> None:
        for vq in unwrap(model).quantizer.levels:
            sum_over_ranks(vq.usage)


def default_loop_config(cfg: QuantizeConfig) -> LoopConfig:
    return LoopConfig.fixed_epochs(cfg.epochs)


def train_rqvae(embeddings: np.ndarray, cfg: QuantizeConfig, loop_cfg: LoopConfig | None = None,
                callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
                shard: tuple[int, int] | None = None) -> QuantizeResult:
    """Train stage 2 on fused embeddings [N, D] and return unique codes [N, K].

    Fails before training when the codebooks cannot give every item a distinct ID. Codebooks
    are k-means-initialised on the encoder outputs of all items; codes unused during an epoch
    are re-seeded from random residuals at the start of the next one.

    ``shard`` (rank, world): exact data parallelism (:mod:`qbert.train.distributed`).
    ``cfg.batch_size`` is this rank's part of a global batch of ``batch_size * world`` items drawn
    identically on every rank; rank r trains on items ``r::world`` with its share of the global
    mean losses. k-means initialisation, dead-code re-seeding and code assignment run on all items
    with the same seed on every rank (identical results), the codes' usage counts summed over ranks.
    """
    x_np = validate_embeddings(embeddings)
    n = x_np.shape[0]
    if cfg.reallocate:
        check_capacity(cfg.sizes, n)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RQVAE(x_np.shape[1], cfg).to(device)
    x = torch.from_numpy(x_np).to(device)
    if cfg.kmeans_init:
        model.eval()
        with torch.no_grad():
            model.quantizer.init_codebooks(model.encoder(x), cfg.kmeans_iters, cfg.kmeans_seeding, gen)
        model.train()
    loop_cfg = loop_cfg or default_loop_config(cfg)
    fit_result = None
    if loop_cfg.epochs > 0:
        opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
        rank, world = rank_world(shard)
        bs = min(cfg.batch_size * world, n)  # the global batch
        reseeded: list[list[int]] = []

        def epoch_batches(epoch: int):
            if epoch > 0 and cfg.reseed_dead_codes:
                model.eval()  # no dropout: the residuals (and so the re-seeded codes) are the same on every rank
                with torch.no_grad():
                    reseeded.append(model.quantizer.reseed_dead_codes(model.encoder(x), gen))
                model.train()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # no rank: the global batch
            perm = torch.randperm(n, generator=g).to(device)  # one copy per epoch, none per step
            for i in range(0, n, bs):
                idx = perm[i:i + bs]  # a rank may get no row of a short last batch: its sums are 0
                yield idx[rank::world], (len(idx) / world if world > 1 else None)

        def batches(epoch: int) -> Batches:
            return Batches(epoch_batches(epoch), -(-n // bs))

        def step(m: RQVAE, batch: tuple[torch.Tensor, float | None]):
            idx, norm = batch
            out = m(x[idx], norm)
            return out.loss, {"recon": out.recon_loss.detach(), "codebook": out.codebook_loss.detach(),
                              "commit": out.commit_loss.detach()}

        usage = [_UsageOverRanks()] if cfg.reseed_dead_codes else []
        fit_result = fit(model, opt, batches, step, loop_cfg, callbacks=[*callbacks, *usage],
                         checkpoint_dir=checkpoint_dir, desc="rqvae", generators=[gen])
    model.eval()
    raw = assign_codes(model, x, cfg.infer_batch_size)
    report = quantize_report(model, x, raw, cfg)
    codes, info = raw, None
    if cfg.reallocate:
        codes, info = reallocate_collisions(raw, lambda idx: code_distances(model, x, idx, cfg.infer_batch_size),
                                            cfg.sizes)
        report["reallocation"] = info.to_dict()
        report["collision_rate_after"] = info.collision_rate_after
        report["utilisation_after"] = utilisation(codes, cfg.sizes)
    report["unique"] = bool(np.unique(codes, axis=0).shape[0] == n)
    report["utilisation_per_level"] = codebook_usage(codes, cfg.sizes)  # of the final IDs
    if fit_result is not None:
        report["final_losses"] = {k: float(v) for k, v in fit_result.history[-1].items()
                                  if k not in ("epoch", "epoch_time_s")}
        report["epochs_run"] = len(fit_result.history)
        report["train_seconds"] = fit_result.train_seconds
        report["history"] = [{k: float(v) for k, v in h.items()} for h in fit_result.history]
    return QuantizeResult(codes, report, model, raw, fit_result, info)


@torch.no_grad()
def assign_codes(model: RQVAE, x: torch.Tensor, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    return torch.cat([model.codes(x[i:i + batch_size])[0].cpu() for i in range(0, x.shape[0], batch_size)]).numpy()


@torch.no_grad()
def code_distances(model: RQVAE, x: torch.Tensor, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """The Sec. 3.4 distance tensor [len(idx), K, C_max] for the given items only."""
    model.eval()
    rows = torch.as_tensor(idx, device=x.device)
    parts = [model.codes(x[rows[i:i + batch_size]], with_distances=True)[1].cpu()
             for i in range(0, rows.numel(), batch_size)]
    return torch.cat(parts).numpy()


def codebook_usage(codes: np.ndarray, sizes: list[int]) -> list[dict[str, float]]:
    """Per level: codes used, codebook size, the share used, and the perplexity exp(entropy) of the
    code distribution (= size when perfectly uniform)."""
    out = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=size).astype(float)
        p = counts / counts.sum()
        nz = p[p > 0]
        out.append({"used": int((counts > 0).sum()), "size": int(size), "utilisation": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))})
    return out


def utilisation(codes: np.ndarray, sizes: list[int]) -> list[float]:
    """Fraction of each level's codes used by at least one item."""
    return [u["utilisation"] for u in codebook_usage(codes, sizes)]


def perplexity(codes: np.ndarray, sizes: list[int]) -> list[float]:
    """exp(entropy) of each level's code distribution (= size when perfectly uniform)."""
    return [u["perplexity"] for u in codebook_usage(codes, sizes)]


@torch.no_grad()
def quantize_report(model: RQVAE, x: torch.Tensor, codes: np.ndarray, cfg: QuantizeConfig) -> dict[str, Any]:
    """Reconstruction MSE (through the quantizer), per-level utilisation/perplexity, collisions."""
    model.eval()
    sq = 0.0
    for i in range(0, x.shape[0], cfg.infer_batch_size):
        xb = x[i:i + cfg.infer_batch_size]
        sq += float((model(xb).recon - xb).pow(2).sum())
    return {
        "num_items": int(x.shape[0]),
        "codebook_sizes": cfg.sizes,
        "recon_mse": sq / x.numel(),
        "utilisation": utilisation(codes, cfg.sizes),
        "perplexity": perplexity(codes, cfg.sizes),
        "collision_rate_before": collision_rate(codes),
    }
