"""Stage 1 objective, Eq. (5): symmetric InfoNCE between the views plus the ID anchor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qbert.fusion.config import FusionConfig
from qbert.fusion.modules import FusionOutput
from qbert.train.distributed import gather_rows


@dataclass(frozen=True)
class BatchShard:
    """This rank's part of a global batch (exact data parallelism, :mod:`qbert.train.distributed`):
    the loss is the sum over this rank's items / ``norm`` (= global items / world), and InfoNCE
    takes its negatives from every rank's items, gathered in blocks of ``rows``."""

    norm: float
    rows: int


def info_nce_per_item(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE split per item [B]: item i's row (a_i must pick b_i among the batch)
    and column (b_i must pick a_i) cross-entropies, averaged. ``a`` may carry leading
    dimensions ([..., B, D]); both views are L2-normalised (logits = cosine / temperature)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2) / temperature
    diag = logits.diagonal(dim1=-2, dim2=-1)
    return 0.5 * ((logits.logsumexp(-1) - diag) + (logits.logsumexp(-2) - diag))


def sharded_info_nce_per_item(a: torch.Tensor, b: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
    """:func:`info_nce_per_item` of this rank's items [..., m, D] against the whole global batch:
    both views are gathered from every rank (differentiably), so each item's row and column
    cross-entropies see every negative one worker would see."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a_all, real, _ = gather_rows(a.movedim(-2, 0), rows)  # [W*rows, ..., D]
    b_all, _, _ = gather_rows(b.movedim(-2, 0), rows)
    a_all, b_all = a_all.movedim(0, -2), b_all.movedim(0, -2)
    off = -1e4 * (~real).to(a.dtype)  # padding rows of short blocks are no negatives
    by_row = (a @ b_all.transpose(-1, -2) / temperature + off).logsumexp(-1)  # a_i against every b_j
    by_col = (b @ a_all.transpose(-1, -2) / temperature + off).logsumexp(-1)  # b_i against every a_j
    diag = (a * b).sum(-1) / temperature
    return 0.5 * ((by_row - diag) + (by_col - diag))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of aligned pairs (row i of ``a`` <-> row i of ``b``)."""
    return info_nce_per_item(a, b, temperature).mean()


def id_anchor(fused: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """||h_i - sg(q_i)||^2 per item, averaged over dimensions (so lambda does not scale with dim)."""
    return (fused - query.detach()).pow(2).mean(-1)


def fusion_loss(out: FusionOutput, cfg: FusionConfig,
                shard: BatchShard | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (5) over the enabled modalities, plus the ponder cost of the dynamic gates.

    Pairs: fused/text, fused/image, text/image (each only when both sides exist). With the
    ``id`` modality: + lambda * ||h - sg(q)||^2. Dynamic variant with ``halting ==
    "expected_loss"``: the fused-dependent terms are computed for every layer's h_l and
    weighted per item by its exit probability p_l (what hard early exit will use at
    inference); with ``"mixture"`` they use h = sum_l p_l h_l. Both add
    ponder_weight * E[depth]. ``shard``: ``out`` holds this rank's items of a global batch
    (means become sums / ``shard.norm``, InfoNCE negatives come from every rank).
    """
    per_layer = out.layer_outputs is not None and cfg.halting == "expected_loss"
    h = out.layer_outputs if per_layer else out.fused  # [L, B, D] or [B, D]

    def mean(v: torch.Tensor) -> torch.Tensor:  # over items
        return v.mean() if shard is None else v.sum() / shard.norm

    def nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if shard is None:
            return info_nce_per_item(a, b, cfg.contrastive_tau)
        return sharded_info_nce_per_item(a, b, cfg.contrastive_tau, shard.rows)

    def weighted(v: torch.Tensor) -> torch.Tensor:  # [L, B] -> mean over items of E_p[v]
        return mean((out.exit_probs * v).sum(0)) if per_layer else mean(v)

    terms: dict[str, torch.Tensor] = {}
    for m, x in out.aligned.items():
        terms[f"nce_fused_{m}"] = weighted(nce(h, x))
    if "text" in out.aligned and "image" in out.aligned:
        terms["nce_text_image"] = mean(nce(out.aligned["text"], out.aligned["image"]))
    total = sum(terms.values(), torch.zeros((), device=out.fused.device))
    if cfg.use_id and out.aligned:
        terms["id_anchor"] = weighted(id_anchor(h, out.query))
        total = total + cfg.lambda_id * terms["id_anchor"]
    if out.exit_probs is not None and out.depth is not None:
        terms["expected_depth"] = mean(out.depth)
        total = total + cfg.ponder_weight * terms["expected_depth"]
    return total, {k: v.detach() for k, v in terms.items()}  # tensors: logging them never waits for the device
