"""Q-BERT4Rec's sequence model: a bidirectional transformer over items given as semantic IDs.

(Over 400 lines: one model class whose embedding, heads, biases and scoring belong together.)

Token convention (shared with the split's ``pad=0, shift=1`` views): 0 = padding,
1..N = catalogue items, N+1 = [MASK]. The model holds the catalogue's semantic-ID table
``codes`` [N, K] as a buffer; :meth:`QBert4Rec.set_catalogue` swaps it, which is how one
encoder is pretrained over several domains (each with its own table, all sharing the code
vocabulary) and then fine-tuned on another.

**The paper's model (``item_id="none"``, the default) holds no table indexed by item ID.**
Every learned item-dependent parameter is indexed by a code token or by a hashed code prefix:

- input of a position: the sum of its K code embeddings (one 256-entry table per level, plus
  two extra rows per level for padding and [MASK]) -- or, with ``combine="concat"``, their
  concatenation projected to ``hidden`` -- plus the embeddings of its code prefixes of the
  lengths in ``prefix_lengths`` (Singh et al. 2023's prefix n-grams; default 2..K-1), each
  hashed into one shared table of ``prefix_buckets`` rows whose size does not grow with the
  catalogue, plus a learned position embedding. The full K-code tuple is left out by default:
  it is unique per item, so its embedding acts as an item ID (with every catalogue item as a
  negative it learned to push down items never seen in training: new items' HR@10 0.04 on the
  planted cold-start test; since training's softmax covers only the items it contains,
  :meth:`set_train_candidates`, 0.86; docs/method.md);
- output at a position (``head="catalogue"``, the default): a softmax over the catalogue's
  semantic IDs, the logit of item i being ``<q(h), e_i> + b_i`` where ``e_i`` is composed the
  same way from output code and prefix embeddings and ``b_i`` from per-code and per-prefix
  biases. This is P(z_item | context) normalised over the semantic IDs that exist, the
  quantity the inference rule ranks by (Sec. 3.6). ``head="levels"`` keeps the independent
  per-level product prod_l p_l(c_l) instead (normalised over all C^K tuples, most of which
  name no item), the estimate this code used before; the two are not yet compared on
  Instruments (docs/method.md).

The masked loss (Eq. 11) is the cross-entropy of the true code tokens at masked positions,
averaged over levels (weighted by ``code_loss_weight``), plus, with the catalogue head, the
cross-entropy of the true item's semantic ID against every catalogue semantic ID.

Item IDs, the hybrid (a baseline, not the paper's model): ``item_id="input"`` adds an item-ID
embedding to the input; ``"input_and_head"`` also trains an item-ID softmax tied to it and
ranks by ``code_score_weight * code term + log p(item)``.

With ``repeat_bias`` a learned scalar is added to the item logit of every item already visible
in the sequence, in training (the unmasked items of the row) and at ranking (the history); with
``prefix_bias`` one per prefix length for items sharing a prefix with one. Both shift the item
softmax (the item-ID head when there is one, else the catalogue head) and are not item-indexed.

Per-level output projections start at the identity, so the encoder gets full-strength gradients
from the start; output code embeddings are untied from the input ones by default
(``tie_codes``): tied, the unpredictable deeper levels pull the shared input embeddings towards
their mean and training stalls (measured on planted data; see tests/test_qbert4rec.py).
Prefix tables start at zero, so a prefix that no training step touches contributes nothing
rather than noise (a prefix of an item that is only ever a negative in the item softmax is
touched: that is why the full-length prefix is off by default).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qbert.seqrec.layers import TransformerEncoder, init_weights, trim_left_padding
from qbert.seqrec.prefix_tables import PrefixTables, prefix_hash

__all__ = ["QBert4Rec", "prefix_hash", "count_parameters"]

PAD = 0
IGNORE = -100  # cross-entropy target of a row that is not a masked position
REPEAT_SCALE = 10.0  # repeat_weight = REPEAT_SCALE * repeat_raw, so Adam moves it ~10 x lr per step
ITEM_ID_MODES = ("none", "input", "input_and_head")
HEADS = ("catalogue", "levels")
NEW_ITEM_RULES = ("backoff", "own", "mixture")
class QBert4Rec(nn.Module):
    """Bidirectional encoder over semantic-ID item sequences."""

    # the rows the last block and the heads compute in training are rounded up to a multiple of
    # this (extra rows are ignored by the loss): a handful of distinct matrix shapes instead of
    # one per masked count, so bf16 kernels set up for a shape are reused (measured, #21)
    ROW_MULTIPLE = 64

    def __init__(self, codes: torch.Tensor, num_codes: int = 256, hidden: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.2, max_len: int = 50, item_id: str = "none",
                 head: str = "catalogue", prefix_lengths: list[int] | None = None, prefix_buckets: int = 32768,
                 code_loss_weight: float = 1.0, combine: str = "sum", ffn_mult: int = 4, pre_ln: bool = False,
                 level_sizes: list[int] | None = None, tie_codes: bool = False, tie_prefix: bool = False,
                 code_score_weight: float = 1.0, repeat_bias: bool = False, prefix_bias: bool = False,
                 new_items: str = "own", new_item_weight: float = 0.25, new_item_offset: float = 1.5,
                 new_item_content: float = 0.0, content_dim: int = 0, new_item_share: float = 0.1,
                 new_item_temperature: float = 10.0, new_item_recency: float = 0.0,
                 new_item_cluster: float = 0.0, new_item_neighbours: int = 0,
                 new_item_peers_before_repeat: bool = False) -> None:
        super().__init__()
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"codes must be a non-empty [num_items, K] table, got shape {tuple(codes.shape)}")
        if combine not in ("sum", "concat"):
            raise ValueError(f"combine must be 'sum' or 'concat', got {combine!r}")
        if item_id not in ITEM_ID_MODES:
            raise ValueError(f"item_id must be one of {ITEM_ID_MODES}, got {item_id!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if new_items not in NEW_ITEM_RULES or not 0.0 <= new_item_weight <= 1.0 or new_item_content < 0:
            raise ValueError(f"new_items must be one of {NEW_ITEM_RULES}, new_item_weight in [0, 1] and "
                             f"new_item_content >= 0, got {new_items!r}, {new_item_weight}, {new_item_content}")
        if not 0.0 < new_item_share < 1.0:
            raise ValueError(f"new_item_share must lie in (0, 1), got {new_item_share}")
        if new_item_neighbours < 0:
            raise ValueError(f"new_item_neighbours must be >= 0, got {new_item_neighbours}")
        self.K = int(codes.shape[1])
        lengths = list(range(2, self.K)) if prefix_lengths is None else sorted(set(prefix_lengths))
        if any(not 2 <= n <= self.K for n in lengths):
            raise ValueError(f"prefix_lengths must lie in [2, {self.K}] (length 1 is the level-1 code), got {prefix_lengths}")
        if content_dim < 0 or (content_dim and (head != "catalogue" or item_id == "input_and_head")):
            raise ValueError(f"content_dim must be >= 0 and needs head='catalogue' without the item-ID head, got "
                             f"{content_dim}, {head!r}, {item_id!r}")
        if prefix_buckets < 1:
            raise ValueError(f"prefix_buckets must be >= 1, got {prefix_buckets}")
        if tie_prefix and (head != "catalogue" or not lengths):
            raise ValueError(f"tie_prefix ties the catalogue head's prefix rows: it needs head='catalogue' and "
                             f"prefix lengths, got {head!r}, {lengths}")
        self.id_head = item_id == "input_and_head"
        self.head = head
        for name, on in (("repeat_bias", repeat_bias), ("prefix_bias", prefix_bias)):
            if on and not self.item_softmax:
                raise ValueError(f"{name} shifts an item softmax: it needs head='catalogue' or item_id='input_and_head'")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if code_score_weight < 0 or code_loss_weight < 0:
            raise ValueError(f"code_score_weight and code_loss_weight must be >= 0, got {code_score_weight}, "
                             f"{code_loss_weight}")
        self.C = int(num_codes)
        self.hidden = hidden
        self.max_len = max_len
        self.item_id = item_id
        self.combine = combine
        self.code_score_weight = float(code_score_weight)  # ranking only; not a parameter
        self.new_items = new_items  # ranking only, like the two below (see new_item_scores)
        self.new_item_weight = float(new_item_weight)
        self.new_item_offset = float(new_item_offset)
        self.new_item_content = float(new_item_content)
        self.new_item_neighbours = int(new_item_neighbours)  # backoff to content neighbours (new_item_scores)
        self.new_item_peers_before_repeat = bool(new_item_peers_before_repeat)  # the peers' P before the repeat shift
        self.new_item_share = float(new_item_share)  # the mixture rule's (see mixture_scores)
        self.new_item_temperature = float(new_item_temperature)  # weights of new_item_features
        self.new_item_recency = float(new_item_recency)
        self.new_item_cluster = float(new_item_cluster)
        # [N + 2, D] unit content vectors by token (set_item_content; data, not saved)
        self.register_buffer("item_content", None, persistent=False)
        # [N, content_dim] the same through a fixed random projection (content_out's input)
        self.register_buffer("content_reduced", None, persistent=False)
        self.code_loss_weight = float(code_loss_weight)
        self.prefix_lengths = lengths
        self.prefix_buckets = int(prefix_buckets)
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
        # hashed prefix n-gram tables of a fixed size; training touches the rows the catalogue uses
        self.prefix = (PrefixTables(self.prefix_buckets, hidden, with_out=head == "catalogue", tied=tie_prefix)
                       if lengths else None)
        # levels with a smaller codebook than C never predict the codes they lack
        sizes = torch.as_tensor(level_sizes if level_sizes is not None else [self.C] * self.K)
        if sizes.shape != (self.K,) or bool((sizes < 1).any()) or bool((sizes > self.C).any()):
            raise ValueError(f"level_sizes must be {self.K} sizes in [1, {self.C}], got {level_sizes}")
        self.register_buffer("code_valid", torch.arange(self.C)[None, :] < sizes[:, None], persistent=False)
        self.item_emb: nn.Embedding | None = None
        self.item_bias: nn.Parameter | None = None
        # content_dim > 0: one linear map, shared by all items, from an item's (reduced) content
        # vector to a term of its output vector and bias (docs/method.md, "Content in the item vectors")
        self.content_dim = int(content_dim)
        self.content_out = nn.Linear(content_dim, hidden + 1, bias=False) if content_dim else None
        init_weights(self)
        if self.content_out is not None:  # 0 at start: the model begins as the one without content
            nn.init.zeros_(self.content_out.weight)
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
        self.train_candidates: torch.Tensor | None = None
        self.candidate_index: torch.Tensor | None = None
        self._specific: tuple[tuple, torch.Tensor] | None = None  # (key, item_specific_rows)
        self.set_catalogue(codes)
        # model.pt / last.pt / pretrain.pt written before the prefix tables had a module of their own
        self._register_load_state_dict_pre_hook(_upgrade_in_place)
        self._register_load_state_dict_pre_hook(self._all_trained_if_unrecorded)
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_trained_caches())

    # ------------------------------------------------------------------ catalogue
    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def mask_token(self) -> int:
        return self.num_items + 1

    @property
    def item_softmax(self) -> bool:
        """Whether training has a softmax over the catalogue (the catalogue head or the item-ID head)."""
        return self.head == "catalogue" or self.id_head

    def set_catalogue(self, codes: torch.Tensor) -> None:
        """Use a (new) semantic-ID table; re-creates the item-ID embedding (hybrid only) when its size changes."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != self.K:
            raise ValueError(f"codes must be [num_items, {self.K}], got shape {tuple(codes.shape)}")
        if codes.numel() and (bool((codes < 0).any()) or bool((codes >= self.code_valid.sum(1)).any())):
            level = int(((codes < 0) | (codes >= self.code_valid.sum(1))).any(0).long().argmax())
            raise ValueError(f"codes of level {level} must lie in [0, {int(self.code_valid[level].sum())}), "
                             f"got range [{int(codes[:, level].min())}, {int(codes[:, level].max())}]")
        device = self.code_emb.weight.device
        n = codes.shape[0]
        self.train_candidates = self.candidate_index = None  # they index the previous catalogue
        if getattr(self, "item_content", None) is not None and self.item_content.shape[0] != n + 2:
            self.item_content = self.content_reduced = None  # content of another catalogue: set it again
        special = torch.tensor([[self.C] * self.K, [self.C + 1] * self.K], dtype=torch.long)
        # row 0 = padding codes, rows 1..N = items, row N+1 = [MASK] codes
        self.codes = codes.to(device)
        prefix = [torch.unique(codes[:, : level + 1], dim=0, return_inverse=True)[1] for level in range(self.K - 1)]
        self.register_buffer("prefix_ids", torch.stack(prefix).to(device) if prefix else
                             torch.zeros(0, n, dtype=torch.long, device=device), persistent=False)
        self.prefix_counts = [int(ids.max()) + 1 for ids in prefix]  # distinct prefixes per length
        self.register_buffer("token_codes", torch.cat([special[:1], codes, special[1:]]).to(device), persistent=False)
        buckets = prefix_hash(codes, self.prefix_lengths, self.prefix_buckets)  # [N, P] rows of the fixed tables
        self.register_buffer("item_buckets", buckets.to(device), persistent=False)
        rows = self.prefix.bind(buckets) if self.prefix is not None else buckets  # [N, P] compact trained rows
        blank = torch.full((1, buckets.shape[1]), self.prefix.blank if self.prefix is not None else 0, dtype=torch.long)
        self.register_buffer("item_prefix_rows", rows.to(device), persistent=False)
        self.register_buffer("token_prefix_rows", torch.cat([blank, rows.cpu(), blank]).to(device), persistent=False)
        self.register_buffer("item_code_rows", (codes + torch.arange(self.K) * self.C).to(device), persistent=False)
        # which items training rows held (set by fine-tuning; saved with the model): all until told
        self.register_buffer("trained_items", torch.ones(n, dtype=torch.bool, device=device))
        self._untrained_key = self._slots_key = self._neighbours_key = None
        if self.item_id != "none" and (self.item_emb is None or self.item_emb.num_embeddings != n + 2):
            self.item_emb = nn.Embedding(n + 2, self.hidden, padding_idx=PAD).to(device)
            nn.init.normal_(self.item_emb.weight, std=0.02)
            with torch.no_grad():
                self.item_emb.weight[PAD].zero_()
            self.item_bias = nn.Parameter(torch.zeros(n, device=device)) if self.id_head else None

    @property
    def uses_content(self) -> bool:
        """Whether the model reads the items' content: the content term of its item vectors
        (``content_dim``; training and ranking), of the backoff rule or of the mixture rule (ranking only)."""
        rule = self.item_id == "none" and self.head == "catalogue" and (
            self.new_items == "mixture" or self.new_items == "backoff"
            and (self.new_item_content > 0 or self.new_item_neighbours > 0))
        return self.content_out is not None or rule

    @property
    def catalogue_content(self) -> torch.Tensor | None:
        """[N, D] the items' content vectors (``item_content`` without its padding and [MASK] rows)."""
        return None if self.item_content is None else self.item_content[1:-1]

    def set_item_content(self, content: torch.Tensor | np.ndarray | None) -> None:
        """Each catalogue item's content vector [N, D] (``qbert.pipeline.data.content_vectors`` of
        stage 1's input features), read by the content term of the item vectors (``content_dim``)
        and of the backoff rule (``new_item_content``); data, not in the state dict. None: no content."""
        self._neighbours_key = None  # neighbours are found again from the new content
        if content is None:
            self.item_content = self.content_reduced = None
            return
        x = (content.detach().to("cpu", torch.float32) if torch.is_tensor(content)
             else torch.as_tensor(np.array(content, dtype=np.float32)))
        if x.ndim != 2 or x.shape[0] != self.num_items:
            raise ValueError(f"item content must be [{self.num_items}, D] (one row per catalogue item), "
                             f"got shape {tuple(x.shape)}")
        blank = torch.zeros(1, x.shape[1])  # padding and [MASK] tokens carry no content
        x = F.normalize(x, dim=1)
        self.item_content = torch.cat([blank, x, blank]).to(self.codes.device)
        if self.content_out is not None:
            self.content_reduced = reduce_content(x, self.content_dim).to(self.codes.device)

    def set_train_candidates(self, items: torch.Tensor | None) -> None:
        """Normalise the training item softmax over ``items`` only (0-based; None: the whole
        catalogue). Training sets it to the items its rows contain, so an item no training row holds
        (a cold-start item) is never a negative: nothing learns to push it down, and it is ranked
        at inference from its composed semantic-ID embedding like any other. Ranking always scores
        the whole catalogue."""
        if items is not None:
            items = torch.unique(torch.as_tensor(items, dtype=torch.long, device=self.codes.device))
            if items.numel() == self.num_items:
                items = None
        self.train_candidates = items
        index = None
        if items is not None:
            index = torch.full((self.num_items,), -1, dtype=torch.long, device=items.device)
            index[items] = torch.arange(items.numel(), device=items.device)
        self.candidate_index = index

    def set_trained_items(self, items: torch.Tensor | np.ndarray) -> None:
        """Record which catalogue items (0-based) the training rows held; ranking scores the others,
        items with no training signal of their own, by :meth:`new_item_scores`."""
        items = torch.as_tensor(np.asarray(items))
        if items.dtype == torch.bool or items.is_floating_point():
            raise ValueError(f"set_trained_items takes 0-based item indices, got a {items.dtype} tensor")
        flags = torch.zeros(self.num_items, dtype=torch.bool, device=self.codes.device)
        flags[items.to(device=flags.device, dtype=torch.long)] = True
        self.trained_items = flags
        self._untrained_key = self._slots_key = self._neighbours_key = None

    def _forget_trained_caches(self) -> None:
        self._untrained_key = self._slots_key = self._neighbours_key = None
        self._specific = None

    def _all_trained_if_unrecorded(self, state: dict[str, torch.Tensor], prefix: str, *args) -> None:  # noqa: ANN002
        """``load_state_dict`` pre-hook: a state saved before the trained items were recorded keeps
        the model's own record (every item, unless :meth:`set_trained_items` said otherwise)."""
        if prefix + "codes" in state and prefix + "trained_items" not in state:
            n = len(state[prefix + "codes"])
            own = self.trained_items.cpu()
            state[prefix + "trained_items"] = own if len(own) == n else torch.ones(n, dtype=torch.bool)

    def catalogue_keys(self) -> set[str]:
        """State-dict keys that belong to a catalogue (not transferred across domains)."""
        keys = {"codes", "trained_items"}
        if self.item_id != "none":
            keys |= {"item_emb.weight", "item_bias"}
        return keys

    def item_indexed_parameters(self) -> list[str]:
        """Names of learned tensors indexed by item ID (empty for the paper's model, item_id 'none')."""
        return [name for name, p in self.named_parameters()
                if p is self.item_bias or (self.item_emb is not None and p is self.item_emb.weight)]

    def load_encoder(self, state: dict[str, torch.Tensor], with_catalogue: bool = False) -> list[str]:
        """Load pretrained weights; catalogue-specific ones only when ``with_catalogue``.

        Returns the keys left at their fresh initialisation.
        """
        own = self.state_dict()
        skip = set() if with_catalogue else self.catalogue_keys()
        state = upgrade_state_dict(state)
        take = {k: v for k, v in state.items() if k in own and k not in skip and own[k].shape == v.shape}
        self.load_state_dict(take, strict=False)
        return sorted(set(own) - set(take))

    # ------------------------------------------------------------------ forward
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.token_codes[tokens] + self.level_offset  # [B, L, K]
        if self.code_proj is not None:
            x = self.code_proj(self.code_emb(codes).flatten(2))
        else:  # sums as embedding bags: no [B, L, K, H] intermediate, and a cheaper backward
            x = _bag(codes, self.code_emb.weight)
        if self.prefix is not None:
            x = x + _bag(self.token_prefix_rows[tokens], self.prefix.inp, self.prefix.blank)
        if self.item_emb is not None:
            x = x + self.item_emb(tokens)
        L = tokens.shape[1]
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        x = x + self.pos_emb.weight[self.max_len - L :].unsqueeze(0)  # right-aligned positions
        return self.in_drop(self.in_norm(x))

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] -> hidden states [B, L, H]; with ``keep`` ([B, L] bool or flat indices) only
        the kept positions' states [M, H] (= ``forward(tokens)[keep]``, with less work in the last block)."""
        return self.encoder(self.embed(tokens), tokens == PAD, keep)

    def last_hidden(self, inp: torch.Tensor) -> torch.Tensor:
        """[B, L] model input -> [B, H] hidden state at the last position (where ranking puts [MASK])."""
        keep = torch.zeros_like(inp, dtype=torch.bool)
        keep[:, -1] = True
        return self(inp, keep)

    def _code_table(self) -> torch.Tensor:
        """Output code embeddings [K, C, H] (tied to the input ones with ``tie_codes``)."""
        if self.code_out is not None:
            return self.code_out
        return self.code_emb.weight.view(self.K, self.C + 2, self.hidden)[:, : self.C]

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> per-level code logits [M, K, C]."""
        q = self.level_head(self.out_transform(h)).view(-1, self.K, self.hidden)
        logits = torch.einsum("mkh,kch->mkc", q, self._code_table()) + self.code_bias
        return logits.masked_fill(~self.code_valid, -1e4)

    def item_vectors(self, keep: torch.Tensor | None = None,
                     items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output embedding [N, H] and bias [N] of every catalogue item, composed from its codes
        and hashed prefixes (no item-indexed parameter); of ``items`` only when given (a sampled
        softmax composes only its candidates). ``keep`` [N, P] float: weight of each item's prefix
        rows (0 drops a row; :meth:`pseudo_new_keep`)."""
        # embedding look-ups rather than advanced indexing: their backward is an index_add into the
        # table, several times faster on CPU than index_put's accumulate (measured, #21)
        flat, prefix_rows = self.item_code_rows, self.item_prefix_rows  # [N, K] rows of the flat [K * C] tables
        if items is not None:
            flat, prefix_rows = flat[items], prefix_rows[items]
            keep = keep[items] if keep is not None else None
        vec = _bag(flat, self._code_table().reshape(self.K * self.C, self.hidden))  # [N, H]
        bias = _bag(flat, self.code_bias.view(-1, 1))[:, 0]  # [N]
        if self.prefix is not None and self.prefix.with_out:
            vec = vec + _bag(prefix_rows, self.prefix.out_rows, weights=keep)
            bias = bias + _bag(prefix_rows, self.prefix.out_bias.view(-1, 1), weights=keep)[:, 0]
        if self.content_out is not None:  # shared by all items: new items keep it (pseudo_new too)
            if self.content_reduced is None:
                raise ValueError("content_dim > 0 composes item vectors from content: set_item_content first "
                                 "(qbert.pipeline.data.content_vectors)")
            extra = self.content_out(self.content_reduced if items is None else self.content_reduced[items])
            vec, bias = vec + extra[:, :-1].to(vec.dtype), bias + extra[:, -1].to(bias.dtype)
        return vec, bias

    def item_specific_rows(self) -> torch.Tensor:
        """[N, P] bool: which of each item's prefix rows no other trained item (``trained_items``)
        uses, the rows only that item's own targets train (with ``tie_prefix`` also its occurrences
        in the input). (An untrained item's rows are specific when no trained item of the catalogue
        uses them: fine-tuning never trains them, though pretraining on other domains may have.)"""
        rows, trained = self.item_prefix_rows, self.trained_items
        key = (trained.data_ptr(), trained._version, rows.data_ptr(), rows.device)
        if self._specific is None or self._specific[0] != key:
            first = torch.ones_like(rows, dtype=torch.bool)  # count an item once per row, even if two
            for p in range(1, rows.shape[1]):  # of its prefix lengths hash to the same row
                first[:, p] = ~(rows[:, p : p + 1] == rows[:, :p]).any(1)
            users = torch.zeros(int(rows.max()) + 1 if rows.numel() else 1, dtype=torch.long, device=rows.device)
            users.index_add_(0, rows.reshape(-1), (first & trained[:, None]).long().reshape(-1))  # trained items per row
            self._specific = (key, users[rows] <= trained.long()[:, None])  # this item alone, or no trained item
        return self._specific[1]

    def pseudo_new_keep(self, pseudo_new: torch.Tensor | None) -> torch.Tensor | None:
        """[N] bool items to score as new in this training step -> [N, P] weights of the prefix rows
        that drop those items' item-specific rows (:meth:`item_specific_rows`), as an item with no
        training row of its own is ranked. Item dropout in the spirit of DropoutNet (Volkovs et al.
        2017): the shared codes and prefixes learn to score items without their own rows, which
        calibrates the score of new items (``finetune.pseudo_new``; docs/method.md, "Cold-start
        items"). None: keep every row."""
        if pseudo_new is None or self.prefix is None or not self.prefix.with_out:
            return None
        return (~(self.item_specific_rows() & pseudo_new[:, None])).to(self.prefix.out_bias.dtype)

    def catalogue_logits(self, h: torch.Tensor, visible: torch.Tensor | None = None,
                         items: torch.Tensor | None = None, pseudo_new: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [M, H] -> logits [M, N] of every catalogue semantic ID (the catalogue head); of
        ``items`` only when given; the items flagged in ``pseudo_new`` [N] scored as new
        (:meth:`pseudo_new_keep`; training only)."""
        vec, bias = self.item_vectors(self.pseudo_new_keep(pseudo_new), items)
        return self._shift(F.linear(self.out_transform(h), vec, bias), visible, items)  # one fused addmm

    def id_logits(self, h: torch.Tensor, visible: torch.Tensor | None = None,
                  items: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [M, H] -> item logits [M, N] of the item-ID head (hybrid only, tied to the item-ID
        embedding); of ``items`` only when given."""
        assert self.item_emb is not None and self.item_bias is not None
        emb, bias = self.item_emb.weight[1 : self.num_items + 1], self.item_bias
        if items is not None:
            emb, bias = emb[items], bias[items]
        return self._shift(F.linear(self.out_transform(h), emb, bias), visible, items)

    def _shift(self, logits: torch.Tensor, visible: torch.Tensor | None,
               items: torch.Tensor | None = None) -> torch.Tensor:
        """Add the repeat and prefix biases of the items visible in each row (``visible`` [M, L]);
        ``logits`` are of ``items`` only when given."""
        if visible is None:
            return logits
        if self.repeat_weight is not None:
            logits = logits + self.repeat_weight * self.seen_items(visible, items)
        if self.prefix_raw is not None:
            logits = logits + self.seen_prefixes(visible, items)
        return logits

    def item_logits(self, h: torch.Tensor, visible: torch.Tensor | None = None,
                    items: torch.Tensor | None = None, pseudo_new: torch.Tensor | None = None) -> torch.Tensor:
        """The item softmax that the repeat/prefix biases shift: the ID head if any, else the catalogue
        head (over ``items`` only when given; ``pseudo_new``: see :meth:`catalogue_logits`)."""
        if self.id_head:
            return self.id_logits(h, visible, items)
        return self.catalogue_logits(h, visible, items, pseudo_new)

    def seen_prefixes(self, visible: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[M, L] tokens -> [M, N]: sum over l of prefix_weight[l] * (item shares its first l + 1
        codes with a visible item); [M, len(items)] for ``items`` only when given."""
        w = self.prefix_raw * REPEAT_SCALE
        out = torch.zeros(len(visible), self.num_items if items is None else len(items), device=visible.device)
        for level in range(self.K - 1):
            out = out + w[level] * self._seen_groups(visible, self.prefix_ids[level], self.prefix_counts[level], items)
        return out

    def _seen_groups(self, visible: torch.Tensor, group: torch.Tensor, groups: int,
                     items: torch.Tensor | None = None) -> torch.Tensor:
        """[M, L] tokens -> [M, N] indicator of the items whose group (``group`` [N] in [0, groups))
        is the group of a visible item: one scatter into [M, groups] and one gather. With ``items``
        [C]: [M, C] for those items, scattered into their distinct groups only (no [M, N] work)."""
        real = (visible > 0) & (visible <= self.num_items)  # not padding (0) or [MASK] (N+1)
        item = (visible - 1).clamp(0, self.num_items - 1)
        if items is None:
            seen = torch.zeros(len(visible), groups + 1, device=visible.device)  # column `groups`: not an item
            seen.scatter_(1, torch.where(real, group[item], groups), 1.0)
            return seen[:, group]
        wanted, column = torch.unique(group[items], return_inverse=True)  # the candidates' groups, sorted
        mine = group[item]  # [M, L]
        pos = torch.searchsorted(wanted, mine).clamp(max=len(wanted) - 1)
        hit = real & (wanted[pos] == mine)  # a visible item whose group some candidate has
        seen = torch.zeros(len(visible), len(wanted) + 1, device=visible.device)  # last column: no candidate's
        seen.scatter_(1, torch.where(hit, pos, len(wanted)), 1.0)
        return seen[:, column]

    @property
    def prefix_weight(self) -> torch.Tensor | None:
        """Learned logit shifts [K-1] of items sharing their first 1..K-1 codes with a sequence item."""
        return None if self.prefix_raw is None else self.prefix_raw * REPEAT_SCALE

    @property
    def repeat_weight(self) -> torch.Tensor | None:
        """The learned logit shift of items already in the sequence (None without ``repeat_bias``)."""
        return None if self.repeat_raw is None else self.repeat_raw * REPEAT_SCALE

    def seen_items(self, visible: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[M, L] tokens -> [M, N] float indicator of the catalogue items among them ([M, len(items)]
        for ``items`` only when given)."""
        return self._seen_groups(visible, torch.arange(self.num_items, device=visible.device), self.num_items, items)

    def masked_loss(self, tokens: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0,
                    norm: float | None = None, keep: torch.Tensor | None = None,
                    pseudo_new: torch.Tensor | None = None, candidates: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. (11): cross-entropy of the semantic IDs of the masked items.

        ``tokens`` [B, L] are the original (unmasked) item tokens, ``mask`` [B, L] bool. The loss
        is ``code_loss_weight`` x the per-level code cross-entropy, plus the cross-entropy of the
        item softmax (the catalogue head's semantic IDs, or the hybrid's item-ID head).
        ``label_smoothing`` applies to that item softmax only; the code targets stay one-hot.
        ``norm``: divide the summed cross-entropies by this count of masked positions instead of
        taking their mean (data parallelism: the global count over the number of workers).
        ``keep``: the batch's :func:`masked_positions` computed ahead (the batch builder does it on
        the host, so the step has no data-dependent shape and never waits for the device); then
        ``tokens`` and ``mask`` are the trimmed ones it returned.
        ``pseudo_new``: [N] bool items the catalogue softmax scores as new in this step
        (``finetune.pseudo_new``; :meth:`pseudo_new_keep`).
        ``candidates``: sorted 0-based items of this step's sampled softmax (``negatives: sampled``;
        they must hold every masked target), in place of the training candidates.
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if label_smoothing and not self.item_softmax:
            raise ValueError("label_smoothing smooths an item softmax: it needs head='catalogue' or "
                             "item_id='input_and_head'")
        if keep is None:
            tokens, mask, keep = masked_positions(tokens, mask, self.ROW_MULTIPLE)
        L = tokens.shape[1]
        inp = tokens.masked_fill(mask, self.mask_token)
        real = mask.reshape(-1).index_select(0, keep)  # which kept rows are masked (the rest round the count)
        items = torch.where(real, tokens.reshape(-1).index_select(0, keep) - 1, IGNORE)  # [M'] 0-based, or IGNORE
        h = self(inp, keep=keep)  # [M', H]
        logs: dict[str, torch.Tensor] = {}
        loss = h.new_zeros(())
        if self.code_loss_weight > 0 or not self.item_softmax:
            targets = self.codes[items.clamp(min=0)].masked_fill(~real[:, None], IGNORE)
            code_loss = _ce(self.code_logits(h).reshape(-1, self.C), targets.reshape(-1),
                            None if norm is None else norm * self.K)
            loss = loss + (self.code_loss_weight if self.item_softmax else 1.0) * code_loss
            logs["code_loss"] = code_loss.detach()
        if self.item_softmax:
            biased = self.repeat_raw is not None or self.prefix_raw is not None
            visible = inp.index_select(0, keep // L) if biased else None  # the row each kept position sees
            if candidates is not None:  # a sampled softmax: the batch's targets and its drawn negatives
                logits = self.item_logits(h, visible, candidates, pseudo_new)
                pos = torch.searchsorted(candidates, items.clamp(min=0)).clamp(max=len(candidates) - 1)
                torch._assert_async((~real | (candidates[pos] == items)).all(),
                                    "sampled softmax: a masked target is not among the candidates")
                items = torch.where(real, pos, IGNORE)
            else:
                logits = self.item_logits(h, visible, self.train_candidates, pseudo_new)  # the items training contains
                if self.train_candidates is not None:
                    items = torch.where(real, self.candidate_index[items.clamp(min=0)], IGNORE)
            item_loss = _ce(logits, items, norm, label_smoothing)
            loss = loss + item_loss
            logs["id_loss" if self.id_head else "item_loss"] = item_loss.detach()
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
        h = self.last_hidden(inp)
        with _full_precision(h):
            h = h.float()
            return F.log_softmax(self.code_logits(h), dim=-1), h, inp

    def score_parts(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log P(semantic ID of each item | history) [B, N], log p(item) of the item-ID head [B, N] or None).

        The first part is the catalogue head's log-softmax over the catalogue's semantic IDs, or
        with ``head="levels"`` the sum over levels of log p_l(code_l of item).
        """
        inp = self.append_mask(history)
        h = self.last_hidden(inp)
        with _full_precision(h):  # the encoder may run in bf16; scores are ranked in fp32 (no ties from rounding)
            h = h.float()
            if self.head == "catalogue":
                codes = F.log_softmax(self.catalogue_logits(h, None if self.id_head else inp), dim=-1)
                if self.item_id == "none" and self.new_items == "backoff":
                    codes = self.new_item_scores(codes, inp)
                elif self.item_id == "none" and self.new_items == "mixture":
                    codes = self.mixture_scores(codes, inp)
            else:
                lp = F.log_softmax(self.code_logits(h), dim=-1)
                level = torch.arange(self.K, device=lp.device)
                codes = lp[:, level, self.codes].sum(-1)  # [B, N]
            ids = F.log_softmax(self.id_logits(h, inp), dim=-1) if self.id_head else None
        return codes, ids

    def new_item_scores(self, log_p: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, N] with every untrained item's log P(semantic ID | history) (``log_p``) replaced.

        An item no training row held never had its own semantic ID trained as a target, and the
        composed score ranks it below every trained item (docs/results.md, "Cold-start items").
        Its score backs off to trained items like it: ``(1 - w) * log(mean P of its peers) + w *
        log_p + offset``, with ``w = new_item_weight`` and ``offset = new_item_offset`` (chosen on
        valid; docs/method.md). Its peers are the trained items that share its first code, the
        coarsest level of the semantic ID (items of similar content), or with
        ``new_item_neighbours`` = k > 0 the k trained items nearest to it in content
        (:meth:`neighbour_log_share`). With ``new_item_peers_before_repeat`` the peers' log P is read
        with the learned repeat shift (``repeat_weight``, which lowers the history's own items) taken
        back off: a new item is not a repeat of the history items it resembles, so it inherits their
        P as the model puts it before that shift (a model without ``repeat_bias`` has no shift: the
        switch then changes nothing). With ``new_item_content`` = beta > 0 it adds ``beta *
        cos(content of the item, sum of the content of the history tokens)`` (``tokens`` [B, L]:
        the model's input; content from :meth:`set_item_content`), which orders the new items of
        one cluster by their content. Under the first-code rule an item whose first code no trained
        item has keeps ``log_p``; trained items are unchanged.
        """
        # [U] every untrained item (each has content neighbours), else those whose first code a trained item has
        new = self._untrained_slots()[0] if self.new_item_neighbours else self._untrained()
        if not new.numel():
            return log_p
        peers = self.neighbour_log_share if self.new_item_neighbours else self.cluster_log_share
        peer_p = log_p
        if self.new_item_peers_before_repeat and self.repeat_weight is not None:
            if tokens is None:
                raise ValueError("new_item_peers_before_repeat reads the history: pass the model's input tokens")
            peer_p = log_p - self.repeat_weight.to(log_p) * self.seen_items(tokens).to(log_p)
        share = peers(peer_p, new)  # [B, U]
        out = log_p.clone()
        out[:, new] = (1.0 - self.new_item_weight) * share + self.new_item_weight * log_p[:, new] + self.new_item_offset
        if self.new_item_content:
            out[:, new] += self.new_item_content * self.content_similarity(tokens, new)
        return out

    def mixture_scores(self, log_p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Scores [B, N] as log-probabilities of a two-part mixture (``new_items: mixture``; ours).

        The next item is new with probability pi = ``new_item_share``. A trained item i scores
        ``log(1 - pi) + log P(i | history, trained)`` (``log_p`` renormalised over the trained
        items); an untrained item j scores ``log pi + log q_j``, where q is a softmax over the
        untrained items not in the history (:meth:`new_item_log_probs`; one already in the history
        gets the lowest score). pi and q's weights are fitted on valid by likelihood
        (:func:`qbert.seqrec.new_items.fit_mixture`), not chosen by a ranking metric. ``tokens``
        [B, L]: the model's input (content from :meth:`set_item_content`).
        """
        new, _ = self._untrained_slots()
        if not new.numel():
            return log_p
        trained = self.trained_items
        out = log_p - torch.logsumexp(log_p[:, trained], dim=1, keepdim=True) + math.log1p(-self.new_item_share)
        out[:, new] = math.log(self.new_item_share) + self.new_item_log_probs(log_p, tokens, new)
        return out

    @property
    def new_item_weights(self) -> torch.Tensor:
        """[3] the mixture's weights of :meth:`new_item_features`: ``new_item_temperature``,
        ``new_item_recency``, ``new_item_cluster``."""
        return torch.tensor([self.new_item_temperature, self.new_item_recency, self.new_item_cluster])

    def new_item_log_probs(self, log_p: torch.Tensor, tokens: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """[B, U] the mixture's log q over the items ``new`` (0-based): a softmax of the weighted
        :meth:`new_item_features` over those not among ``tokens``' items; those get a floor far below."""
        feats, seen = self.new_item_features(log_p, tokens, new)
        logits = torch.einsum("k,kbu->bu", self.new_item_weights.to(feats), feats).masked_fill(seen, float("-inf"))
        out = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return torch.nan_to_num(out, nan=-1e4, neginf=-1e4)  # every new item seen: all at the floor

    def new_item_features(self, log_p: torch.Tensor, tokens: torch.Tensor,
                          new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([3, B, U] what the mixture's q reads of each item of ``new`` (0-based), [B, U] whether the
        item is among ``tokens``' items).

        The features: the cosine of the item's content to the history's (the sum of the content of
        ``tokens``' items), to the last history item's, and the log of the mean of ``log_p``'s
        probability over the trained items with its first code (the backoff rule's cluster share;
        over all trained items when none has it).
        """
        cos, seen = self.new_item_cosines(tokens, new)
        last = tokens[:, -2] if tokens.shape[1] > 1 else torch.zeros_like(tokens[:, 0])  # before the [MASK]
        cos_last = F.normalize(self.item_content[last], dim=1) @ self.item_content[new + 1].T
        return torch.stack([cos, cos_last, self.cluster_log_share(log_p, new)]), seen

    def cluster_log_share(self, log_p: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, len(items)] log of the mean probability (``log_p`` [B, N]) of the trained items that
        share each item's first code; over all trained items for an item whose first code none has."""
        trained = self.trained_items.to(log_p.dtype)
        p = log_p.exp() * trained
        group = self.codes[:, 0]
        mass = log_p.new_zeros(len(log_p), self.C).index_add_(1, group, p)
        count = log_p.new_zeros(self.C).index_add_(0, group, trained)
        fallback = p.sum(1, keepdim=True) / trained.sum().clamp(min=1)
        peers = count[group[items]]
        share = torch.where(peers > 0, mass[:, group[items]] / peers.clamp(min=1), fallback)
        return torch.log(share.clamp(min=1e-30))

    def neighbour_log_share(self, log_p: torch.Tensor, items: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
        """[B, len(items)] log of the mean probability (``log_p`` [B, N]) of each item's
        ``new_item_neighbours`` nearest trained items in content (:meth:`content_neighbours`): the
        model's prediction for the trained items most like it, where :meth:`cluster_log_share`
        takes those sharing its first code (as it does for an item without content). Computed over
        the items in parts of at most ``budget`` gathered values ([B, part, k])."""
        nbr = self.content_neighbours(items)  # [U, k], k >= 1
        k = nbr.shape[1]
        part = max(1, budget // max(len(log_p) * k, 1))
        out = torch.cat([torch.logsumexp(log_p[:, rows], dim=-1) for rows in nbr.split(part)], dim=1) - math.log(k)
        blank = self._neighbours_blank  # items without content (set by content_neighbours): no neighbours
        if blank.any():
            out[:, blank] = self.cluster_log_share(log_p, items[blank])
        return out

    def content_neighbours(self, items: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """[len(items), k] the k = ``new_item_neighbours`` trained items (0-based) whose content is
        nearest (cosine) to each item's (content from :meth:`set_item_content`); fewer when fewer are
        trained. Cached per record of trained items, catalogue, content, k and ``items``, with which
        of ``items`` have no content (an all-zero vector; :meth:`neighbour_log_share` backs those off
        to their first code)."""
        if self.item_content is None:
            raise ValueError("new_item_neighbours > 0 backs off to content neighbours: set_item_content first "
                             "(qbert.pipeline.data.target_content)")
        key = (self.trained_items.data_ptr(), self.trained_items._version, self.codes.data_ptr(),
               self.item_content.data_ptr(), self.item_content._version, self.new_item_neighbours,
               items.data_ptr(), items.numel())
        if getattr(self, "_neighbours_key", None) != key:
            trained = torch.nonzero(self.trained_items)[:, 0]
            if not trained.numel():
                raise ValueError("new_item_neighbours > 0 backs off to trained items: no item was trained")
            k = min(self.new_item_neighbours, trained.numel())
            pool = self.item_content[trained + 1]  # [T, D] unit vectors
            best = [torch.topk(self.item_content[part + 1] @ pool.T, k, dim=1).indices
                    for part in items.split(chunk)]  # [<=chunk, k] each: no [U, T] matrix at once beyond a chunk
            self._neighbours_cache = trained[torch.cat(best)] if best else items.new_zeros(0, k)
            self._neighbours_blank = self.item_content[items + 1].abs().sum(1) == 0  # [U] no content
            self._neighbours_key = key
        return self._neighbours_cache

    def new_item_cosines(self, tokens: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, U] content cosine of each item of ``new`` (0-based) to the history ``tokens`` [B, L],
        [B, U] whether the item is among the tokens)."""
        cos = self.content_similarity(tokens, new)
        all_new, slot = self._untrained_slots()
        if not torch.equal(new, all_new):  # another set of items than the untrained ones (not cached)
            slot = torch.full((self.num_items + 2,), -1, dtype=torch.long, device=tokens.device)
            slot[new + 1] = torch.arange(new.numel(), device=tokens.device)
        where = slot[tokens]  # [B, L] the column of each token's item among ``new``, -1 for the rest
        seen = torch.zeros_like(cos).scatter_add_(1, where.clamp(min=0), (where >= 0).to(cos.dtype)) > 0
        return cos, seen

    def content_similarity(self, tokens: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        """[B, len(items)] cosine of each item's content to the sum of the content of ``tokens``' items."""
        if self.item_content is None or tokens is None:
            raise ValueError("new_item_content > 0 ranks new items by their content: set_item_content first "
                             "(qbert.pipeline.data.target_content)")
        # [B, D] without a [B, L, D] gather; the padding and [MASK] rows are 0
        profile = F.normalize(F.embedding_bag(tokens, self.item_content, mode="sum"), dim=1)
        return profile @ self.item_content[items + 1].T

    def _untrained_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every untrained item, 0-based; [N + 2] its column among them by token, -1 for the other
        tokens), cached per ``trained_items`` record like :meth:`_untrained`."""
        key = (self.trained_items.data_ptr(), self.trained_items._version, self.codes.data_ptr())
        if getattr(self, "_slots_key", None) != key:
            new = torch.nonzero(~self.trained_items)[:, 0]
            slot = torch.full((self.num_items + 2,), -1, dtype=torch.long, device=new.device)
            slot[new + 1] = torch.arange(new.numel(), device=new.device)
            self._slots_cache, self._slots_key = (new, slot), key
        return self._slots_cache

    def _untrained(self) -> torch.Tensor:
        """Indices of the untrained items whose first code some trained item has (cached per
        ``trained_items`` record, so ranking reads it from the device once, not per batch)."""
        key = (self.trained_items.data_ptr(), self.trained_items._version, self.codes.data_ptr())
        if getattr(self, "_untrained_key", None) != key:
            peers = torch.zeros(self.C, dtype=torch.bool, device=self.codes.device)
            peers[self.codes[:, 0][self.trained_items]] = True
            self._untrained_cache = torch.nonzero(~self.trained_items & peers[self.codes[:, 0]])[:, 0]
            self._untrained_key = key
        return self._untrained_cache

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """Full-ranking scores [B, N]: log P(semantic ID | history); the hybrid adds log p(item) with
        the semantic-ID term weighted by ``code_score_weight``."""
        codes, ids = self.score_parts(history)
        return codes if ids is None else self.code_score_weight * codes + ids


def reduce_content(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, D] content vectors -> [N, dim]: through a fixed random Gaussian projection (the same for
    every catalogue of the same D, so a trained map reads new items as it read the old) when D >
    dim, else zero-padded; scaled so unit vectors stay about unit length."""
    n, d = x.shape
    if d <= dim:
        return F.pad(x, (0, dim - d))
    g = torch.Generator().manual_seed(d * 7919 + dim)
    return x @ (torch.randn(d, dim, generator=g) / dim**0.5)


_LEGACY_PREFIX_KEYS = {"prefix_in.weight": "prefix.inp_table", "prefix_out": "prefix.out_table",
                       "prefix_out_bias": "prefix.out_bias_table"}


def upgrade_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict of this model written before the prefix tables were a module of their own
    (``prefix_in.weight`` [B + 1, H] with its padding row last, ``prefix_out``, ``prefix_out_bias``),
    with those keys under their current names; any other state dict unchanged."""
    if not any(k in state for k in _LEGACY_PREFIX_KEYS):
        return {prefix + k: v for k, v in state.items()} if prefix else dict(state)
    out = {}
    for k, v in state.items():
        if k in _LEGACY_PREFIX_KEYS:
            out[prefix + _LEGACY_PREFIX_KEYS[k]] = v[:-1] if k == "prefix_in.weight" else v  # drop the padding row
        else:
            out[prefix + k] = v
    return out


def _upgrade_in_place(state: dict[str, torch.Tensor], prefix: str, *args) -> None:  # noqa: ANN002
    """``load_state_dict`` pre-hook: legacy prefix-table keys under ``prefix`` renamed in place."""
    legacy = {k: state.pop(prefix + k) for k in _LEGACY_PREFIX_KEYS if prefix + k in state}
    state.update(upgrade_state_dict(legacy, prefix))


def _ce(logits: torch.Tensor, targets: torch.Tensor, norm: float | None,
        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the targets that are not ``IGNORE``: their mean, or their sum / ``norm``."""
    if norm is None:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=IGNORE)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=IGNORE,
                           reduction="sum") / norm


def masked_positions(tokens: torch.Tensor, mask: torch.Tensor, multiple: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, mask trimmed of all-padding leading columns, flat long indices into the trimmed
    ``[B * L]`` of the masked positions plus the first others that round their count to a
    multiple of ``multiple``). Checks that no padding is masked. Data-dependent shapes: call it
    where the tensors live on the host (the batch builder), not inside a device step."""
    if bool((mask & (tokens == PAD)).any()):
        raise ValueError("mask covers padding positions")
    width = trim_left_padding(tokens).shape[1]  # columns that are padding in every row do no work
    tokens, mask = tokens[:, tokens.shape[1] - width :], mask[:, mask.shape[1] - width :]
    return tokens, mask, _pad_rows(mask, multiple).reshape(-1).nonzero()[:, 0]


def _pad_rows(mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """``mask`` [B, L] plus the first unmasked positions (row-major) needed to make its count a
    multiple of ``multiple`` (all positions when there are not enough)."""
    m = int(mask.sum())
    extra = min(-m % multiple, mask.numel() - m)
    if extra == 0:
        return mask
    rank = torch.cumsum((~mask).reshape(-1).int(), 0).view_as(mask)  # 1-based order of the unmasked
    return mask | (~mask & (rank <= extra))


def _bag(rows: torch.Tensor, table: torch.Tensor, padding_idx: int | None = None,
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """[..., n] row indices -> [..., H]: the sum of those rows of ``table`` [R, H] (an embedding bag;
    ``padding_idx`` rows count as zero; ``weights`` [..., n]: a weighted sum)."""
    if weights is not None:
        weights = weights.reshape(-1, rows.shape[-1])
    out = F.embedding_bag(rows.reshape(-1, rows.shape[-1]), table, mode="sum", padding_idx=padding_idx,
                          per_sample_weights=weights)
    return out.view(*rows.shape[:-1], table.shape[1])


def _full_precision(x: torch.Tensor) -> torch.autocast:
    """A region where autocast (if any) is off: ranking scores are computed in fp32."""
    return torch.autocast(x.device.type, enabled=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
