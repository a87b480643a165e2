"""Leave-one-out split: hand-checked small cases and equality with the shipped Instruments split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qbert.data import LeaveOneOutSplit, from_sequences
from qbert.data.readers import read_mql4grec

PAD = -1  # item 0 is a real item, so compare with a pad that is not


def test_small_case_by_hand():
    ds = from_sequences("t", [[5, 1, 2, 3], [4, 4, 0]], num_items=6)
    sp = LeaveOneOutSplit(ds, max_len=2)
    assert sp.targets("test").tolist() == [3, 0]
    assert sp.targets("valid").tolist() == [2, 4]
    assert sp.history("test", pad=PAD).tolist() == [[1, 2], [4, 4]]
    assert sp.history("valid", pad=PAD).tolist() == [[5, 1], [PAD, 4]]
    hist, tgt = sp.train_windows(pad=PAD)
    assert hist.tolist() == [[PAD, 5]] and tgt.tolist() == [1]
    assert sp.train_sequences(pad=PAD, max_len=3).tolist() == [[PAD, 5, 1], [PAD, PAD, 4]]
    assert sp.history("test", pad=0, shift=1).tolist() == [[2, 3], [5, 5]]


def _read_inter(path: Path) -> list[tuple[int, tuple[int, ...], int]]:
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    rows = []
    for line in lines[1:]:
        u, hist, t = line.split("\t")
        rows.append((int(u), tuple(int(x) for x in hist.split()), int(t)))
    return rows


def _rows(hist: np.ndarray, targets: np.ndarray, users: np.ndarray) -> list[tuple[int, tuple[int, ...], int]]:
    return [(int(u), tuple(int(x) for x in h[h != PAD]), int(t)) for u, h, t in zip(users, hist, targets)]


@pytest.fixture(scope="module")
def instruments_split(request):
    try:
        from conftest import shared_dataset
    except ImportError:  # tests/ imported as a package
        from tests.conftest import shared_dataset

    path = shared_dataset("amazon-instruments")
    return path, LeaveOneOutSplit(read_mql4grec(path), max_len=50)


@pytest.mark.shared
@pytest.mark.parametrize("which", ["test", "valid"])
def test_instruments_eval_split_equals_shipped_file(instruments_split, which):
    path, sp = instruments_split
    shipped = _read_inter(path / f"Instruments.{which}.inter")
    users = np.arange(sp.num_users)
    ours = _rows(sp.history(which, pad=PAD), sp.targets(which), users)
    assert len(shipped) == sp.num_users == 17112
    assert ours == sorted(shipped)  # one row per user, user u is row u


@pytest.mark.shared
def test_instruments_train_windows_equal_shipped_rows(instruments_split):
    path, sp = instruments_split
    hist, tgt = sp.train_windows(pad=PAD)
    owner = np.searchsorted(sp.dataset.seq_offsets, sp.train_target_positions(), side="right") - 1
    shipped = _read_inter(path / "Instruments.train.inter")
    assert len(shipped) == len(tgt)
    assert Counter(_rows(hist, tgt, owner)) == Counter(shipped)
