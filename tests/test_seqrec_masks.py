"""Masking strategies of stage 3: ratios, shapes of the masked regions, padding, >= 1 mask."""

from __future__ import annotations

import pytest
import torch

from qbert.seqrec import masks


def _valid(B: int = 4000, L: int = 50, min_len: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, L + 1, (B,), generator=g)
    return torch.arange(L)[None, :] >= (L - lengths)[:, None]  # left-padded


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn, ratio", [(masks.span_mask, 0.3), (masks.multi_region_mask, 0.15),
                                       (masks.tail_mask, 0.1), (masks.random_mask, 0.3)])
def test_ratio_padding_and_at_least_one(fn, ratio):
    valid = _valid(min_len=20)
    m = fn(valid, ratio, _gen())
    assert m.shape == valid.shape and m.dtype == torch.bool
    assert not (m & ~valid).any(), "padding must never be masked"
    assert m.any(dim=1).all(), "every sequence needs a masked position"
    share = m.sum().item() / valid.sum().item()
    assert abs(share - ratio) < 0.02, f"{fn.__name__}: masked share {share:.3f}, expected ~{ratio}"


def test_short_sequences_still_get_one_mask_and_no_padding():
    valid = _valid(B=500, L=10, min_len=1)
    for fn, r in [(masks.span_mask, 0.3), (masks.multi_region_mask, 0.15), (masks.tail_mask, 0.1),
                  (masks.random_mask, 0.3)]:
        m = fn(valid, r, _gen(2))
        assert m.any(1).all() and not (m & ~valid).any()
    m, _ = masks.multi_mask(valid, generator=_gen(3))
    assert m.any(1).all() and not (m & ~valid).any()


def test_span_is_one_contiguous_run_of_the_right_length():
    valid = _valid(B=2000, L=30, min_len=1)
    m = masks.span_mask(valid, 0.3, _gen())
    starts = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0].long()
    assert (starts == 1).all(), "exactly one contiguous span per row"
    lengths = valid.sum(1)
    expected = torch.round(lengths.float() * 0.3).long().clamp(min=1)
    assert torch.equal(m.sum(1), expected)
    # the span is placed at varying offsets, not always at the end
    assert (~m[:, -1]).float().mean() > 0.3


def test_tail_masks_the_last_items():
    valid = _valid(B=1000, L=40, min_len=1)
    m = masks.tail_mask(valid, 0.1, _gen())
    n = m.sum(1)
    assert m[:, -1].all(), "the newest item is always part of the tail"
    cols = torch.arange(40)[None, :]
    assert torch.equal(m, cols >= (40 - n)[:, None])


def test_multi_region_masks_scattered_positions():
    valid = _valid(B=1000, L=50, min_len=40)
    m = masks.multi_region_mask(valid, 0.15, _gen())
    runs = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0].long()
    assert runs.float().mean() > 3, "positions should be scattered, not one block"
    # every real position is equally likely to be chosen
    per_col = m[:, 10:].float().mean(0)
    assert per_col.min() > 0.08 and per_col.max() < 0.22


def test_multi_mask_samples_each_strategy_per_row():
    valid = _valid(B=3000, L=50, min_len=30)
    m, choice = masks.multi_mask(valid, (0.5, 0.3, 0.2), generator=_gen())
    share = torch.bincount(choice, minlength=3).float() / len(choice)
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    for idx, (fn, r) in enumerate([(masks.span_mask, 0.3), (masks.multi_region_mask, 0.15), (masks.tail_mask, 0.1)]):
        rows = choice == idx
        got = m[rows].sum().item() / valid[rows].sum().item()
        assert abs(got - r) < 0.02
    tail_rows = choice == 2
    assert m[tail_rows, -1].all()
    with pytest.raises(ValueError):
        masks.multi_mask(valid, (0.0, 0.0, 0.0))


def test_finetune_mask_adds_last_position_for_a_share_of_rows():
    valid = _valid(B=4000, L=50, min_len=20)
    never = masks.finetune_mask(valid, 0.3, last_prob=0.0, generator=_gen())
    always = masks.finetune_mask(valid, 0.3, last_prob=1.0, generator=_gen())
    half = masks.finetune_mask(valid, 0.3, last_prob=0.5, generator=_gen())
    assert always[:, -1].all()
    assert abs(never[:, -1].float().mean().item() - 0.3) < 0.03
    assert abs(half[:, -1].float().mean().item() - (0.5 + 0.5 * 0.3)) < 0.03
    assert not (half & ~valid).any()


def test_same_generator_seed_gives_same_mask():
    valid = _valid(B=64, L=20)
    a, _ = masks.multi_mask(valid, generator=_gen(7))
    b, _ = masks.multi_mask(valid, generator=_gen(7))
    assert torch.equal(a, b)
