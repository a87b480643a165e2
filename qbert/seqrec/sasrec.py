"""SASRec (Kang & McAuley 2018): causal self-attention over the item sequence, next-item CE.

Trained with cross-entropy over the full item set (logits = hidden @ item_embedding.T, the
padding row excluded), as RecBole's SASRec with ``loss_type=CE`` that gave the paper's
baseline row. Token ids: 0 = padding, item ``i`` -> ``i + 1``.
"""

from __future__ import annotations

import torch

from qbert.seqrec.layers import ItemSequenceModel, SequenceEmbedding, TransformerEncoder, init_weights, trim_left_padding


class SASRec(ItemSequenceModel):
    def __init__(self, num_items: int, max_len: int = 50, hidden: int = 64, layers: int = 2, heads: int = 2,
                 inner: int = 256, dropout: float = 0.5, attn_dropout: float | None = None, pre_ln: bool = False):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.embed = SequenceEmbedding(num_items + 1, hidden, max_len, dropout)
        self.encoder = TransformerEncoder(layers, hidden, heads, inner, dropout, attn_dropout, causal=True, pre_ln=pre_ln)
        init_weights(self)
        with torch.no_grad():
            self.embed.tokens.weight[0].zero_()

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., num_items] scores of every item (0-based item order)."""
        return h @ self.embed.tokens.weight[1:].T

    @torch.no_grad()
    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] histories (token ids, left-padded) -> [B, num_items] next-item scores."""
        seq = trim_left_padding(history)
        return self.item_logits(self.encode(seq)[:, -1])
