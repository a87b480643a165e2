"""Stage 1: shapes, gradients, early exit, fixed vs dynamic, InfoNCE, modality subsets, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.config import ConfigError
from qbert.data.errors import DataError
from qbert.fusion import (FusionConfig, FusionModel, fusion_loss, halting_distribution, info_nce,
                          read_fusion_embeddings, similarity_align, train_fusion, write_fusion_embeddings)

SMALL = dict(dim=16, heads=2, layers=3, gate_hidden=8, batch_size=32, epochs=2, device="cpu", dropout=0.0)


def make_features(n: int = 48, seed: int = 0, set_size: int = 1):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    text = z @ rng.normal(size=(6, 20)) + 0.3 * rng.normal(size=(n, 20))
    image = z @ rng.normal(size=(6, 12)) + 0.3 * rng.normal(size=(n, 12))
    if set_size > 1:
        image = np.stack([image + 0.1 * rng.normal(size=image.shape) for _ in range(set_size)], 1)
    return {"text": text.astype(np.float32), "image": image.astype(np.float32)}


def model_and_batch(variant: str = "dynamic", set_size: int = 1, **kw):
    cfg = FusionConfig(**{**SMALL, "variant": variant, **kw})
    feats = make_features(set_size=set_size)
    model = FusionModel(cfg, 48, {"text": 20, "image": 12})
    idx = torch.arange(16)
    batch = {m: torch.from_numpy(a[:16]).reshape(16, -1 if a.ndim == 2 else a.shape[1], a.shape[-1]) for m, a in feats.items()}
    batch = {m: t if t.dim() == 3 else t.unsqueeze(1) for m, t in batch.items()}
    return cfg, model, idx, batch


def set_gate_bias(model: FusionModel, value: float) -> None:
    with torch.no_grad():
        for gate in model.transformer.gates:
            gate.mlp[-1].weight.zero_()
            gate.mlp[-1].bias.fill_(value)


@pytest.mark.parametrize("set_size", [1, 3])
def test_shapes_soft_and_hard(set_size):
    cfg, model, idx, batch = model_and_batch(set_size=set_size)
    out = model(idx, batch)
    assert out.fused.shape == (16, cfg.dim) and out.query.shape == (16, cfg.dim)
    assert set(out.aligned) == {"text", "image"} and out.aligned["image"].shape == (16, cfg.dim)
    assert out.exit_probs.shape == (cfg.layers, 16) and out.layer_outputs.shape == (cfg.layers, 16, cfg.dim)
    model.eval()
    hard = model(idx, batch, hard=True)
    assert hard.fused.shape == (16, cfg.dim) and hard.exit_probs is None
    assert ((hard.depth >= 1) & (hard.depth <= cfg.layers)).all()


@pytest.mark.parametrize("halting", ["expected_loss", "mixture"])
def test_gradients_reach_every_part(halting):
    cfg, model, idx, batch = model_and_batch(halting=halting)
    loss, logs = fusion_loss(model(idx, batch), cfg)
    loss.backward()
    for name in ["id_embedding.weight", "projectors.text.proj.weight", "projectors.image.proj.weight",
                 "transformer.layers.0.attn.in_proj_weight", "transformer.layers.2.ffn.0.weight",
                 "transformer.gates.0.mlp.0.weight", "transformer.gates.1.mlp.2.bias"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert {"nce_fused_text", "nce_fused_image", "nce_text_image", "id_anchor", "expected_depth"} <= set(logs)


def test_halting_distribution_is_act_style():
    cont = torch.tensor([[0.9, 0.2], [0.5, 0.7]])  # gates after layers 1, 2 for two items
    p = halting_distribution(cont)
    assert torch.allclose(p.sum(0), torch.ones(2))
    expected_item0 = torch.tensor([0.1, 0.9 * 0.5, 0.9 * 0.5])
    assert torch.allclose(p[:, 0], expected_item0)


def test_hard_early_exit_follows_the_gates():
    cfg, model, idx, batch = model_and_batch()
    model.eval()
    set_gate_bias(model, -20.0)  # gate ~ 0: stop after layer 1
    out = model(idx, batch, hard=True)
    assert (out.depth == 1).all()
    q = model.query(idx)
    kv = torch.stack([out.aligned["text"], out.aligned["image"]], 1)
    assert torch.allclose(out.fused, model.transformer.layers[0](q, kv), atol=1e-5)
    set_gate_bias(model, 20.0)  # gate ~ 1: always continue
    assert (model(idx, batch, hard=True).depth == cfg.layers).all()
    # per-item decisions: item-dependent gate input splits the batch, and outputs match exits
    with torch.no_grad():
        for gate in model.transformer.gates:
            gate.mlp[-1].bias.fill_(0.0)
            gate.mlp[-1].weight.normal_(std=5.0)
    out = model(idx, batch, hard=True)
    full = torch.stack(_all_layers(model, q, kv))
    picked = full[out.depth.long() - 1, torch.arange(16)]
    assert torch.allclose(out.fused, picked, atol=1e-5)


def _all_layers(model, q, kv):
    hs, h = [], q
    for layer in model.transformer.layers:
        h = layer(h, kv)
        hs.append(h)
    return hs


def test_soft_exit_matches_hard_when_gates_saturate():
    cfg, model, idx, batch = model_and_batch()
    model.eval()
    set_gate_bias(model, -30.0)
    soft, hard = model(idx, batch), model(idx, batch, hard=True)
    assert torch.allclose(soft.fused, hard.fused, atol=1e-5)
    assert torch.allclose(soft.depth, torch.ones(16), atol=1e-4)


def test_fixed_variant_uses_all_layers_without_gates():
    cfg, model, idx, batch = model_and_batch(variant="fixed")
    assert len(model.transformer.gates) == 0
    model.eval()
    out = model(idx, batch, hard=True)
    assert (out.depth == cfg.layers).all()
    kv = torch.stack([out.aligned["text"], out.aligned["image"]], 1)
    assert torch.allclose(out.fused, _all_layers(model, model.query(idx), kv)[-1], atol=1e-5)
    assert torch.allclose(model(idx, batch).fused, out.fused, atol=1e-5)


def test_info_nce_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g)
    b = a + 0.1 * torch.randn(64, 16, generator=g)
    aligned = info_nce(a, b, 0.1)
    shuffled = info_nce(a, b[torch.randperm(64, generator=g)], 0.1)
    assert aligned < shuffled
    assert torch.allclose(info_nce(a, b, 0.1), info_nce(b, a, 0.1))  # symmetric


def test_similarity_alignment_weights_and_padding():
    q = torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    xhat, w = similarity_align(q, x, 0.1, mask)
    assert w[0, 2] == 0 and w[0, 0] > 0.99 and torch.allclose(w.sum(), torch.tensor(1.0))
    _, w_hot = similarity_align(q, x, 10.0, mask)
    assert w_hot[0, 1] > w[0, 1]  # higher temperature -> flatter weights


@pytest.mark.parametrize("modalities", [["text"], ["image"], ["id"], ["text", "image"], ["image", "id"],
                                        ["text", "image", "id"]])
def test_every_modality_subset_trains(modalities):
    feats = make_features(set_size=2)
    cfg = FusionConfig(**{**SMALL, "epochs": 1, "modalities": modalities})
    res = train_fusion(feats, cfg, num_items=48)
    assert res.embeddings.shape == (48, cfg.dim) and np.isfinite(res.embeddings).all()
    rep = res.report
    assert sum(rep["activated_layer_counts"]) == 48
    assert rep["trained"] == (modalities != ["id"])
    assert set(rep["modality_mse"]) == {m for m in modalities}
    if modalities == ["id"]:
        assert np.allclose(res.embeddings, res.model.id_embedding.weight.detach().numpy())


def test_training_lowers_the_loss_and_reports():
    feats = make_features(n=64)
    cfg = FusionConfig(**{**SMALL, "epochs": 4, "lr": 3e-3, "learnable_tau": True})
    res = train_fusion(feats, cfg)
    hist = res.fit.history
    assert hist[-1]["loss"] < hist[0]["loss"]
    rep = res.report
    assert len(rep["activated_layer_counts"]) == cfg.layers
    assert 1 <= rep["activated_layers_median"] <= cfg.layers
    assert rep["final_losses"]["loss"] == pytest.approx(hist[-1]["loss"])
    assert res.model.log_tau.requires_grad and rep["tau"] > 0
    # hard-exit embeddings are what infer_fusion returns for the trained model
    assert np.bincount(res.depth, minlength=cfg.layers + 1)[1:].tolist() == rep["activated_layer_counts"]


def test_embeddings_parquet_round_trip(tmp_path):
    emb = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    path = write_fusion_embeddings(tmp_path / "emb.parquet", emb)
    ids, back = read_fusion_embeddings(path)
    assert (ids == np.arange(10)).all() and np.array_equal(back, emb)
    with pytest.raises(DataError, match="NaN"):
        write_fusion_embeddings(tmp_path / "bad.parquet", np.full((2, 2), np.nan))
    assert not (tmp_path / "bad.parquet").exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda f: f["text"].__setitem__((3, 1), np.nan), "modality 'text'.*NaN.*item 3"),
    (lambda f: f["image"].__setitem__((5, 0), np.inf), "modality 'image'.*NaN/inf.*item 5"),
    (lambda f: f.__setitem__("image", f["image"][:40]), "rows"),
    (lambda f: f.pop("image"), "modality 'image' is enabled but no features"),
    (lambda f: f.__setitem__("audio", f["text"]), "unknown feature modality 'audio'"),
    (lambda f: f.__setitem__("id", f["text"]), "unknown feature modality 'id'"),
    (lambda f: f["text"].__setitem__(7, 0.0), "no features.*'text'.*item 7"),
    (lambda f: f.__setitem__("text", f["text"][:, :, None, None]), "modality 'text' must be"),
    (lambda f: f.__setitem__("text", np.array([["a"] * 20] * 48)), "modality 'text' must be numeric"),
    (lambda f: f.__setitem__("image", [[0.5] * 12] * 47 + [[0.5] * 11]), "modality 'image' have inconsistent"),
])
def test_bad_features_fail_before_training(mutate, match):
    feats = make_features()
    mutate(feats)
    with pytest.raises(DataError, match=match):
        train_fusion(feats, FusionConfig(**SMALL), num_items=48)


def test_bad_config_and_missing_counts():
    with pytest.raises(ConfigError, match="modalities"):
        FusionConfig.from_dict({"modalities": ["text", "audio"]})
    with pytest.raises(ConfigError, match="divisible"):
        FusionConfig.from_dict({"dim": 10, "heads": 4})
    with pytest.raises(DataError, match="num_items"):
        train_fusion({}, FusionConfig(**{**SMALL, "modalities": ["id"]}))
    with pytest.raises(DataError, match="disagree"):
        f = make_features()
        f["image"] = f["image"][:30]
        train_fusion(f, FusionConfig(**SMALL))
