"""The cold-start protocol (#19): "new" items never reach any training or pretraining input or
target; stages 1-2 still see their content; valid/test stay the real ones; every run reports the
new-target and known-target slices of one evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.baselines import BaselineConfig, run_baseline
from qbert.data.split import ColdStartConfig, LeaveOneOutSplit, cold_start_items
from qbert.data.synthetic import make_synthetic
from qbert.pipeline import load_data, load_run_model, pretraining_rows, run_pipeline
from qbert.seqrec.batching import masked_item_rows, next_item_rows
from qbert.seqrec.stage import training_rows
from test_pipeline import tiny

pytestmark = pytest.mark.timeout(600)


def test_withheld_items_never_reach_a_training_view_and_evaluation_is_unchanged():
    cfg = tiny()
    ds = make_synthetic(cfg.data.synthetic)
    split = LeaveOneOutSplit(ds, 15)
    new = cold_start_items(ds.num_items, 0.2, seed=3)
    assert len(new) == 30 and np.array_equal(new, cold_start_items(ds.num_items, 0.2, seed=3))
    cold = split.withhold(new)
    tokens = {"prefix rows": training_rows(cold, 15, True), "sequences": cold.train_sequences(0, 1),
              "windows": cold.train_windows(0, 1)[0], "masked": masked_item_rows(cold, "windows"),
              "next": next_item_rows(cold, "positions")[0]}
    for name, rows in tokens.items():
        assert not np.isin(rows[rows > 0] - 1, new).any(), name
    assert not np.isin(cold.train_windows(0, 1)[1], new).any()
    # exactly the training part minus the new items, in order, per user
    for u in (0, 5, 17):
        real = ds.seq_items[split.train_start[u]:split.train_end[u]]
        assert list(cold.train_items[cold.train_start[u]:cold.train_end[u]]) == [i for i in real if i not in set(new)]
    for which in ("valid", "test"):
        assert np.array_equal(cold.history(which, 0, 1), split.history(which, 0, 1))
        assert np.array_equal(cold.targets(which), split.targets(which))
    assert ColdStartConfig().apply(split) is split


def test_pipeline_and_baseline_report_new_and_known_slices(tmp_path):
    cfg = tiny(**{"data.cold_start.fraction": 0.15, "data.cold_start.seed": 1, "plots": False,
                  "pretrain.epochs": 1, "finetune.epochs": 3})
    data = load_data(cfg)
    new = cold_start_items(data.target.num_items, 0.15, 1)
    rows = pretraining_rows(cfg, data)
    assert not np.isin(rows[rows > 0] - 1, new).any()
    metrics = run_pipeline(cfg, tmp_path / "qb")
    cs = metrics["cold_start"]
    assert cs["new_items"] == len(new)
    test = cs["slices"]["test"]["history_kept"]
    n_new = int(np.isin(LeaveOneOutSplit(data.target, 15).targets("test"), new).sum())
    assert test["new"]["users"] == n_new > 0 and test["new"]["users"] + test["known"]["users"] == data.target.num_users
    assert 0.0 <= test["new"]["HR@10"] <= 1.0
    # fine-tuning records which items it trained; the model ranks the others by backing off (model.new_items)
    assert metrics["stages"]["finetune"]["untrained_items"] >= len(new)
    model, _ = load_run_model(tmp_path / "qb")
    assert not model.trained_items[torch.as_tensor(new)].any()
    assert int((~model.trained_items).sum()) == metrics["stages"]["finetune"]["untrained_items"]
    base = run_baseline(BaselineConfig(model="sasrec", epochs=2, patience=0, progress=False,
                                       cold_start=ColdStartConfig(fraction=0.15, seed=1)),
                        data.target, tmp_path / "sas")
    assert base["cold_start"]["slices"]["test"]["history_kept"]["new"]["users"] == n_new
    assert (tmp_path / "sas" / "test_ranks.parquet").is_file()


def test_the_training_softmax_over_seen_items_is_the_cross_entropy_over_their_columns():
    import torch
    import torch.nn.functional as F

    from qbert.seqrec import masks
    from qbert.seqrec.qbert4rec import QBert4Rec

    torch.manual_seed(0)
    codes = torch.randint(0, 8, (30, 3), generator=torch.Generator().manual_seed(1))
    m = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10, repeat_bias=True,
                  code_loss_weight=0.0).eval()
    tok = torch.randint(1, 21, (5, 10), generator=torch.Generator().manual_seed(2))  # items 0..19 only
    mask = masks.random_mask(tok != 0, 0.4, torch.Generator().manual_seed(3))
    seen = torch.arange(20)
    m.set_train_candidates(seen)
    loss, _ = m.masked_loss(tok, mask)
    inp = tok.masked_fill(mask, m.mask_token)
    full = m.item_logits(m(inp)[mask], inp[mask.nonzero()[:, 0]])  # [M, 30]
    torch.testing.assert_close(loss, F.cross_entropy(full[:, :20], tok[mask] - 1))
    m.set_train_candidates(torch.arange(30))  # every item seen: the plain softmax
    assert m.train_candidates is None
