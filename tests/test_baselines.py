"""SASRec / BERT4Rec baselines: training rows, layers, learning on planted data, CLI and reload."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from qbert.baselines import BaselineConfig, build_model, evaluate_model, run_baseline
from qbert.cli import main as cli_main
from qbert.config import ConfigError
from qbert.data import LeaveOneOutSplit, from_sequences
from qbert.eval import METRIC_NAMES, evaluate_ranking
from qbert.seqrec.batching import batch_indices, masked_item_rows, next_item_rows
from qbert.seqrec.bert4rec import mask_items
from qbert.seqrec.layers import TransformerEncoder, trim_left_padding


def planted_dataset(users: int = 240, items: int = 60, routes: int = 4, seed: int = 0, min_len: int = 6,
                    max_len: int = 14, noise: float = 0.05):
    """Users walk a cycle through one of ``routes`` disjoint item groups from a random start.

    The next item is determined by the last one (up to ``noise``), while popularity is near
    uniform, so a sequential model must beat a popularity ranking by a wide margin.
    """
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(items), routes)
    seqs = []
    for _ in range(users):
        route = groups[rng.integers(routes)]
        start = rng.integers(len(route))
        n = rng.integers(min_len, max_len + 1)
        s = route[(start + np.arange(n)) % len(route)].copy()
        flip = rng.random(n) < noise
        s[flip] = rng.integers(0, items, size=int(flip.sum()))
        seqs.append(s)
    return from_sequences("planted", seqs, items)


def popularity_metrics(split: LeaveOneOutSplit, which: str = "test") -> dict[str, float]:
    ds = split.dataset
    train_pos = np.concatenate([np.arange(s, e) for s, e in zip(split.user_start, split.train_end)])
    counts = torch.as_tensor(np.bincount(ds.seq_items[train_pos], minlength=ds.num_items), dtype=torch.float)
    hist = split.history(which)
    return evaluate_ranking(lambda h: counts.expand(len(h), -1), hist, split.targets(which), ds.num_items)


SMALL = dict(hidden=32, layers=2, heads=2, inner=64, dropout=0.1, attn_dropout=0.1, max_len=16, batch_size=16,
             lr=5e-3, patience=0, progress=False, num_threads=1)


# ----------------------------------------------------------------------------- training rows
@pytest.mark.parametrize("max_len", [3, 5, 50])
def test_next_item_rows_cover_exactly_the_prefix_targets(max_len: int) -> None:
    ds = planted_dataset(users=30, seed=1)
    split = LeaveOneOutSplit(ds, max_len=max_len)
    hist, tgt = split.train_windows(pad=0, shift=1)
    # every (user context end, target) pair of RecBole's rows, as a multiset of (last input, target)
    expected = Counter(zip(hist[:, -1].tolist(), tgt.tolist()))
    for mode in ("positions", "windows"):
        inp, targets = next_item_rows(split, mode)
        sel = targets >= 0
        assert int(sel.sum()) == len(tgt)
        got = Counter(zip(inp[sel].tolist(), targets[sel].tolist()))
        assert got == expected, mode
        assert inp.shape[1] == max_len


def test_positions_rows_are_causal_prefixes() -> None:
    """In 'positions' mode, the input left of each target is exactly the user's preceding items."""
    ds = from_sequences("t", [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]], 10)
    split = LeaveOneOutSplit(ds, max_len=3)
    inp, tgt = next_item_rows(split, "positions")
    # user 0 training part = 0..4 (targets 1..4), user 1 training part = [7] (no target)
    rows = {tuple(r) for r in inp.tolist()}
    assert rows == {(2, 3, 4), (0, 0, 1)}  # tokens are items + 1, chunks of max_len inputs
    assert sorted(tgt[tgt >= 0].tolist()) == [1, 2, 3, 4]


def test_masked_item_rows_hold_every_training_item_once() -> None:
    ds = planted_dataset(users=25, seed=2)
    split = LeaveOneOutSplit(ds, max_len=4)
    rows = masked_item_rows(split)
    got = Counter((rows[rows > 0] - 1).tolist())
    want = Counter(np.concatenate([ds.seq_items[s:e] for s, e in zip(split.user_start, split.train_end)]).tolist())
    assert got == want


def test_masked_item_window_rows_are_prefix_plus_target() -> None:
    ds = planted_dataset(users=25, seed=3)
    split = LeaveOneOutSplit(ds, max_len=5)
    rows = masked_item_rows(split, "windows")
    hist, tgt = split.train_windows(pad=0, shift=1)
    assert np.array_equal(rows[:, -1], tgt + 1)
    assert np.array_equal(rows[:, :-1], hist[:, 1:])


def test_mask_items_masks_last_and_only_real() -> None:
    rows = np.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    inp, lab = mask_items(rows, mask_token=99, mask_prob=0.5, rng=np.random.default_rng(0))
    assert (inp[:, -1] == 99).all() and (lab[:, -1] == rows[:, -1] - 1).all()
    assert (inp[rows == 0] == 0).all() and (lab[rows == 0] == -1).all()
    assert ((inp == 99) == (lab >= 0)).all()
    assert (lab[lab >= 0] == rows[lab >= 0] - 1).all()


def test_batch_indices_is_a_permutation() -> None:
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    for bucket in (False, True):
        b = batch_indices(lengths, 64, np.random.default_rng(1), bucket=bucket, bucket_batches=4)
        allidx = np.concatenate(b)
        assert sorted(allidx.tolist()) == list(range(1000))
        assert max(len(x) for x in b) == 64
    spread = lambda bs: np.mean([lengths[x].max() - lengths[x].min() for x in bs])  # noqa: E731
    assert spread(batch_indices(lengths, 64, np.random.default_rng(1), bucket=True)) < \
        spread(batch_indices(lengths, 64, np.random.default_rng(1), bucket=False))


# ----------------------------------------------------------------------------- layers / models
@pytest.mark.parametrize("pre_ln", [False, True])
def test_causal_encoder_ignores_future_and_padding(pre_ln: bool) -> None:
    torch.manual_seed(0)
    enc = TransformerEncoder(2, 16, 2, 32, dropout=0.0, causal=True, pre_ln=pre_ln).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    y = enc(x, pad)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)  # change the future
    x2[0, :2] = torch.randn(2, 16)  # change padding content
    y2 = enc(x2, pad)
    assert torch.allclose(y[:, :4][~pad[:, :4]], y2[:, :4][~pad[:, :4]], atol=1e-5)
    assert not torch.allclose(y[:, 5], y2[:, 5])
    assert torch.isfinite(y).all()
    bi = TransformerEncoder(2, 16, 2, 32, dropout=0.0, causal=False, pre_ln=pre_ln).eval()
    assert not torch.allclose(bi(x, pad)[:, 3], bi(x2, pad)[:, 3])  # bidirectional sees the future


@pytest.mark.parametrize("kind", ["sasrec", "bert4rec"])
def test_trimming_padding_is_exact(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(BaselineConfig(model=kind, **{**SMALL, "max_len": 10}), 30).eval()
    hist = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 4, 5], [0, 0, 0, 0, 0, 1, 2, 3, 4]])
    if kind == "sasrec":
        hist = torch.cat([torch.zeros(2, 1, dtype=torch.long), hist], 1)
    full = model.item_logits(model.encode(torch.cat([hist, torch.full((2, 1), 31)], 1) if kind == "bert4rec" else hist)[:, -1])
    assert torch.allclose(model.score(hist), full, atol=1e-5)
    assert trim_left_padding(hist).shape[1] == 4
    assert model.score(hist).shape == (2, 30)


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", ["sasrec", "bert4rec"])
def test_baseline_beats_popularity(kind: str, tmp_path) -> None:
    ds = planted_dataset()
    # BERT4Rec learns the route order slower (a [MASK] carries no item; positions must be learned)
    over = {"epochs": 3} if kind == "sasrec" else {"epochs": 8, "lr": 1e-3}
    cfg = BaselineConfig(model=kind, **{**SMALL, **over})
    metrics = run_baseline(cfg, ds, tmp_path / kind)
    pop = popularity_metrics(LeaveOneOutSplit(ds, max_len=cfg.max_len))
    # popularity ~ random over 60 items; knowing the route alone (15 items) gives NDCG@10 ~ 0.3
    assert metrics["test"]["NDCG@10"] > max(3 * pop["NDCG@10"], pop["NDCG@10"] + 0.15), (metrics["test"], pop)
    assert metrics["test"]["HR@10"] > 1.5 * pop["HR@10"]
    assert 1 <= metrics["best_epoch"] <= cfg.epochs
    assert metrics["valid"]["NDCG@10"] == max(h["NDCG@10"] for h in metrics["history"])


def test_early_stopping_restores_best_epoch(tmp_path) -> None:
    ds = planted_dataset(users=120)
    cfg = BaselineConfig(model="sasrec", epochs=6, **{**SMALL, "lr": 0.2, "patience": 2})  # unstable lr
    m = run_baseline(cfg, ds, tmp_path / "r")
    hist = [h["NDCG@10"] for h in m["history"]]
    assert m["best_epoch"] == int(np.argmax(hist)) + 1
    model_valid = evaluate_model(*_reload(tmp_path / "r"), LeaveOneOutSplit(ds, cfg.max_len), "valid", cfg.max_len,
                                 torch.device("cpu"))
    assert model_valid["NDCG@10"] == pytest.approx(max(hist), abs=1e-9)


def test_resume_continues_only_a_checkpoint_of_the_same_settings(tmp_path) -> None:
    ds = planted_dataset(users=120)
    cfg = BaselineConfig(model="sasrec", epochs=2, **{**SMALL, "patience": 0})
    first = run_baseline(cfg, ds, tmp_path / "r")
    record = json.loads((tmp_path / "r" / "checkpoints" / "settings.json").read_text())
    assert record["lr"] == cfg.lr and record["data_fingerprint"] == ds.fingerprint()
    # the same settings: the checkpoint already holds both epochs, nothing is trained again (the
    # history, measured epoch times included, is the checkpoint's; a fresh run would time anew)
    again = run_baseline(cfg.model_copy(update={"num_threads": 1}), ds, tmp_path / "r", resume=True)
    assert again["history"] == first["history"]
    # a longer budget of the same settings continues the checkpoint
    longer = run_baseline(cfg.model_copy(update={"epochs": 3}), ds, tmp_path / "r", resume=True)
    assert longer["history"][:2] == first["history"] and len(longer["history"]) == 3
    # other settings: the old checkpoint is deleted (a run stopped before its first epoch cannot
    # leave it behind for a later resume under the new settings), training starts afresh
    from qbert.baselines import _resumable

    other_cfg = cfg.model_copy(update={"lr": 0.05}).resolved()
    assert not _resumable(tmp_path / "r" / "checkpoints", other_cfg, ds)
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    assert _resumable(tmp_path / "r" / "checkpoints", other_cfg, ds)  # now recorded as the new settings
    other = run_baseline(other_cfg, ds, tmp_path / "r", resume=True)
    assert len(other["history"]) == 2
    assert [h["loss"] for h in other["history"]] != [h["loss"] for h in first["history"]]
    assert json.loads((tmp_path / "r" / "checkpoints" / "settings.json").read_text())["lr"] == 0.05


def _reload(run_dir):
    from qbert.baselines import load_run

    model, cfg, _ = load_run(run_dir, "cpu")
    return model, cfg.model


# ----------------------------------------------------------------------------- CLI
def test_cli_baseline_and_evaluate_roundtrip(tmp_path, capsys) -> None:
    data_dir = tmp_path / "data"
    planted_dataset(users=120).save(data_dir)
    cfg_path = tmp_path / "cfg.yaml"
    BaselineConfig(**{**SMALL, "epochs": 2}).to_yaml(cfg_path)
    run = tmp_path / "run"
    rc = cli_main(["baseline", "--model", "bert4rec", "--data", str(data_dir), "--out", str(run), "--config",
                   str(cfg_path), "--epochs", "3", "--set", "mask_prob=0.3"])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    for split in ("test", "valid"):
        assert set(m[split]) == set(METRIC_NAMES)
        assert all(0.0 <= v <= 1.0 for v in m[split].values())
    assert m["config"]["model"] == "bert4rec" and m["config"]["epochs"] == 3 and m["config"]["mask_prob"] == 0.3
    assert m["epochs_run"] == 3 and 1 <= m["best_epoch"] <= 3
    for key in ("params", "git_commit", "timing", "data"):
        assert m[key]
    assert len(m["data"]["fingerprint"]) == 16
    assert (run / "config.yaml").is_file() and (run / "model.pt").is_file()
    assert BaselineConfig.from_yaml(run / "config.yaml").model == "bert4rec"

    capsys.readouterr()
    assert cli_main(["evaluate", "--run", str(run)]) == 0
    again = json.loads(capsys.readouterr().out)
    for k in METRIC_NAMES:
        assert again[k] == pytest.approx(m["test"][k], abs=1e-12)
    assert cli_main(["evaluate", "--run", str(run), "--split", "valid"]) == 0
    valid = json.loads(capsys.readouterr().out)
    for k in METRIC_NAMES:
        assert valid[k] == pytest.approx(m["valid"][k], abs=1e-12)
    assert cli_main(["evaluate", "--run", str(run), "--exclude-history"]) == 0
    excl = json.loads(capsys.readouterr().out)
    assert excl["users"] == 120


def test_cli_errors(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hiden: 64\n")
    assert cli_main(["baseline", "--data", "synthetic", "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "hiden" in capsys.readouterr().err
    assert cli_main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "model.pt" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        BaselineConfig(max_len=1).resolved()
