"""Stage 1 objective, Eq. (5): symmetric InfoNCE between the views plus the ID anchor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qbert.fusion.config import FusionConfig
from qbert.fusion.modules import FusionOutput


def info_nce_per_item(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE split per item [B]: item i's row (a_i must pick b_i among the batch)
    and column (b_i must pick a_i) cross-entropies, averaged. ``a`` may carry leading
    dimensions ([..., B, D]); both views are L2-normalised (logits = cosine / temperature)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2) / temperature
    diag = logits.diagonal(dim1=-2, dim2=-1)
    return 0.5 * ((logits.logsumexp(-1) - diag) + (logits.logsumexp(-2) - diag))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of aligned pairs (row i of ``a`` <-> row i of ``b``)."""
    return info_nce_per_item(a, b, temperature).mean()


def id_anchor(fused: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """||h_i - sg(q_i)||^2 per item, averaged over dimensions (so lambda does not scale with dim)."""
    return (fused - query.detach()).pow(2).mean(-1)


def fusion_loss(out: FusionOutput, cfg: FusionConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (5) over the enabled modalities, plus the ponder cost of the dynamic gates.

    Pairs: fused/text, fused/image, text/image (each only when both sides exist). With the
    ``id`` modality: + lambda * ||h - sg(q)||^2. Dynamic variant with ``halting ==
    "expected_loss"``: the fused-dependent terms are computed for every layer's h_l and
    weighted per item by its exit probability p_l (what hard early exit will use at
    inference); with ``"mixture"`` they use h = sum_l p_l h_l. Both add
    ponder_weight * E[depth].
    """
    per_layer = out.layer_outputs is not None and cfg.halting == "expected_loss"
    h = out.layer_outputs if per_layer else out.fused  # [L, B, D] or [B, D]

    def weighted(v: torch.Tensor) -> torch.Tensor:  # [L, B] -> mean over items of E_p[v]
        return (out.exit_probs * v).sum(0).mean() if per_layer else v.mean()

    terms: dict[str, torch.Tensor] = {}
    for m, x in out.aligned.items():
        terms[f"nce_fused_{m}"] = weighted(info_nce_per_item(h, x, cfg.contrastive_tau))
    if "text" in out.aligned and "image" in out.aligned:
        terms["nce_text_image"] = info_nce(out.aligned["text"], out.aligned["image"], cfg.contrastive_tau)
    total = sum(terms.values(), torch.zeros((), device=out.fused.device))
    if cfg.use_id and out.aligned:
        terms["id_anchor"] = weighted(id_anchor(h, out.query))
        total = total + cfg.lambda_id * terms["id_anchor"]
    if out.exit_probs is not None and out.depth is not None:
        terms["expected_depth"] = out.depth.mean()
        total = total + cfg.ponder_weight * terms["expected_depth"]
    return total, {k: float(v.detach()) for k, v in terms.items()}
