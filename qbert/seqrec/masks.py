"""Masking strategies for masked-item training over left-padded item sequences.

Every function takes a padding mask ``valid`` [B, L] (True where a real item sits; sequences
are left-padded, so the real items of a row are its last ``len`` columns) and returns a bool
mask [B, L] of positions to hide. All are vectorised over the batch, never mask padding, and
give every row with at least one item at least one masked position (a row with nothing
masked would contribute no loss and waste its slot in the batch).

Pretraining (paper Sec. 3.6) draws one of three strategies per row:

- ``span``: one contiguous span of ``round(ratio * len)`` items (ratio 0.3) at a uniformly
  random offset -- forces recovering a whole stretch from the context around it;
- ``multi`` (multi-region / multi-position): ``round(ratio * len)`` scattered positions drawn
  without replacement (ratio 0.15);
- ``tail``: the last ``round(ratio * len)`` items (ratio 0.1) -- the next-item situation of
  inference.

Fine-tuning uses the standard Bernoulli mask (ratio 0.3) and, with probability
``last_prob`` per row, also masks the row's last item, so training sees the inference
pattern ([MASK] at the end) while still learning from the rest of the sequence.
"""

from __future__ import annotations

import torch

STRATEGIES = ("span", "multi", "tail")


def _lengths(valid: torch.Tensor) -> torch.Tensor:
    return valid.sum(dim=1)


def _count(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """Number of positions to mask per row: round(ratio * len), at least 1, at most len."""
    n = torch.round(lengths.float() * ratio).long()
    return torch.minimum(n.clamp(min=1), lengths)


def ensure_one(mask: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add one uniformly chosen real position to every non-empty row that has no mask."""
    empty = ~mask.any(dim=1) & valid.any(dim=1)
    if not bool(empty.any()):
        return mask
    keys = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, -1.0)
    pick = keys.argmax(dim=1)
    extra = torch.zeros_like(mask)
    extra[torch.arange(len(mask), device=mask.device), pick] = True
    return mask | (extra & empty.unsqueeze(1))


def random_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(ratio) over real positions (BERT4Rec's cloze mask)."""
    mask = (torch.rand(valid.shape, generator=generator, device=valid.device) < ratio) & valid
    return ensure_one(mask, valid, generator)


def span_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One contiguous span of round(ratio * len) real items per row, at a random offset."""
    L = valid.shape[1]
    lengths = _lengths(valid)
    n = _count(lengths, ratio)
    first_real = L - lengths
    room = (lengths - n + 1).clamp(min=1)
    start = first_real + (torch.rand(len(valid), generator=generator, device=valid.device) * room).long().clamp(max=room - 1)
    cols = torch.arange(L, device=valid.device).unsqueeze(0)
    return (cols >= start.unsqueeze(1)) & (cols < (start + n).unsqueeze(1)) & valid


def multi_region_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """round(ratio * len) scattered real positions per row, without replacement."""
    lengths = _lengths(valid)
    n = _count(lengths, ratio)
    keys = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, 2.0)
    order = keys.argsort(dim=1).argsort(dim=1)  # rank of each position among the row's keys
    return (order < n.unsqueeze(1)) & valid


def tail_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The last round(ratio * len) real items of each row (at least the very last one)."""
    L = valid.shape[1]
    n = _count(_lengths(valid), ratio)
    cols = torch.arange(L, device=valid.device).unsqueeze(0)
    return (cols >= (L - n).unsqueeze(1)) & valid


def last_mask(valid: torch.Tensor) -> torch.Tensor:
    """Only the last column (the newest item of a left-padded row)."""
    mask = torch.zeros_like(valid)
    mask[:, -1] = True
    return mask & valid


def multi_mask(valid: torch.Tensor, probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
               ratios: tuple[float, float, float] = (0.3, 0.15, 0.1),
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Jointly sampled span / multi-region / tail masks: each row draws one strategy.

    Returns (mask [B, L], strategy index [B] into :data:`STRATEGIES`).
    """
    p = torch.as_tensor(probs, dtype=torch.float)
    if p.numel() != 3 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f"multi_mask probs must be 3 non-negative weights with a positive sum, got {probs}")
    choice = torch.multinomial(p / p.sum(), len(valid), replacement=True, generator=generator).to(valid.device)
    masks = torch.stack([
        span_mask(valid, ratios[0], generator),
        multi_region_mask(valid, ratios[1], generator),
        tail_mask(valid, ratios[2], generator),
    ])  # [3, B, L]
    mask = masks.gather(0, choice.view(1, -1, 1).expand(1, *valid.shape)).squeeze(0)
    return mask, choice


def finetune_mask(valid: torch.Tensor, ratio: float = 0.3, last_prob: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random mask plus, for a ``last_prob`` share of rows, the last item as well."""
    mask = random_mask(valid, ratio, generator)
    if last_prob > 0:
        rows = torch.rand(len(valid), generator=generator, device=valid.device) < last_prob
        mask = mask | (last_mask(valid) & rows.unsqueeze(1))
    return mask
