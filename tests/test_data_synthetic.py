"""The synthetic generator: deterministic, valid, and carrying the structure it claims to plant."""

from __future__ import annotations

import numpy as np
import pytest

from qbert.config import ConfigError
from qbert.data import LeaveOneOutSplit, SeqDataset
from qbert.data.synthetic import SyntheticConfig, make_synthetic, parse_synthetic_spec, planted_structure

SMALL = SyntheticConfig(num_users=300, num_items=120, num_clusters=8)


def test_fixed_seed_gives_identical_dataset_and_other_seed_differs():
    a, b = make_synthetic(SMALL), make_synthetic(SMALL)
    assert a.fingerprint() == b.fingerprint()
    np.testing.assert_array_equal(a.feature("text"), b.feature("text"))
    c = make_synthetic(SMALL.override({"seed": 1}))
    assert c.fingerprint() != a.fingerprint()


def test_default_size_and_columns():
    cfg = SyntheticConfig()
    ds = make_synthetic(cfg)
    assert ds.num_users == cfg.num_users and ds.num_items == cfg.num_items
    lengths = ds.lengths
    assert lengths.min() >= cfg.min_len and lengths.max() <= cfg.max_len
    assert ds.feature("text").shape == (cfg.num_items, cfg.text_dim)
    assert ds.feature("image").shape == (cfg.num_items, cfg.image_dim)
    titles = ds.items.column("title").to_pylist()
    assert all(isinstance(t, str) and len(t.split()) >= 2 for t in titles)
    LeaveOneOutSplit(ds)  # valid leave-one-out input


def test_users_follow_the_sparse_transition_matrix():
    truth = planted_structure(SMALL)
    ds = make_synthetic(SMALL)
    assert ((truth.transition > 0).sum(1) == SMALL.successors).all()
    cl = truth.item_cluster[ds.seq_items]
    same_user = np.ones(ds.num_interactions - 1, bool)
    same_user[ds.seq_offsets[1:-1] - 1] = False  # pairs crossing a user boundary
    prev, nxt = cl[:-1][same_user], cl[1:][same_user]
    assert (truth.transition[prev, nxt] > 0).all()
    # and the chain is not trivial: many distinct transitions are used
    assert len(set(zip(prev.tolist(), nxt.tolist()))) >= SMALL.num_clusters * 2


def test_features_reveal_clusters_and_distinguish_items():
    truth = planted_structure(SMALL)
    ds = make_synthetic(SMALL)
    assert (np.asarray(ds.items.column("cluster")) == truth.item_cluster).all()
    for mod in ("text", "image"):
        x = ds.feature(mod)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        nn = sim.argmax(1)
        assert (truth.item_cluster[nn] == truth.item_cluster).mean() > 0.8
        assert sim.max() < 0.9999  # no two items identical
    # the two modalities are different projections (not copies)
    assert ds.feature("text").shape[1] != ds.feature("image").shape[1] or not np.allclose(ds.feature("text"), ds.feature("image"))


def test_titles_share_words_within_a_cluster():
    truth = planted_structure(SMALL)
    words = [set(t.split()[1:]) for t in make_synthetic(SMALL).items.column("title").to_pylist()]
    cl = truth.item_cluster
    same = [len(words[i] & words[j]) for i in range(40) for j in range(i + 1, 80) if cl[i] == cl[j]]
    diff = [len(words[i] & words[j]) for i in range(40) for j in range(i + 1, 80) if cl[i] != cl[j]]
    assert np.mean(same) > 3 * np.mean(diff) + 0.1


def test_popularity_is_skewed_inside_clusters():
    ds = make_synthetic(SMALL)
    truth = planted_structure(SMALL)
    counts = np.bincount(ds.seq_items, minlength=ds.num_items)
    top = truth.popularity.argmax()
    members = np.flatnonzero(truth.item_cluster == truth.item_cluster[top])
    assert counts[top] == counts[members].max()


def test_spec_strings_and_bad_configs():
    cfg = parse_synthetic_spec("synthetic:seed=3,users=50,items=30,clusters=5")
    assert (cfg.seed, cfg.num_users, cfg.num_items, cfg.num_clusters) == (3, 50, 30, 5)
    assert parse_synthetic_spec("synthetic") == SyntheticConfig()
    with pytest.raises(ConfigError, match="bogus"):
        parse_synthetic_spec("synthetic:bogus=1")
    with pytest.raises(ConfigError, match="min_len"):
        SyntheticConfig.from_dict({"min_len": 2})
    with pytest.raises(ConfigError, match="num_items"):
        SyntheticConfig.from_dict({"num_items": 5, "num_clusters": 10})


def test_roundtrip_through_disk(tmp_path):
    ds = make_synthetic(SMALL)
    loaded = SeqDataset.load(ds.save(tmp_path / "syn"))
    assert loaded.fingerprint() == ds.fingerprint()
    assert loaded.meta["synthetic_config"]["num_users"] == SMALL.num_users
