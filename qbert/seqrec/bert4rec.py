"""BERT4Rec (Sun et al. 2019): bidirectional encoder trained to recover masked items.

Training masks each real item with ``mask_prob`` and always masks the last one too (the
position inference asks about); the loss is cross-entropy over the full item set.
At inference a [MASK] token is appended after the history and its output ranks all items.
Token ids: 0 = padding, item ``i`` -> ``i + 1``, ``num_items + 1`` = [MASK].
The output head (dense + GELU + LayerNorm, tied item embeddings, per-item bias) is
RecBole's/the original paper's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qbert.seqrec.layers import ItemSequenceModel, SequenceEmbedding, TransformerEncoder, init_weights, trim_left_padding


class BERT4Rec(ItemSequenceModel):
    def __init__(self, num_items: int, max_len: int = 50, hidden: int = 64, layers: int = 2, heads: int = 2,
                 inner: int = 256, dropout: float = 0.2, attn_dropout: float | None = None, pre_ln: bool = False):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.mask_token = num_items + 1
        self.embed = SequenceEmbedding(num_items + 2, hidden, max_len, dropout)
        self.encoder = TransformerEncoder(layers, hidden, heads, inner, dropout, attn_dropout, causal=False, pre_ln=pre_ln)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.out_bias = nn.Parameter(torch.zeros(num_items))
        init_weights(self)
        with torch.no_grad():
            self.embed.tokens.weight[0].zero_()

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h) @ self.embed.tokens.weight[1 : self.num_items + 1].T + self.out_bias

    @torch.no_grad()
    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L-1 or less] histories (token ids, left-padded) -> [B, num_items]: [MASK] appended."""
        mask = torch.full((history.shape[0], 1), self.mask_token, dtype=history.dtype, device=history.device)
        seq = trim_left_padding(torch.cat([history[:, -(self.max_len - 1):], mask], dim=1))
        return self.item_logits(self.encode(seq)[:, -1])


def mask_items(rows: np.ndarray, mask_token: int, mask_prob: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a batch of left-padded rows: random items plus the last one masked.

    ``labels`` = 0-based item at masked positions, -1 elsewhere.
    """
    real = rows > 0
    masked = real & (rng.random(rows.shape) < mask_prob)
    masked[:, -1] |= real[:, -1]
    inputs = np.where(masked, mask_token, rows)
    labels = np.where(masked, rows - 1, -1)
    return inputs, labels
