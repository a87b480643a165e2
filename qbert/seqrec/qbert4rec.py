"""Q-BERT4Rec's sequence model: a bidirectional transformer over items given as semantic IDs.

Token convention (shared with the split's ``pad=0, shift=1`` views): 0 = padding,
1..N = catalogue items, N+1 = [MASK]. The model holds the catalogue's semantic-ID table
``codes`` [N, K] as a buffer; :meth:`QBert4Rec.set_catalogue` swaps it, which is how one
encoder is pretrained over several domains (each with its own table, all sharing the code
embeddings) and then fine-tuned on another.

Input of a position: the sum of its K code embeddings (one 256-entry table per level, plus
two extra rows per level for padding and [MASK]) -- or, with ``combine="concat"``, their
concatenation projected to ``hidden`` -- plus a learned position embedding, plus an item-ID
embedding when the "id" modality is on. Summing keeps the input width independent of K and
lets items sharing a code prefix share most of their representation.

Output at a position: K code distributions. Each level has its own projection of the hidden
state (initialised to the identity, so the encoder gets full-strength gradients from the
start), scored against that level's output code embeddings. These are untied from the input
ones by default (``tie_codes``): tied, the unpredictable deeper levels pull the shared input
embeddings towards their mean and training stalls for hundreds of steps before it learns any
transition (measured on planted data; see tests/test_qbert4rec.py). The loss (Eq. 11) is the
cross-entropy of the true code tokens at masked positions, averaged over levels; with the
"id" modality an item-ID softmax (tied to the item embedding) is added.

With ``repeat_bias`` a learned scalar is added to the item logit of every item already visible
in the sequence, in training (the unmasked items of the row) and at ranking (the history): the
model learns from the training data how likely a repeat is, which a bidirectional encoder with
tied item embeddings otherwise gets wrong (the [MASK] state resembles its context items, so
history items score high). The evaluation protocol is unchanged: history items are still ranked.

Ranking: put [MASK] after the history, take the K log-softmaxes there and score each item
as w * sum_l log p_l(code_l(item)) (+ log p(item) with the id modality): a gather over the code
table, [B, N] in one shot. ``code_score_weight`` w is 1 (the paper's plain sum) unless chosen on
valid; the per-level distributions are independent, so their product is a smoothing prior
over items that share codes, and how much of it helps next to the item softmax is an empirical
question (``finetune.select_code_weight`` answers it on valid; docs/benchmarks.md has Instruments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qbert.seqrec.layers import TransformerEncoder, init_weights, trim_left_padding

PAD = 0
REPEAT_SCALE = 10.0  # repeat_weight = REPEAT_SCALE * repeat_raw, so Adam moves it ~10 x lr per step


class QBert4Rec(nn.Module):
    """Bidirectional encoder over semantic-ID item sequences."""

    def __init__(self, codes: torch.Tensor, num_codes: int = 256, hidden: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.2, max_len: int = 50, use_id: bool = False,
                 combine: str = "sum", ffn_mult: int = 4, pre_ln: bool = False,
                 level_sizes: list[int] | None = None, tie_codes: bool = False,
                 code_score_weight: float = 1.0, repeat_bias: bool = False, prefix_bias: bool = False) -> None:
        super().__init__()
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"codes must be a non-empty [num_items, K] table, got shape {tuple(codes.shape)}")
        if combine not in ("sum", "concat"):
            raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
        for name, on in (("repeat_bias", repeat_bias), ("prefix_bias", prefix_bias)):
            if on and not use_id:
                raise ValueError(f"{name} needs the 'id' modality (it shifts the item softmax)")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.K = int(codes.shape[1])
        self.C = int(num_codes)
        self.hidden = hidden
        self.max_len = max_len
        self.use_id = use_id
        self.combine = combine
        if code_score_weight < 0:
            raise ValueError(f"code_score_weight must be >= 0, got {code_score_weight}")
        self.code_score_weight = float(code_score_weight)  # ranking only; not a parameter
        self.code_emb = nn.Embedding(self.K * (self.C + 2), hidden)  # level l uses rows [l*(C+2), (l+1)*(C+2))
        self.register_buffer("level_offset", torch.arange(self.K) * (self.C + 2), persistent=False)
        self.code_proj = nn.Linear(self.K * hidden, hidden) if combine == "concat" else None
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.in_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.in_drop = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(layers, hidden, heads, ffn_mult * hidden, dropout, causal=False, pre_ln=pre_ln)
        self.out_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.level_head = nn.Linear(hidden, self.K * hidden)
        self.code_bias = nn.Parameter(torch.zeros(self.K, self.C))
        self.code_out = None if tie_codes else nn.Parameter(torch.zeros(self.K, self.C, hidden))
        # levels with a smaller codebook than C never predict the codes they lack
        sizes = torch.as_tensor(level_sizes if level_sizes is not None else [self.C] * self.K)
        if sizes.shape != (self.K,) or bool((sizes < 1).any()) or bool((sizes > self.C).any()):
            raise ValueError(f"level_sizes must be {self.K} sizes in [1, {self.C}], got {level_sizes}")
        self.register_buffer("code_valid", torch.arange(self.C)[None, :] < sizes[:, None], persistent=False)
        self.item_emb: nn.Embedding | None = None
        self.item_bias: nn.Parameter | None = None
        init_weights(self)
        if self.code_out is not None:
            nn.init.normal_(self.code_out, std=0.02)
        # learned logit shift of items already in the visible sequence (0 at start: no prior). A
        # scalar moves about lr per Adam step; the shift it needs is a few nats, so it is trained
        # as REPEAT_SCALE * a raw parameter (read it through ``repeat_weight``)
        self.repeat_raw = nn.Parameter(torch.zeros(())) if repeat_bias else None
        # the same for items sharing the first l codes (l = 1..K-1) with an item in the sequence
        self.prefix_raw = nn.Parameter(torch.zeros(self.K - 1)) if prefix_bias and self.K > 1 else None
        with torch.no_grad():  # start every level's query at the shared hidden state: a 0.02-scale
            # projection here would shrink the gradient reaching the encoder and stall training
            self.level_head.weight.add_(torch.eye(hidden).repeat(self.K, 1))
        self.register_buffer("codes", torch.zeros(0, self.K, dtype=torch.long))
        self.set_catalogue(codes)

    # ------------------------------------------------------------------ catalogue
    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def mask_token(self) -> int:
        return self.num_items + 1

    def set_catalogue(self, codes: torch.Tensor) -> None:
        """Use a (new) semantic-ID table; re-creates the item-ID embedding when its size changes."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != self.K:
            raise ValueError(f"codes must be [num_items, {self.K}], got shape {tuple(codes.shape)}")
        if codes.numel() and (bool((codes < 0).any()) or bool((codes >= self.code_valid.sum(1)).any())):
            level = int(((codes < 0) | (codes >= self.code_valid.sum(1))).any(0).long().argmax())
            raise ValueError(f"codes of level {level} must lie in [0, {int(self.code_valid[level].sum())}), "
                             f"got range [{int(codes[:, level].min())}, {int(codes[:, level].max())}]")
        device = self.code_emb.weight.device
        n = codes.shape[0]
        special = torch.tensor([[self.C] * self.K, [self.C + 1] * self.K], dtype=torch.long)
        # row 0 = padding codes, rows 1..N = items, row N+1 = [MASK] codes
        self.codes = codes.to(device)
        prefix = [torch.unique(codes[:, : level + 1], dim=0, return_inverse=True)[1] for level in range(self.K - 1)]
        self.register_buffer("prefix_ids", torch.stack(prefix).to(device) if prefix else
                             torch.zeros(0, n, dtype=torch.long, device=device), persistent=False)
        self.prefix_counts = [int(ids.max()) + 1 for ids in prefix]  # distinct prefixes per length
        self.register_buffer("token_codes", torch.cat([special[:1], codes, special[1:]]).to(device), persistent=False)
        if self.use_id and (self.item_emb is None or self.item_emb.num_embeddings != n + 2):
            self.item_emb = nn.Embedding(n + 2, self.hidden, padding_idx=PAD).to(device)
            nn.init.normal_(self.item_emb.weight, std=0.02)
            with torch.no_grad():
                self.item_emb.weight[PAD].zero_()
            self.item_bias = nn.Parameter(torch.zeros(n, device=device))

    def catalogue_keys(self) -> set[str]:
        """State-dict keys that belong to a catalogue (not transferred across domains)."""
        keys = {"codes"}
        if self.use_id:
            keys |= {"item_emb.weight", "item_bias"}
        return keys

    def load_encoder(self, state: dict[str, torch.Tensor], with_catalogue: bool = False) -> list[str]:
        """Load pretrained weights; catalogue-specific ones only when ``with_catalogue``.

        Returns the keys left at their fresh initialisation.
        """
        own = self.state_dict()
        skip = set() if with_catalogue else self.catalogue_keys()
        take = {k: v for k, v in state.items() if k in own and k not in skip and own[k].shape == v.shape}
        self.load_state_dict(take, strict=False)
        return sorted(set(own) - set(take))

    # ------------------------------------------------------------------ forward
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.token_codes[tokens] + self.level_offset  # [B, L, K]
        e = self.code_emb(codes)  # [B, L, K, H]
        x = self.code_proj(e.flatten(2)) if self.code_proj is not None else e.sum(dim=2)
        if self.item_emb is not None:
            x = x + self.item_emb(tokens)
        L = tokens.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        x = x + self.pos_emb.weight[self.max_len - L :].unsqueeze(0)  # right-aligned positions
        return self.in_drop(self.in_norm(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> hidden states [B, L, H]."""
        return self.encoder(self.embed(tokens), tokens == PAD)

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> code logits [M, K, C] against the tied code embeddings."""
        q = self.level_head(self.out_transform(h)).view(-1, self.K, self.hidden)
        table = (self.code_emb.weight.view(self.K, self.C + 2, self.hidden)[:, : self.C]  # [K, C, H]
                 if self.code_out is None else self.code_out)
        logits = torch.einsum("mkh,kch->mkc", q, table) + self.code_bias
        return logits.masked_fill(~self.code_valid, -1e4)

    def id_logits(self, h: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [M, H] -> item logits [M, N] (tied to the item-ID embedding).

        ``visible`` [M, L]: the input tokens each row sees; with ``repeat_bias`` the items among
        them get the learned shift ``repeat_weight``.
        """
        assert self.item_emb is not None and self.item_bias is not None
        logits = self.out_transform(h) @ self.item_emb.weight[1 : self.num_items + 1].T + self.item_bias
        if self.repeat_weight is not None and visible is not None:
            logits = logits + self.repeat_weight * self.seen_items(visible)
        if self.prefix_raw is not None and visible is not None:
            logits = logits + self.seen_prefixes(visible)
        return logits

    def seen_prefixes(self, visible: torch.Tensor) -> torch.Tensor:
        """[M, L] tokens -> [M, N]: sum over l of prefix_weight[l] * (item shares its first l + 1
        codes with a visible item)."""
        w = self.prefix_raw * REPEAT_SCALE
        out = torch.zeros(len(visible), self.num_items, device=visible.device)
        for level in range(self.K - 1):
            out = out + w[level] * self._seen_groups(visible, self.prefix_ids[level], self.prefix_counts[level])
        return out

    def _seen_groups(self, visible: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
        """[M, L] tokens -> [M, N] indicator of the items whose group (``group`` [N] in [0, groups))
        is the group of a visible item: one scatter into [M, groups] and one gather."""
        real = (visible > 0) & (visible <= self.num_items)  # not padding (0) or [MASK] (N+1)
        item = (visible - 1).clamp(0, self.num_items - 1)
        seen = torch.zeros(len(visible), groups + 1, device=visible.device)  # column `groups`: not an item
        seen.scatter_(1, torch.where(real, group[item], groups), 1.0)
        return seen[:, group]

    @property
    def prefix_weight(self) -> torch.Tensor | None:
        """Learned logit shifts [K-1] of items sharing their first 1..K-1 codes with a sequence item."""
        return None if self.prefix_raw is None else self.prefix_raw * REPEAT_SCALE

    @property
    def repeat_weight(self) -> torch.Tensor | None:
        """The learned logit shift of items already in the sequence (None without ``repeat_bias``)."""
        return None if self.repeat_raw is None else self.repeat_raw * REPEAT_SCALE

    def seen_items(self, visible: torch.Tensor) -> torch.Tensor:
        """[M, L] tokens -> [M, N] float indicator of the catalogue items among them."""
        return self._seen_groups(visible, torch.arange(self.num_items, device=visible.device), self.num_items)

    def masked_loss(self, tokens: torch.Tensor, mask: torch.Tensor,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. (11): cross-entropy of the semantic-ID tokens of the masked items.

        ``tokens`` [B, L] are the original (unmasked) item tokens, ``mask`` [B, L] bool.
        ``label_smoothing`` applies to the item-ID softmax only (it spreads that share of the
        target over the whole catalogue); the code targets stay one-hot.
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if label_smoothing and self.item_emb is None:
            raise ValueError("label_smoothing needs the 'id' modality (it smooths the item softmax)")
        if bool((mask & (tokens == PAD)).any()):
            raise ValueError("mask covers padding positions")
        keep = trim_left_padding(tokens).shape[1]  # columns that are padding in every row do no work
        tokens, mask = tokens[:, tokens.shape[1] - keep :], mask[:, mask.shape[1] - keep :]
        items = tokens[mask] - 1  # [M] 0-based item ids
        inp = tokens.masked_fill(mask, self.mask_token)
        h = self(inp)[mask]  # [M, H]
        rows = mask.nonzero()[:, 0]  # the row of each masked position
        logits = self.code_logits(h)
        target = self.codes[items]  # [M, K]
        code_loss = F.cross_entropy(logits.reshape(-1, self.C), target.reshape(-1))
        loss = code_loss
        logs = {"code_loss": float(code_loss.detach())}
        if self.item_emb is not None:
            biased = self.repeat_raw is not None or self.prefix_raw is not None
            id_loss = F.cross_entropy(self.id_logits(h, inp[rows] if biased else None), items,
                                      label_smoothing=label_smoothing)
            loss = loss + id_loss
            logs["id_loss"] = float(id_loss.detach())
        return loss, logs

    # ------------------------------------------------------------------ ranking
    def append_mask(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] history tokens -> [B, L'] with [MASK] last (oldest item dropped if needed)."""
        hist = trim_left_padding(history)
        keep = min(hist.shape[1], self.max_len - 1)
        hist = hist[:, hist.shape[1] - keep :]
        m = torch.full((len(hist), 1), self.mask_token, dtype=hist.dtype, device=hist.device)
        return torch.cat([hist, m], dim=1)

    def code_log_probs(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(code log-probs [B, K, C], hidden at the [MASK] [B, H], the model's input [B, L'])."""
        inp = self.append_mask(history)
        h = self(inp)[:, -1]
        return F.log_softmax(self.code_logits(h), dim=-1), h, inp

    def score_parts(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum over levels of log p(code_l of item) [B, N], log p(item) [B, N] or None without id)."""
        lp, h, inp = self.code_log_probs(history)
        codes = lp[:, 0, self.codes[:, 0]]
        for level in range(1, self.K):
            codes = codes + lp[:, level, self.codes[:, level]]
        ids = F.log_softmax(self.id_logits(h, inp), dim=-1) if self.item_emb is not None else None
        return codes, ids

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """Full-ranking scores [B, N]: code_score_weight * sum_l log p(code_l) (+ log p(item))."""
        codes, ids = self.score_parts(history)
        return codes if ids is None else self.code_score_weight * codes + ids


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
