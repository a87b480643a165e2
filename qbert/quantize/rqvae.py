"""RQ-VAE (paper Sec. 3.4, Eqs. 6-9): MLP encoder/decoder with ReLU, K residual codebooks,
straight-through gradients, k-means codebook initialisation and dead-code re-seeding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbert.quantize.config import QuantizeConfig
from qbert.quantize.kmeans import kmeans, sq_distances


def mlp(widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i and dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VectorQuantizer(nn.Module):
    """One codebook level. ``initted`` and ``usage`` are buffers so they survive state_dict:
    a reloaded model neither re-runs k-means nor forgets which codes were alive."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.codebook = nn.Parameter(torch.randn(size, dim) / dim**0.5)
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("usage", torch.zeros(size))

    def distances(self, r: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, C]
        return sq_distances(r, self.codebook)

    @torch.no_grad()
    def init_from(self, r: torch.Tensor, iters: int, seeding: str, generator: torch.Generator | None) -> None:
        centroids, _ = kmeans(r.detach(), self.size, iters, seeding, generator)
        self.codebook.data.copy_(centroids)
        self.initted.fill_(True)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D] sum of the chosen codes, straight-through to the encoder
    codes: torch.Tensor  # [B, K] int64
    codebook_loss: torch.Tensor  # sum_l ||sg(r_l) - e_l||^2
    commit_loss: torch.Tensor  # sum_l ||r_l - sg(e_l)||^2
    residuals: list[torch.Tensor]  # r_l per level [B, D]


class ResidualQuantizer(nn.Module):
    """Eq. (6): r_0 = z, c_l = argmin_k ||r_l - e_k^l||, r_{l+1} = r_l - e_{c_l}^l."""

    def __init__(self, sizes: list[int], dim: int):
        super().__init__()
        self.levels = nn.ModuleList(VectorQuantizer(s, dim) for s in sizes)

    @property
    def sizes(self) -> list[int]:
        return [vq.size for vq in self.levels]

    def forward(self, z: torch.Tensor, norm: float | None = None) -> QuantizerOutput:
        """``norm``: the losses are sums over rows / ``norm`` rows instead of means (a rank's share of
        a global batch, :mod:`qbert.train.distributed`)."""
        residual = z
        codes, residuals = [], []
        total = torch.zeros_like(z)
        cb_loss = z.new_zeros(())
        commit = z.new_zeros(())
        for vq in self.levels:
            idx = vq.distances(residual.detach()).argmin(1)
            e = vq.codebook[idx]
            cb_loss = cb_loss + _mse(e, residual.detach(), norm)  # Eq. (8) codebook term
            commit = commit + _mse(residual, e.detach(), norm)  # Eq. (8) commitment term (x beta)
            if self.training:
                vq.usage.index_add_(0, idx, torch.ones_like(idx, dtype=vq.usage.dtype))
            residuals.append(residual)
            codes.append(idx)
            total = total + e
            residual = residual - e.detach()  # keeps r_{l+1} a function of the encoder
        quantized = z + (total - z).detach()  # straight-through estimator
        return QuantizerOutput(quantized, torch.stack(codes, 1), cb_loss, commit, residuals)

    @torch.no_grad()
    def assign(self, z: torch.Tensor, with_distances: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes [B, K] and, optionally, the distance tensor [B, K, C_max] between each level's
        residual and every code of that level (inf-padded when sizes differ)."""
        residual = z
        codes, dists = [], []
        cmax = max(self.sizes)
        for vq in self.levels:
            d = vq.distances(residual)
            idx = d.argmin(1)
            codes.append(idx)
            if with_distances:
                dists.append(F.pad(d, (0, cmax - d.shape[1]), value=float("inf")))
            residual = residual - vq.codebook[idx]
        return torch.stack(codes, 1), (torch.stack(dists, 1) if with_distances else None)

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, iters: int = 25, seeding: str = "kmeans++",
                       generator: torch.Generator | None = None) -> None:
        """k-means on the level-l residuals of ``z`` (top-down), for every level."""
        residual = z.detach()
        for vq in self.levels:
            vq.init_from(residual, iters, seeding, generator)
            residual = residual - vq.codebook[vq.distances(residual).argmin(1)]

    @torch.no_grad()
    def reseed_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[int]:
        """Move codes unused since the last call onto random current residuals; reset usage.

        Levels are processed top-down so lower levels see the residuals of the repaired upper
        level. Returns the number of re-seeded codes per level.
        """
        residual = z.detach()
        reseeded = []
        for vq in self.levels:
            dead = (vq.usage == 0).nonzero().squeeze(1)
            if dead.numel() and residual.shape[0]:
                pick = torch.randint(residual.shape[0], (dead.numel(),), generator=generator).to(residual.device)
                noise = torch.randn(dead.numel(), residual.shape[1], generator=generator).to(residual.device)
                vq.codebook.data[dead] = residual[pick] + 1e-3 * residual.std() * noise
            reseeded.append(int(dead.numel()))
            vq.usage.zero_()
            residual = residual - vq.codebook[vq.distances(residual).argmin(1)]
        return reseeded


@dataclass
class RQVAEOutput:
    recon: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


def _mse(a: torch.Tensor, b: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Mean squared error over [B, D]; with ``norm`` the sum over this rank's rows / (norm * D)."""
    if norm is None:
        return F.mse_loss(a, b)
    return F.mse_loss(a, b, reduction="sum") / (norm * a.shape[-1])


def _forget_initted(module: RQVAE, keys: Any) -> None:
    """After ``load_state_dict``: read the loaded buffers' flag again."""
    module._initted = False


class RQVAE(nn.Module):
    """Encoder -> residual quantizer -> decoder; loss Eq. (9) = recon + sum_l (codebook + beta commit)."""

    def __init__(self, in_dim: int, cfg: QuantizeConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.encoder = mlp([in_dim, *cfg.hidden, cfg.code_dim], cfg.dropout)
        self.decoder = mlp([cfg.code_dim, *reversed(cfg.hidden), in_dim], cfg.dropout)
        self.quantizer = ResidualQuantizer(cfg.sizes, cfg.code_dim)

        self._initted = False  # a host-side copy of the buffers' flag once it is True (no device read per step)
        self.register_load_state_dict_post_hook(_forget_initted)

    @property
    def initted(self) -> bool:
        if not self._initted:
            self._initted = all(bool(vq.initted) for vq in self.quantizer.levels)
        return self._initted

    def forward(self, x: torch.Tensor, norm: float | None = None) -> RQVAEOutput:
        """``norm``: losses summed over rows and divided by ``norm`` rows instead of averaged."""
        z = self.encoder(x)
        if self.training and self.cfg.kmeans_init and not self.initted:
            self.quantizer.init_codebooks(z, self.cfg.kmeans_iters, self.cfg.kmeans_seeding)  # first batch
            self._initted = True
        q = self.quantizer(z, norm)
        recon = self.decoder(q.quantized)
        recon_loss = _mse(recon, x, norm)  # Eq. (7)
        loss = recon_loss + q.codebook_loss + self.cfg.beta * q.commit_loss
        return RQVAEOutput(recon, q.codes, loss, recon_loss, q.codebook_loss, q.commit_loss)

    @torch.no_grad()
    def codes(self, x: torch.Tensor, with_distances: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.quantizer.assign(self.encoder(x), with_distances)
