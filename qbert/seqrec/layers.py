"""Transformer building blocks shared by the sequence models (SASRec, BERT4Rec, Q-BERT4Rec).

Conventions every model here follows:
- sequences are **left-padded**: the newest item is in the last column, padding (id 0) first;
- learned positions are counted from the right edge of a ``max_len`` window, so a batch may
  be trimmed to its longest row (leading all-padding columns dropped) without changing any
  real position's output — the cheap way to skip work on short sequences;
- attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`.

Defaults follow RecBole's ``TransformerEncoder`` (post-LN, GELU, eps 1e-12, N(0, 0.02)
init), which produced the paper's SASRec/BERT4Rec baseline rows; ``pre_ln`` is available for
deeper stacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(pad_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask (True = may attend) from ``pad_mask`` [B, L] (True = padding).

    Every position may attend to itself, so padding queries (whose keys are all masked under
    the causal flag) get a finite output instead of NaN; their outputs are never used.
    """
    B, L = pad_mask.shape
    allowed = (~pad_mask)[:, None, None, :].expand(B, 1, L, L)
    eye = torch.eye(L, dtype=torch.bool, device=pad_mask.device)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=pad_mask.device).tril()
    return allowed | eye


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H]; with ``keep`` ([B, L] bool or flat indices, :func:`take_positions`),
        only the kept positions' outputs [M, H] (the output projection then runs on those rows alone)."""
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(B, L, H)
        return self.out(ctx if keep is None else take_positions(ctx, keep))


class TransformerBlock(nn.Module):
    """Self-attention + position-wise FFN, each with dropout, residual and LayerNorm."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float,
                 pre_ln: bool = False, eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.attn = MultiHeadSelfAttention(hidden, heads, attn_dropout)
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), _activation(activation), nn.Linear(inner, hidden))
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.pre_ln = pre_ln

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or with ``keep`` (:func:`take_positions`) the kept positions' outputs
        [M, H]: every position is still a key and value, but the output projection, residual and FFN run
        on the kept rows only (exact: a position's output depends on the others only through attention)."""
        res = x if keep is None else take_positions(x, keep)
        if self.pre_ln:
            x = res + self.drop(self.attn(self.ln1(x), mask, keep))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(res + self.drop(self.attn(x, mask, keep)))
        return self.ln2(x + self.drop(self.ffn(x)))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerBlock` with a padding mask and an optional causal flag.

    ``forward(x [B, L, H], pad_mask [B, L] bool True = padding) -> [B, L, H]``. With
    ``pre_ln`` a final LayerNorm is applied (the pre-LN residual stream is un-normalised).
    """

    def __init__(self, num_layers: int = 2, hidden: int = 64, heads: int = 2, inner: int | None = None,
                 dropout: float = 0.5, attn_dropout: float | None = None, causal: bool = False,
                 pre_ln: bool = False, eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList([
            TransformerBlock(hidden, heads, inner or 4 * hidden, dropout,
                             dropout if attn_dropout is None else attn_dropout, pre_ln, eps, activation)
            for _ in range(num_layers)
        ])
        self.final_ln = nn.LayerNorm(hidden, eps=eps) if pre_ln else nn.Identity()

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` [B, L] bool, or the flat indices [M] of positions in ``[B * L]``: return only those
        positions' outputs [M, H] (in that order; bool: row-major, as ``out[keep]``); the last block
        then does its per-position work on them alone. Indices select without a host synchronisation."""
        mask = attention_mask(pad_mask, self.causal)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, keep if i == last else None)
        return self.final_ln(x)


class SequenceEmbedding(nn.Module):
    """Token embedding + learned right-aligned position embedding, LayerNorm, dropout.

    ``num_tokens`` includes padding (id 0) and any special tokens. Positions count from the
    right edge of ``max_len``, so trimmed (shorter) left-padded batches keep their positions.
    """

    def __init__(self, num_tokens: int, hidden: int, max_len: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(num_tokens, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        L = seq.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        pos = torch.arange(self.max_len - L, self.max_len, device=seq.device)
        return self.drop(self.ln(self.tokens(seq) + self.positions(pos)[None]))


def take_positions(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [M, H]: the positions ``keep`` names, as a [B, L] bool mask (row-major; its
    count is data-dependent, so the host waits for the device) or as flat long indices into
    ``B * L`` (no synchronisation)."""
    return x[keep] if keep.dtype == torch.bool else x.flatten(0, 1).index_select(0, keep)


def trim_left_padding(seq: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Drop leading columns that are padding in every row (exact for right-aligned positions)."""
    real = (seq != pad).any(dim=0)
    if not bool(real.any()):
        return seq[:, -1:]
    first = int(real.float().argmax())
    return seq[:, first:]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """RecBole/BERT initialisation: N(0, std) for Linear/Embedding, unit LayerNorm, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _activation(name: str) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(acts)}")
    return acts[name]()


class ItemSequenceModel(nn.Module):
    """Shared by the ID-only baselines: embed + encode a token sequence, full-softmax item CE.

    Subclasses set ``self.embed`` (a :class:`SequenceEmbedding`), ``self.encoder`` and
    ``item_logits``; the loss over every labelled position is the same for both.
    """

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (left-padded, L <= max_len) -> [B, L, H] hidden states."""
        return self.encoder(self.embed(seq), seq == 0)

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled positions (``labels`` 0-based item, -1 = none)."""
        h = self.encode(inputs)
        sel = labels >= 0
        return F.cross_entropy(self.item_logits(h[sel]), labels[sel])
