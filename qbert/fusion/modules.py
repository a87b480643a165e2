"""Stage 1 modules: ID query, modality projection, similarity alignment (Eq. 3) and the
dynamic cross-modal transformer with per-item halting gates (Eq. 4).

Shapes: ``B`` items in a batch, ``S`` vectors per item for one modality (1 for a single
vector per item), ``d_m`` raw feature width, ``D`` the shared width (``cfg.dim``), ``L`` the
maximum depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qbert.fusion.config import FusionConfig


class ModalityProjector(nn.Module):
    """L2-normalise each raw feature vector, then project it into the shared space.

    Normalising first makes encoders with very different output scales (a multi-hot code
    vector, a CLIP embedding) comparable before the learned projection.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, d_m] -> [B, S, D]
        return self.proj(F.normalize(x, dim=-1, eps=1e-12))


def similarity_align(query: torch.Tensor, x: torch.Tensor, tau: torch.Tensor | float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3): x̂ = sum_j softmax_j(cos(q, x_j) / tau) x_j.

    ``query`` [B, D], ``x`` [B, S, D], ``mask`` [B, S] (True = real vector; all-zero raw
    vectors are padding of variable-size sets). Returns x̂ [B, D] and the weights [B, S].
    """
    sim = torch.einsum("bd,bsd->bs", F.normalize(query, dim=-1), F.normalize(x, dim=-1)) / tau
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    w = torch.softmax(sim, dim=-1)
    return torch.einsum("bs,bsd->bd", w, x), w


class CrossModalLayer(nn.Module):
    """One block of Eq. (4): the query cross-attends to [x̂_t; x̂_v], then an FFN (post-LN)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # [B, D], [B, M, D]
        a, _ = self.attn(h.unsqueeze(1), kv, kv, need_weights=False)
        h = self.ln1(h + self.drop(a.squeeze(1)))
        return self.ln2(h + self.drop(self.ffn(h)))


class HaltingGate(nn.Module):
    """g_l = sigmoid(MLP(h_l)): the probability that an item continues to the next layer.

    The paper's gate is a vector; a scalar per item is what a per-item exit decision needs
    (a vector gate would be reduced to one number anyway).
    """

    def __init__(self, dim: int, hidden: int, bias_init: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.mlp[-1].bias, bias_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B]
        return torch.sigmoid(self.mlp(h)).squeeze(-1)


def halting_distribution(cont: torch.Tensor) -> torch.Tensor:
    """ACT-style exit probabilities from continue probabilities.

    ``cont`` [L-1, B] (gate after layers 1..L-1) -> p [L, B] with
    p_l = prod_{j<l} c_j * (1 - c_l) and p_L = prod_{j<L} c_j, so sum_l p_l = 1.
    """
    ones = torch.ones_like(cont[:1])
    reach = torch.cumprod(torch.cat([ones, cont], dim=0), dim=0)  # P(reach layer l), [L, B]
    stop = torch.cat([1.0 - cont, ones], dim=0)  # P(stop at l | reached l)
    return reach * stop


@dataclass
class TransformerOutput:
    fused: torch.Tensor  # [B, D]
    depth: torch.Tensor  # [B] float: expected depth (soft) or exit layer (hard), 1-based
    exit_probs: torch.Tensor | None = None  # [L, B] (soft dynamic only)
    layer_outputs: torch.Tensor | None = None  # [L, B, D] h_l of every layer (soft dynamic only)


class DynamicCrossModalTransformer(nn.Module):
    """Eq. (4) stacked up to ``L`` times with a halting gate after every layer but the last.

    ``soft`` (training): every layer runs and the output is sum_l p_l h_l with p from the
    gates, so the gates receive gradients. ``hard`` (inference): an item leaves after the
    first layer whose gate is <= threshold; only still-active items are computed further.
    ``fixed`` variant: always all layers, no gates.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(CrossModalLayer(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.dynamic = cfg.variant == "dynamic"
        self.gates = nn.ModuleList(HaltingGate(cfg.dim, cfg.gate_hidden, cfg.gate_bias_init)
                                   for _ in range(cfg.layers - 1)) if self.dynamic else nn.ModuleList()

    def forward(self, h: torch.Tensor, kv: torch.Tensor, hard: bool = False) -> TransformerOutput:
        L = len(self.layers)
        if not self.dynamic:
            for layer in self.layers:
                h = layer(h, kv)
            return TransformerOutput(h, torch.full((h.shape[0],), float(L), device=h.device))
        if hard:
            return self._hard(h, kv)
        hs, cont = [], []
        for l, layer in enumerate(self.layers):
            h = layer(h, kv)
            hs.append(h)
            if l < L - 1:
                cont.append(self.gates[l](h))
        p = halting_distribution(torch.stack(cont)) if cont else torch.ones(1, h.shape[0], device=h.device)
        fused = torch.einsum("lb,lbd->bd", p, torch.stack(hs))
        depth = (p * torch.arange(1, L + 1, device=h.device, dtype=p.dtype).unsqueeze(1)).sum(0)
        return TransformerOutput(fused, depth, p, torch.stack(hs))

    def _hard(self, h: torch.Tensor, kv: torch.Tensor) -> TransformerOutput:
        B, L = h.shape[0], len(self.layers)
        out = torch.empty_like(h)
        depth = torch.full((B,), float(L), device=h.device)
        active = torch.arange(B, device=h.device)
        for l, layer in enumerate(self.layers):
            h = layer(h, kv)
            if l == L - 1:
                out[active] = h
                break
            stop = self.gates[l](h) <= self.cfg.gate_threshold
            out[active[stop]] = h[stop]
            depth[active[stop]] = float(l + 1)
            keep = ~stop
            active, h, kv = active[keep], h[keep], kv[keep]
            if active.numel() == 0:
                break
        return TransformerOutput(out, depth)


@dataclass
class FusionOutput:
    fused: torch.Tensor  # h_i [B, D]
    query: torch.Tensor  # q_i (or the shared query without the id modality) [B, D]
    aligned: dict[str, torch.Tensor] = field(default_factory=dict)  # x̂_m [B, D] per feature modality
    depth: torch.Tensor | None = None  # [B]
    exit_probs: torch.Tensor | None = None  # [L, B]
    layer_outputs: torch.Tensor | None = None  # [L, B, D]


class FusionModel(nn.Module):
    """ID query + projections + alignment + dynamic transformer for ``num_items`` items.

    Without the ``id`` modality every item shares one learned query (so no per-item
    parameters carry information); with only ``id`` there is nothing to attend to and the
    fused embedding is the ID vector itself.
    """

    def __init__(self, cfg: FusionConfig, num_items: int, feature_dims: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.modalities = list(cfg.feature_modalities)
        missing = [m for m in self.modalities if m not in feature_dims]
        if missing:
            raise ValueError(f"no feature width for enabled modality {missing}")
        if cfg.use_id:
            self.id_embedding = nn.Embedding(num_items, cfg.dim)
            nn.init.normal_(self.id_embedding.weight, std=cfg.id_init_std)
        else:
            self.shared_query = nn.Parameter(torch.randn(cfg.dim) * cfg.id_init_std)
        self.projectors = nn.ModuleDict({m: ModalityProjector(feature_dims[m], cfg.dim) for m in self.modalities})
        log_tau = torch.tensor(math.log(cfg.tau))
        if cfg.learnable_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        self.transformer = DynamicCrossModalTransformer(cfg) if self.modalities else None

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def query(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cfg.use_id:
            return self.id_embedding(idx)
        return self.shared_query.unsqueeze(0).expand(idx.shape[0], -1)

    def forward(self, idx: torch.Tensor, feats: dict[str, torch.Tensor], hard: bool = False) -> FusionOutput:
        """``idx`` [B] item ids; ``feats[m]`` [B, S, d_m] raw features of those items."""
        q = self.query(idx)
        if self.transformer is None:
            return FusionOutput(q, q, {}, torch.ones(q.shape[0], device=q.device))
        aligned = {}
        for m in self.modalities:
            x = feats[m]
            mask = x.abs().sum(-1) > 0 if x.shape[1] > 1 else None
            aligned[m], _ = similarity_align(q, self.projectors[m](x), self.tau, mask)
        kv = torch.stack([aligned[m] for m in self.modalities], dim=1)  # [B, M, D]
        out = self.transformer(q, kv, hard=hard)
        return FusionOutput(out.fused, q, aligned, out.depth, out.exit_probs, out.layer_outputs)
