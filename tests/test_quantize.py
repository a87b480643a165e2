"""Stage 2: k-means, RQ-VAE, dead codes, collision reallocation, semantic-ID table, bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qbert.config import ConfigError
from qbert.data.errors import DataError
from qbert.quantize import (RQVAE, QuantizeConfig, collision_rate, kmeans, parse_sid, read_semantic_ids,
                            reallocate_collisions, semantic_id_table, train_rqvae, write_semantic_ids)
from qbert.quantize.semantic_ids import sid_strings

SMALL = dict(levels=3, codebook_size=8, code_dim=8, hidden=[32], batch_size=64, epochs=3, device="cpu",
             kmeans_iters=10)


def clustered(n_clusters: int = 16, per: int = 16, dim: int = 12, seed: int = 0, spread: float = 0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 3
    labels = np.repeat(np.arange(n_clusters), per)
    return (centres[labels] + spread * rng.normal(size=(labels.size, dim))).astype(np.float32), labels


def test_kmeans_recovers_clusters():
    x, labels = clustered()
    g = torch.Generator().manual_seed(0)
    for seeding in ("kmeans++", "random"):
        c, assign = kmeans(torch.from_numpy(x), 16, iters=20, seeding=seeding, generator=g)
        assert c.shape == (16, 12)
        # every true cluster maps to exactly one centroid (kmeans++ finds them all)
        pairs = {(int(a), int(b)) for a, b in zip(labels, assign)}
        if seeding == "kmeans++":
            assert len(pairs) == 16 and len({b for _, b in pairs}) == 16
    c, _ = kmeans(torch.from_numpy(x[:5]), 8, generator=g)  # fewer points than codes
    assert c.shape == (8, 12) and torch.isfinite(c).all()


def test_rqvae_shapes_and_straight_through_gradients():
    cfg = QuantizeConfig(**SMALL)
    model = RQVAE(12, cfg)
    x = torch.from_numpy(clustered()[0][:32])
    out = model(x)  # first training forward initialises the codebooks by k-means
    assert model.initted
    assert out.recon.shape == (32, 12) and out.codes.shape == (32, 3) and out.codes.dtype == torch.int64
    out.loss.backward()
    enc = model.encoder[0].weight.grad
    assert enc is not None and enc.abs().sum() > 0  # straight-through reaches the encoder
    for vq in model.quantizer.levels:
        assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    assert torch.allclose(out.loss, out.recon_loss + out.codebook_loss + cfg.beta * out.commit_loss)


def test_kmeans_init_survives_state_dict_round_trip():
    cfg = QuantizeConfig(**SMALL)
    x = torch.from_numpy(clustered()[0])
    model = RQVAE(12, cfg)
    model.quantizer.init_codebooks(model.encoder(x).detach(), generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    assert "quantizer.levels.0.initted" in state and "quantizer.levels.2.usage" in state
    fresh = RQVAE(12, cfg)
    assert not fresh.initted
    fresh.load_state_dict(state)
    assert fresh.initted
    before = [vq.codebook.detach().clone() for vq in fresh.quantizer.levels]
    fresh.train()
    fresh(x[:7])  # would re-run k-means on this tiny batch if the init flag were lost
    for b, vq in zip(before, fresh.quantizer.levels):
        assert torch.equal(b, vq.codebook.detach())


def test_dead_codes_are_reseeded_near_data():
    cfg = QuantizeConfig(**SMALL)
    model = RQVAE(12, cfg)
    z = model.encoder(torch.from_numpy(clustered()[0])).detach()
    model.quantizer.init_codebooks(z)
    vq0 = model.quantizer.levels[0]
    with torch.no_grad():
        vq0.codebook[:3] = 1e3  # unreachable codes
        model.train()
        model.quantizer(z)  # count usage
    assert (vq0.usage[:3] == 0).all()
    counts = model.quantizer.reseed_dead_codes(z, torch.Generator().manual_seed(0))
    assert counts[0] >= 3
    assert vq0.codebook[:3].abs().max() < 100  # moved onto residuals
    assert (vq0.usage == 0).all()  # usage restarts


def test_utilisation_high_on_clustered_data():
    x, _ = clustered(n_clusters=32, per=8, dim=12, spread=0.3)
    cfg = QuantizeConfig(**{**SMALL, "codebook_size": 16, "epochs": 4})
    res = train_rqvae(x, cfg)
    rep = res.report
    assert rep["utilisation"][0] >= 0.9
    assert all(p > 4 for p in rep["perplexity"])
    assert rep["unique"] and collision_rate(res.codes) == 0.0
    assert res.codes.shape == (256, 3) and res.codes.dtype == np.int64
    assert rep["recon_mse"] >= 0 and "final_losses" in rep
    assert rep["collision_rate_before"] == pytest.approx(collision_rate(res.codes_before))


def _consistent_distances(codes: np.ndarray, sizes: list[int], seed: int = 0) -> np.ndarray:
    """Random distance tensor whose per-level argmin is the given code."""
    rng = np.random.default_rng(seed)
    n, K = codes.shape
    d = rng.uniform(1.0, 2.0, size=(n, K, max(sizes)))
    for l, s in enumerate(sizes):
        d[:, l, s:] = np.inf
        d[np.arange(n), l, codes[:, l]] = rng.uniform(0.0, 0.5, size=n)
    return d


def test_reallocation_exactly_as_section_3_4():
    sizes = [4, 4, 8]
    flat = np.random.default_rng(1).choice(128, 40, replace=False)  # distinct tuples, then plant collisions
    codes = np.stack([flat // 32, flat // 8 % 4, flat % 8], 1)
    codes[10:14] = codes[0]  # a collision group of 5
    codes[20:22] = codes[1]  # and one of 3
    dist = _consistent_distances(codes, sizes)
    new, info = reallocate_collisions(codes, dist, sizes)
    assert np.unique(new, axis=0).shape[0] == 40 and info.collision_rate_after == 0.0
    assert info.collision_rate_before == pytest.approx(collision_rate(codes)) and info.collision_rate_before > 0
    groups = [np.r_[0, 10:14], np.r_[1, 20:22]]
    colliding = np.concatenate(groups)
    others = np.setdiff1d(np.arange(40), colliding)
    assert np.array_equal(new[others], codes[others])  # non-colliding items untouched
    assert info.reassigned == 6 and info.colliding_items == 8 and info.collision_groups == 2
    for g in groups:
        keeper = g[np.argmin(dist[g, 2].min(1))]  # closest at the last level keeps its tuple
        assert np.array_equal(new[keeper], codes[keeper])
        movers = g[g != keeper]
        assert np.array_equal(new[movers, :2], codes[movers, :2])  # upper levels kept (last level had room)
        final = {tuple(t) for t in new.tolist()}
        for m in movers:  # took the nearest last-level code whose tuple was free: every nearer one is taken
            nearer = np.flatnonzero(dist[m, 2] < dist[m, 2, new[m, 2]])
            assert all((*codes[m, :2], c) in final for c in nearer.tolist())


def test_reallocation_moves_up_a_level_when_last_is_full():
    sizes = [2, 2, 2]
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]])  # item 2 collides; (0,0,*) is full
    dist = _consistent_distances(codes, sizes)
    dist[0, 2, 0], dist[2, 2, 0] = 0.01, 0.2  # item 0 keeps
    new, info = reallocate_collisions(codes, dist, sizes)
    assert np.array_equal(new[[0, 1, 3]], codes[[0, 1, 3]])
    assert new[2, 0] == 0 and new[2, 1] == 1  # first level kept, second level changed
    assert info.changed_from_level == [0, 1, 0]


def test_reallocation_always_unique_even_when_space_is_exactly_full():
    sizes = [2, 4, 2]  # 16 tuples for 16 items, all starting on 2 tuples
    codes = np.array([[0, 0, 0]] * 8 + [[1, 3, 1]] * 8)
    new, info = reallocate_collisions(codes, _consistent_distances(codes, sizes, seed=3), sizes)
    assert np.unique(new, axis=0).shape[0] == 16
    assert info.reassigned == 14 and sum(info.changed_from_level) == 14
    # and with a callable distance source (only colliding rows are computed)
    seen = []

    def source(idx):
        seen.append(np.asarray(idx))
        return _consistent_distances(codes, sizes, seed=3)[idx]

    new2, _ = reallocate_collisions(codes, source, sizes)
    assert np.array_equal(new, new2) and len(seen) == 1


def test_impossible_settings_fail_before_training():
    with pytest.raises(ConfigError, match="codebook_size"):
        reallocate_collisions(np.zeros((10, 2), dtype=np.int64), np.zeros((10, 2, 3)), [3, 3])
    x = np.random.default_rng(0).normal(size=(70, 4)).astype(np.float32)
    cfg = QuantizeConfig(**{**SMALL, "levels": 2, "codebook_size": 8, "epochs": 10_000})
    with pytest.raises(ConfigError, match="64 distinct semantic IDs but there are 70 items"):
        train_rqvae(x, cfg)
    with pytest.raises(ConfigError, match="codebook_size"):
        QuantizeConfig.from_dict({"levels": 3, "codebook_size": [4, 4]})


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN/inf.*item 0"),
    (np.zeros((3,)), "matrix"),
    (np.array([["a", "b"]]), "numeric"),
])
def test_bad_embeddings(bad, match):
    with pytest.raises(DataError, match=match):
        train_rqvae(bad, QuantizeConfig(**SMALL))


def test_semantic_id_table_and_parquet(tmp_path):
    codes = np.array([[12, 3, 200, 7], [0, 0, 0, 1]])
    table = semantic_id_table(codes, np.array([5, 9]))
    assert table.column_names == ["item_id", "code_0", "code_1", "code_2", "code_3", "sid"]
    assert table.column("sid").to_pylist() == ["<a_12><b_3><c_200><d_7>", "<a_0><b_0><c_0><d_1>"]
    assert parse_sid("<a_12><b_3><c_200><d_7>") == [12, 3, 200, 7]
    path = write_semantic_ids(tmp_path / "sid.parquet", codes, np.array([5, 9]), [256] * 4)
    ids, back = read_semantic_ids(path, [256] * 4)
    assert ids.tolist() == [5, 9] and np.array_equal(back, codes)
    with pytest.raises(DataError, match="code_2.*200.*out of range"):
        read_semantic_ids(path, [256, 256, 100, 256])
    with pytest.raises(DataError, match="not unique"):
        write_semantic_ids(tmp_path / "dup.parquet", np.array([[1, 2], [1, 2]]))
    assert not (tmp_path / "dup.parquet").exists()
    tampered = table.set_column(5, "sid", __import__("pyarrow").array(["<a_1><b_3><c_200><d_7>", "<a_0><b_0><c_0><d_1>"]))
    pq.write_table(tampered, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="'sid' row 0"):
        read_semantic_ids(tmp_path / "bad.parquet")
    # an item column may be null (a domain without titles), a code may not
    import pyarrow as pa
    path = write_semantic_ids(tmp_path / "titles.parquet", codes, np.array([5, 9]), [256] * 4,
                              columns={"title": pa.array(["a drum", None])})
    assert pq.read_table(path).column("title").to_pylist() == ["a drum", None]
    pq.write_table(table.set_column(1, "code_0", pa.array([12, None], pa.int64())), tmp_path / "null.parquet")
    with pytest.raises(DataError, match="'code_0' has null values"):
        read_semantic_ids(tmp_path / "null.parquet")
    with pytest.raises(DataError, match="level 1 must use letter 'b'"):
        parse_sid("<a_1><c_2>")
    assert len(sid_strings(np.zeros((3, 26), dtype=np.int64))[0]) > 0


def test_train_rqvae_saves_artifacts(tmp_path):
    x, _ = clustered(n_clusters=8, per=8, dim=6)
    x[8:16] = x[8]  # identical embeddings must still get distinct IDs
    cfg = QuantizeConfig(**{**SMALL, "epochs": 2})
    res = train_rqvae(x, cfg, checkpoint_dir=tmp_path / "ckpt")
    assert res.report["collision_rate_before"] > 0 and res.report["collision_rate_after"] == 0
    assert res.reallocation.reassigned >= 7
    assert np.array_equal(res.codes[:8], res.codes_before[:8]) or res.reallocation.colliding_items > 8
    res.save(tmp_path / "out")
    ids, codes = read_semantic_ids(tmp_path / "out" / "semantic_ids.parquet", cfg.sizes)
    assert np.array_equal(codes, res.codes) and (tmp_path / "ckpt" / "last.pt").is_file()
    assert math.prod(cfg.sizes) >= len(ids)
