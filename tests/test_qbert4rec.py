"""Stage-3 model and runners: shapes, gradients, scoring vs brute force, catalogue swap, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qbert.data.dataset import from_sequences
from qbert.data.split import LeaveOneOutSplit
from qbert.seqrec import masks
from qbert.seqrec.qbert4rec import QBert4Rec
from qbert.seqrec.stage import (FinetuneConfig, PretrainConfig, SeqRecConfig, build_model, evaluate_split, finetune,
                                masked_batches, pretrain, rows_per_owner, sampled_candidates, select_code_weight,
                                training_rows, training_rows_and_owners)


def _codes(n: int = 30, K: int = 3, C: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (n, K), generator=g)


NEW = [3, 11, 17, 25]  # the untrained items of the tests of the new-item rules


def _rule_and_plain(codes: torch.Tensor, kw: dict, **rule):
    """(a model with the new-item ``rule``, the same weights without it, the [N] trained mask, [4, 6]
    random history tokens), the items NEW untrained in both models."""
    m = QBert4Rec(codes, **kw, **rule).eval()
    plain = QBert4Rec(codes, **kw).eval()
    plain.load_state_dict(m.state_dict())
    trained = torch.ones(len(codes), dtype=torch.bool)
    trained[NEW] = False
    for model in (m, plain):
        model.set_trained_items(trained.nonzero()[:, 0])
    return m, plain, trained, torch.randint(1, len(codes) + 1, (4, 6), generator=torch.Generator().manual_seed(1))


def _mode(use_id: bool) -> dict:
    """The old two settings: the hybrid (item-ID embedding and head) or pure semantic IDs, both with
    the per-level head."""
    return {"item_id": "input_and_head" if use_id else "none", "head": "levels"}


def _model(use_id: bool = False, combine: str = "sum", **kw) -> QBert4Rec:
    torch.manual_seed(0)
    kw = {**_mode(use_id), **kw}
    return QBert4Rec(_codes(), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10,
                     combine=combine, **kw)


def _tokens(B: int = 6, L: int = 10, n: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, n + 1, (B, L), generator=g)
    tok[0, :7] = 0
    tok[1, :3] = 0
    return tok


@pytest.mark.parametrize("use_id, combine", [(False, "sum"), (True, "sum"), (False, "concat")])
def test_shapes_and_gradients(use_id, combine):
    m = _model(use_id, combine)
    tok = _tokens()
    h = m(tok)
    assert h.shape == (6, 10, 16)
    assert m.code_logits(h[:, -1]).shape == (6, 3, 8)
    mask = masks.random_mask(tok != 0, 0.3, torch.Generator().manual_seed(0))
    loss, logs = m.masked_loss(tok, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert ("id_loss" in logs) == use_id
    loss.backward()
    for name in ["code_emb.weight", "pos_emb.weight", "level_head.weight", "code_bias"]:
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    if use_id:
        assert m.item_emb.weight.grad.abs().sum() > 0
    m.eval()
    assert m.score(tok[:, 1:]).shape == (6, 30)


def test_score_equals_brute_force_sum_of_level_log_probs():
    for use_id in (False, True):
        m = _model(use_id).eval()
        hist = _tokens(B=4, L=9)
        with torch.no_grad():
            scores = m.score(hist)
            seq = torch.cat([hist, torch.full((4, 1), m.mask_token)], 1)
            h = m(seq)[:, -1]
            lp = torch.log_softmax(m.code_logits(h), -1)
            lid = torch.log_softmax(m.id_logits(h), -1) if use_id else None
        codes = m.codes
        for b in range(4):
            for item in range(m.num_items):
                expect = sum(float(lp[b, lev, codes[item, lev]]) for lev in range(m.K))
                if use_id:
                    expect += float(lid[b, item])
                assert abs(float(scores[b, item]) - expect) < 1e-4


def test_code_score_weight_scales_only_the_semantic_id_term():
    m = _model(True).eval()
    hist = _tokens(B=4, L=9)
    with torch.no_grad():
        codes, ids = m.score_parts(hist)
        for w in (0.0, 0.25, 2.0):
            m.code_score_weight = w
            torch.testing.assert_close(m.score(hist), w * codes + ids)
    with pytest.raises(ValueError, match="code_score_weight"):
        _model(True, code_score_weight=-1.0)


def test_repeat_bias_shifts_exactly_the_items_in_the_sequence():
    m = _model(True, repeat_bias=True).eval()
    with torch.no_grad():
        m.repeat_raw.fill_(-0.3)  # repeat_weight = 10 * raw = -3
    hist = _tokens(B=4, L=9)
    h = torch.randn(4, 16)
    inp = m.append_mask(hist)
    shift = m.id_logits(h, inp) - m.id_logits(h)
    for b in range(4):
        seen = set(int(t) - 1 for t in inp[b] if 0 < int(t) <= m.num_items)
        expect = torch.tensor([-3.0 if i in seen else 0.0 for i in range(m.num_items)])
        torch.testing.assert_close(shift[b], expect)
    with torch.no_grad():  # ranking applies it to the history: a seen item drops by exactly 3 in logit
        _, ids = m.score_parts(hist)
        m.repeat_raw.zero_()
        _, ids0 = m.score_parts(hist)
    b, item = 0, int(hist[0, -1]) - 1
    assert float((ids0[b] - ids[b])[item] - (ids0[b] - ids[b]).min()) == pytest.approx(3.0, abs=1e-4)
    loss, _ = m.train().masked_loss(_tokens(), _tokens() > 15)
    loss.backward()
    assert m.repeat_raw.grad is not None and float(m.repeat_raw.grad) != 0.0
    with pytest.raises(ValueError, match="repeat_bias shifts an item softmax"):
        _model(False, repeat_bias=True)


def test_label_smoothing_smooths_only_the_item_softmax():
    m = _model(True, repeat_bias=True).eval()  # eval: no dropout, so the two losses see the same states
    tok = _tokens()
    mask = masks.random_mask(tok != 0, 0.4, torch.Generator().manual_seed(1))
    _, plain = m.masked_loss(tok, mask)
    _, smooth = m.masked_loss(tok, mask, label_smoothing=0.2)
    assert smooth["code_loss"] == pytest.approx(plain["code_loss"])  # code targets stay one-hot
    inp = tok.masked_fill(mask, m.mask_token)
    with torch.no_grad():
        logp = torch.log_softmax(m.id_logits(m(inp)[mask], inp[mask.nonzero()[:, 0]]), -1)
    nll = -logp.gather(1, (tok[mask] - 1)[:, None]).squeeze(1)
    expect = (0.8 * nll - 0.2 * logp.mean(1)).mean()  # (1 - eps) one-hot + eps uniform over N items
    assert smooth["id_loss"] == pytest.approx(float(expect), rel=1e-5)
    assert smooth["id_loss"] != pytest.approx(plain["id_loss"])
    with pytest.raises(ValueError, match="label_smoothing smooths an item softmax"):
        _model(False).masked_loss(tok, mask, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        m.masked_loss(tok, mask, label_smoothing=1.0)


def test_prefix_bias_shifts_items_sharing_a_code_prefix_with_the_sequence():
    m = _model(True, prefix_bias=True).eval()
    with torch.no_grad():
        m.prefix_raw.copy_(torch.tensor([-0.1, 0.2]))  # prefix_weight = 10 * raw: -1 (first code), +2 (two)
    assert m.prefix_weight.tolist() == pytest.approx([-1.0, 2.0])
    inp = m.append_mask(_tokens(B=4, L=9))
    h = torch.randn(4, 16)
    shift = m.id_logits(h, inp) - m.id_logits(h)
    for b in range(4):  # brute force over items and sequence items
        seen = [int(t) - 1 for t in inp[b] if 0 < int(t) <= m.num_items]
        expect = torch.zeros(m.num_items)
        for i in range(m.num_items):
            for level, w in enumerate((-1.0, 2.0)):
                expect[i] += w * any(bool((m.codes[i, : level + 1] == m.codes[j, : level + 1]).all()) for j in seen)
        torch.testing.assert_close(shift[b], expect)
    loss, _ = m.train().masked_loss(_tokens(), _tokens() > 15)
    loss.backward()
    assert m.prefix_raw.grad is not None and bool((m.prefix_raw.grad != 0).all())
    with pytest.raises(ValueError, match="prefix_bias shifts an item softmax"):
        _model(False, prefix_bias=True)


@pytest.mark.parametrize("repeats", [True, False])
def test_repeat_bias_learns_the_sign_of_repeats_from_training_data(repeats):
    rng = np.random.default_rng(0)
    n = 40
    if repeats:  # every user alternates two items: the next item is always in the history
        seqs = [[int(x) for x in np.resize(rng.choice(n, 2, replace=False), int(rng.integers(6, 12)))]
                for _ in range(200)]
    else:  # a permutation prefix: the next item is never in the history
        seqs = [[int(x) for x in rng.permutation(n)[: int(rng.integers(6, 12))]] for _ in range(200)]
    split = LeaveOneOutSplit(from_sequences("rep", seqs, n), 12)
    torch.manual_seed(0)
    model = build_model(SeqRecConfig(hidden=16, layers=1, heads=2, dropout=0.0, repeat_bias=True, **_mode(True)),
                        rng.integers(0, 8, (n, 2)), 8, 12)
    finetune(model, split, FinetuneConfig(epochs=2, batch_size=64, lr=1e-2, patience=0), seed=0, progress=False)
    weight = float(model.repeat_weight.detach())
    assert weight > 0.1 if repeats else weight < -0.1


def test_padding_does_not_change_real_outputs():
    m = _model().eval()
    tok = _tokens(B=2, L=6)
    tok[:, 0] = 0
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), tok], 1)
    with torch.no_grad():
        a = m.score(tok)
        b = m.score(padded[:, -9:])
    assert torch.allclose(a, b, atol=1e-5)


def test_long_history_is_truncated_to_keep_max_len():
    m = _model().eval()
    hist = _tokens(B=3, L=10)  # max_len 10: the oldest item is dropped for the [MASK]
    with torch.no_grad():
        assert torch.allclose(m.score(hist), m.score(hist[:, 1:]))


def test_bad_codes_and_config_errors():
    with pytest.raises(ValueError, match="codes of level"):
        QBert4Rec(torch.tensor([[0, 9]]), num_codes=8)
    with pytest.raises(ValueError, match="divisible"):
        QBert4Rec(_codes(), num_codes=8, hidden=10, heads=3)
    with pytest.raises(ValueError, match="level 1"):
        QBert4Rec(torch.tensor([[0, 5]]), num_codes=8, level_sizes=[8, 4])
    m = _model()
    with pytest.raises(ValueError, match="padding"):
        tok = _tokens()
        m.masked_loss(tok, torch.ones_like(tok, dtype=torch.bool))


def test_smaller_level_codebooks_never_predicted():
    m = QBert4Rec(torch.tensor([[0, 1], [2, 3]]), num_codes=8, hidden=8, layers=1, heads=1, level_sizes=[8, 4])
    lp = torch.log_softmax(m.code_logits(torch.randn(3, 8)), -1)
    assert (lp[:, 1, 4:].exp() < 1e-6).all()


def test_set_catalogue_and_encoder_transfer():
    src = _model(**_mode(True))
    tgt = QBert4Rec(_codes(n=12, seed=3), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10,
                    **_mode(True))
    fresh = tgt.load_encoder(src.state_dict())
    assert set(fresh) == {"codes", "trained_items", "item_emb.weight", "item_bias"}
    assert torch.equal(tgt.code_emb.weight, src.code_emb.weight)
    assert tgt.num_items == 12 and tgt.item_emb.num_embeddings == 14
    tgt.eval()
    assert tgt.score(_tokens(n=12)[:, 1:]).shape == (6, 12)


def test_sharded_batches_partition_each_epoch():
    rows = np.arange(1, 41).reshape(20, 2)
    fn = lambda valid, g: masks.random_mask(valid, 0.5, g)  # noqa: E731
    full = [b["tokens"] for b in masked_batches(rows, 4, fn, 0, torch.device("cpu"))(0)]
    parts = [[b["tokens"] for b in masked_batches(rows, 4, fn, 0, torch.device("cpu"), shard=(r, 2))(0)]
             for r in range(2)]
    got = torch.cat([torch.cat(p) for p in parts])
    assert sorted(got[:, 0].tolist()) == sorted(torch.cat(full)[:, 0].tolist())
    assert not set(torch.cat(parts[0])[:, 0].tolist()) & set(torch.cat(parts[1])[:, 0].tolist())


def test_masked_batches_bucket_and_trim_rows():
    """Every row once per epoch; a batch holds rows of similar length, trimmed to the longest;
    two shards at half the batch size together give exactly the one-worker batches."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 11, 300)
    rows = np.zeros((300, 10), dtype=np.int64)
    for i, n in enumerate(lengths):
        rows[i, 10 - n:] = i * 10 + np.arange(1, n + 1)  # left-padded, row id recoverable
    fn = lambda valid, g: masks.random_mask(valid, 0.5, g)  # noqa: E731
    full = list(masked_batches(rows, 16, fn, 0, torch.device("cpu"), bucket=True)(3))
    seen = sorted(int(r[r > 0][0]) // 10 for b in full for r in b["tokens"])
    assert seen == list(range(300))
    widths = [b["tokens"].shape[1] for b in full]
    assert all(((b["tokens"] != 0).sum(1).max() == b["tokens"].shape[1]) for b in full)
    assert sum(w * len(b["tokens"]) for w, b in zip(widths, full)) < 0.7 * rows.size  # padding mostly gone
    unbucketed = list(masked_batches(rows, 16, fn, 0, torch.device("cpu"), bucket=False)(3))
    assert sum(b["tokens"].numel() for b in full) < sum(b["tokens"].numel() for b in unbucketed)
    halves = [list(masked_batches(rows, 8, fn, 0, torch.device("cpu"), shard=(r, 2))(3)) for r in range(2)]
    assert len(halves[0]) == len(full)
    for b, h0, h1 in zip(full, *halves):
        ids = lambda t: sorted(int(r[r > 0][0]) // 10 for r in t)  # noqa: E731
        assert ids(b["tokens"]) == sorted(ids(h0["tokens"]) + ids(h1["tokens"]))


def _planted(num_users: int = 300, n: int = 40, seed: int = 0):
    """Items in 8 groups; each user walks group g -> g+1; codes carry the group at level 0."""
    rng = np.random.default_rng(seed)
    group = np.arange(n) % 8
    seqs = []
    for _ in range(num_users):
        g0 = rng.integers(8)
        length = rng.integers(5, 12)
        gs = (g0 + np.arange(length)) % 8
        seqs.append([int(rng.choice(np.flatnonzero(group == g))) for g in gs])
    ds = from_sequences("planted", seqs, n)
    # hierarchical like RQ-VAE codes: group, then the item inside its group, then a noisy level
    codes = np.stack([group, np.arange(n) // 8, rng.integers(0, 16, n)], 1)
    return ds, codes


def test_training_rows_never_hold_valid_or_test_targets():
    rng = np.random.default_rng(0)
    U, n_train = 30, 10  # items 0..9 only in training parts; each user's valid/test targets are unique
    seqs = [list(rng.integers(0, n_train, rng.integers(1, 15))) + [n_train + 2 * u, n_train + 2 * u + 1]
            for u in range(U)]
    ds = from_sequences("leak", seqs, n_train + 2 * U)
    split = LeaveOneOutSplit(ds, 8)
    for prefixes in (False, True):
        rows = training_rows(split, 8, prefixes)
        assert rows.max() <= n_train, "a valid/test target leaked into the training rows"
        assert (rows[:, -1] > 0).all()
    assert np.array_equal(training_rows(split, 8, False), split.train_sequences(0, 1))
    lengths = split.train_end - split.user_start
    assert len(training_rows(split, 8, True)) == int((lengths - 1).sum() + (lengths == 1).sum())


def test_rows_per_owner_caps_each_owner_and_draws_afresh():
    owners = np.repeat(np.arange(5), [1, 3, 10, 40, 2])[np.random.default_rng(0).permutation(56)]
    picks = [rows_per_owner(owners, 4, np.random.default_rng(s)) for s in range(3)]
    for kept in picks:
        assert np.array_equal(kept, np.unique(kept))
        assert np.array_equal(np.bincount(owners[kept], minlength=5), [1, 3, 4, 4, 2])
    assert not np.array_equal(picks[0], picks[1])  # other draws, other rows of the long owners
    union = np.unique(np.concatenate([rows_per_owner(owners, 4, np.random.default_rng(s)) for s in range(40)]))
    assert len(union) == 56  # every row is drawn in some epoch
    assert np.array_equal(rows_per_owner(owners, 100, np.random.default_rng(0)), np.arange(56))


def _long_histories() -> LeaveOneOutSplit:
    """60 users with 3-39 items each, no item shared (every prefix row distinct), window 12."""
    rng = np.random.default_rng(1)
    return LeaveOneOutSplit(from_sequences("long", [list(40 * u + np.arange(rng.integers(3, 40)))
                                                    for u in range(60)], 2400), 12)


def test_finetune_rows_capped_per_user_each_epoch():
    split = _long_histories()
    rows, owners = training_rows_and_owners(split, 12, True)
    assert np.array_equal(rows, training_rows(split, 12, True))
    assert np.array_equal(np.bincount(owners, minlength=60), np.maximum(split.train_end - split.train_start - 1, 1))
    for r, u in zip(rows[::7], owners[::7]):  # each row is a prefix of its owner's training part
        part = split.train_items[split.train_start[u]:split.train_end[u]] + 1
        real = r[r > 0]
        assert any(np.array_equal(part[max(0, e - len(real)):e], real) for e in range(1, len(part) + 1))
    mask_fn = lambda valid, g: masks.finetune_mask(valid, 0.3, 0.5, g)  # noqa: E731
    epoch = masked_batches(rows, 16, mask_fn, 0, torch.device("cpu"), per_owner=(owners, 5))
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    drawn = []
    for e in range(2):
        got = [index[np.pad(t.numpy(), (12 - len(t), 0)).tobytes()] for b in epoch(e) for t in b["tokens"]]
        assert len(got) == len(set(got)) == int(np.minimum(np.bincount(owners), 5).sum())
        assert np.bincount(owners[got]).max() == 5
        drawn.append(set(got))
    assert drawn[0] != drawn[1]
    halves = [masked_batches(rows, 8, mask_fn, 0, torch.device("cpu"), shard=(r, 2), per_owner=(owners, 5))
              for r in range(2)]  # two ranks at half the batch: together the one-worker draw
    got = [index[np.pad(t.numpy(), (12 - len(t), 0)).tobytes()] for h in halves for b in h(1) for t in b["tokens"]]
    assert sorted(got) == sorted(drawn[1])


def test_finetune_schedule_counts_the_capped_rows(monkeypatch):
    import qbert.seqrec.stage as stage

    split = _long_histories()
    seen, original = {}, stage.build_scheduler

    def spy(opt, kind, total, warmup, min_ratio):
        seen["total"] = total
        return original(opt, kind, total, warmup, min_ratio)

    monkeypatch.setattr(stage, "build_scheduler", spy)
    model = build_model(SeqRecConfig(hidden=16, layers=1, heads=2, dropout=0.0), _codes(2400), 8, 12)
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=3e-3, patience=0, schedule="cosine", max_rows_per_user=5)
    res = finetune(model, split, cfg, seed=0, progress=False)
    rows, owners = training_rows_and_owners(split, 12, True)
    capped = int(np.minimum(np.bincount(owners), 5).sum())
    assert capped < len(rows) and seen["total"] == 2 * math.ceil(capped / 16)
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["loss"])


def test_pretrain_then_finetune_learns_planted_transitions():
    torch.manual_seed(0)
    ds, codes = _planted(num_users=300)
    split = LeaveOneOutSplit(ds, 12)
    cfg = SeqRecConfig(hidden=32, layers=2, heads=2, dropout=0.1)
    model = build_model(cfg, codes, 16, 12)
    before = evaluate_split(model, split, "valid")
    pre = pretrain(model, split.train_sequences(0, 1), PretrainConfig(epochs=2, batch_size=64, lr=2e-3),
                   seed=0, progress=False)
    assert pre is not None and len(pre.history) == 2
    assert pre.history[-1]["loss"] < pre.history[0]["loss"]
    res = finetune(model, split, FinetuneConfig(epochs=8, batch_size=64, lr=3e-3, patience=0), seed=0,
                   progress=False)
    after = evaluate_split(model, split, "test")
    # the next group is determined (5 candidate items): HR@10 near 1 once learned; random ~0.25
    assert after["HR@10"] > 0.8 and after["HR@10"] > before["HR@10"] + 0.4
    assert res.best_metrics["NDCG@10"] == max(h["NDCG@10"] for h in res.history)


def test_select_code_weight_picks_the_best_valid_weight_and_matches_evaluate_split():
    torch.manual_seed(0)
    ds, codes = _planted(num_users=120)
    split = LeaveOneOutSplit(ds, 12)
    model = build_model(SeqRecConfig(hidden=16, layers=1, heads=2, dropout=0.0, item_id='input_and_head', head='levels'), codes, 16, 12)
    finetune(model, split, FinetuneConfig(epochs=2, batch_size=64, lr=3e-3, patience=0), seed=0, progress=False)
    weights = [0.0, 0.5, 1.0, 3.0]
    for exclude in (False, True):
        best, table = select_code_weight(model, split, weights, batch_size=50, exclude_history=exclude)
        assert set(table) == set(weights) and model.code_score_weight == best
        assert table[best]["NDCG@10"] == max(m["NDCG@10"] for m in table.values())
        for w in (0.0, 3.0):  # every row equals a plain evaluation of valid at that weight
            model.code_score_weight = w
            plain = evaluate_split(model, split, "valid", exclude_history=exclude)
            assert all(abs(plain[k] - table[w][k]) < 1e-9 for k in table[w])
    no_id = build_model(SeqRecConfig(hidden=16, layers=1, heads=2), codes, 16, 12)
    with pytest.raises(ValueError, match="item-ID head"):
        select_code_weight(no_id, split, weights)
    with pytest.raises(ValueError, match=">= 0"):
        FinetuneConfig(select_code_weight=[-1.0])


def test_pretrain_rejects_out_of_catalogue_tokens_and_none_skips():
    ds, codes = _planted(num_users=20)
    model = build_model(SeqRecConfig(hidden=16, layers=1, heads=1), codes, 16, 12)
    with pytest.raises(ValueError, match="tokens must lie"):
        pretrain(model, np.full((2, 12), 99), PretrainConfig(epochs=1), progress=False)
    assert pretrain(model, np.ones((2, 12), np.int64), PretrainConfig(strategy="none"), progress=False) is None
    rows = LeaveOneOutSplit(ds, 12).train_sequences(0, 1)
    res = pretrain(model, rows, PretrainConfig(strategy="mlm", epochs=1, batch_size=8), progress=False)
    assert res is not None and np.isfinite(res.history[0]["code_loss"])


# ---------------------------------------------------------------------------- the paper's model
def test_default_model_has_no_item_indexed_tensor_and_its_size_does_not_grow_with_the_catalogue():
    small = build_model(SeqRecConfig(hidden=16, layers=1, heads=2), _codes(30), 8, 10)
    large = build_model(SeqRecConfig(hidden=16, layers=1, heads=2), _codes(300), 8, 10)
    assert small.item_indexed_parameters() == [] and small.head == "catalogue" and small.item_id == "none"
    # what the model is (its saved tensors, less the catalogue's own code table) has one shape for
    # every catalogue size; the prefix rows it trains are the catalogue's share of fixed-size tables
    shapes = lambda m: {k: tuple(p.shape) for k, p in m.state_dict().items() if k not in m.catalogue_keys()}  # noqa: E731
    assert shapes(small) == shapes(large)
    trained = lambda m: {k: tuple(p.shape) for k, p in m.named_parameters() if not k.startswith("prefix.")}  # noqa: E731
    assert trained(small) == trained(large)
    for m in (small, large):
        assert m.prefix.out.shape[0] == len(torch.unique(m.item_buckets)) <= m.prefix_buckets
    hybrid = _model(True)
    assert set(hybrid.item_indexed_parameters()) == {"item_emb.weight", "item_bias"}
    assert trained(build_model(SeqRecConfig(hidden=16, layers=1, heads=2, item_id="input"), _codes(30), 8, 10)) != \
        trained(build_model(SeqRecConfig(hidden=16, layers=1, heads=2, item_id="input"), _codes(300), 8, 10))


def test_catalogue_head_scores_are_the_log_softmax_over_composed_semantic_id_embeddings():
    torch.manual_seed(0)
    m = QBert4Rec(_codes(), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10, repeat_bias=True)
    state = m.state_dict()  # non-zero prefix tables and repeat weight, so every term is exercised
    for name in ("prefix.inp_table", "prefix.out_table", "prefix.out_bias_table"):
        state[name].normal_(0, 0.1)
    state["repeat_raw"].fill_(0.2)
    m.load_state_dict(state)  # loading refreshes the compact trained rows from the tables
    m.eval()
    hist = _tokens(B=4, L=9)
    with torch.no_grad():
        scores = m.score(hist)
        inp = m.append_mask(hist)
        q = m.out_transform(m(inp)[:, -1])
        for b in range(4):
            seen = {int(t) - 1 for t in inp[b] if 0 < int(t) <= m.num_items}
            logits = []
            for item in range(m.num_items):
                c = m.codes[item]
                vec = sum(m.code_out[lev, c[lev]] for lev in range(m.K))
                bias = sum(m.code_bias[lev, c[lev]] for lev in range(m.K))
                for j, n in enumerate(m.prefix_lengths):
                    bucket = int(m.item_buckets[item, j])
                    vec = vec + state["prefix.out_table"][bucket]
                    bias = bias + state["prefix.out_bias_table"][bucket]
                logits.append(float(q[b] @ vec + bias) + (2.0 if item in seen else 0.0))
            torch.testing.assert_close(scores[b], torch.log_softmax(torch.tensor(logits), 0), atol=1e-4, rtol=1e-4)
    assert torch.allclose(scores.exp().sum(1), torch.ones(4), atol=1e-4)  # a distribution over the catalogue's IDs
    m.train()
    tok = _tokens()
    loss, logs = m.masked_loss(tok, masks.random_mask(tok != 0, 0.3, torch.Generator().manual_seed(0)))
    assert set(logs) == {"code_loss", "item_loss"}
    loss.backward()
    for name in ("prefix.inp", "prefix.out", "prefix.out_bias", "code_out", "repeat_raw"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    assert float(m.prefix.inp.grad[m.prefix.blank].abs().sum()) == 0  # padding/[MASK] row never trains


def test_tied_prefix_rows_are_the_input_rows_in_the_item_vectors():
    """``tie_prefix``: an item's output prefix rows are its input rows (one table, trained from the
    input and the item softmax), its prefix biases stay separate, and the state round-trips."""
    torch.manual_seed(0)
    m = QBert4Rec(_codes(), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10, tie_prefix=True)
    state = m.state_dict()
    assert "prefix.out_table" not in state and m.prefix.out is None
    for name in ("prefix.inp_table", "prefix.out_bias_table"):
        state[name].normal_(0, 0.1)
    m.load_state_dict(state)
    with torch.no_grad():
        vec, bias = m.item_vectors()
        for item in (0, 7, 29):
            c, rows = m.codes[item], m.item_buckets[item]
            expect = sum(m.code_out[lev, c[lev]] for lev in range(m.K)) + state["prefix.inp_table"][rows].sum(0)
            torch.testing.assert_close(vec[item], expect)
            torch.testing.assert_close(bias[item], sum(m.code_bias[lev, c[lev]] for lev in range(m.K))
                                       + state["prefix.out_bias_table"][rows].sum())
    # rows of items that are never an input: untied, the input table gets no gradient there;
    # tied, the item softmax trains them
    tok = _tokens()
    mask = masks.random_mask(tok != 0, 0.3, torch.Generator().manual_seed(0))
    inputs = tok[(tok != 0) & ~mask].unique() - 1
    never_input = torch.ones(m.prefix.blank, dtype=torch.bool)
    never_input[m.item_prefix_rows[inputs].unique()] = False
    assert never_input.any()
    untied = QBert4Rec(_codes(), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10)
    for model, trained in ((m, True), (untied, False)):
        loss, _ = model.masked_loss(tok, mask)
        loss.backward()
        grad = model.prefix.inp.grad
        assert (float(grad[: model.prefix.blank][never_input].abs().sum()) > 0) == trained
        assert float(grad[model.prefix.blank].abs().sum()) == 0 and model.prefix.out_bias.grad.abs().sum() > 0
    again = QBert4Rec(_codes(), num_codes=8, hidden=16, layers=2, heads=2, dropout=0.0, max_len=10, tie_prefix=True)
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again.item_vectors()[0], m.item_vectors()[0])
    with pytest.raises(RuntimeError, match="out_table"):  # neither way round between tied and untied
        again.load_state_dict(untied.state_dict())
    with pytest.raises(RuntimeError, match="out_table"):
        untied.load_state_dict(again.state_dict())
    for bad in ({"head": "levels"}, {"prefix_lengths": []}):
        with pytest.raises(ValueError, match="tie_prefix"):
            QBert4Rec(_codes(), num_codes=8, hidden=16, layers=1, heads=2, max_len=10, tie_prefix=True, **bad)


def test_prefix_buckets_are_deterministic_shared_by_equal_prefixes_and_configurable():
    from qbert.seqrec.qbert4rec import prefix_hash

    codes = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 2, 3]])
    b = prefix_hash(codes, [2, 3], 1000)
    assert b[0, 0] == b[1, 0] and b[0, 1] != b[1, 1] and b[0, 0] != b[2, 0]
    assert torch.equal(b, prefix_hash(codes.clone(), [2, 3], 1000)) and int(b.max()) < 1000
    assert prefix_hash(codes, [], 10).shape == (3, 0)
    m = QBert4Rec(_codes(), num_codes=8, hidden=16, layers=1, heads=2, max_len=10, prefix_lengths=[], prefix_buckets=7)
    assert m.prefix is None
    with pytest.raises(ValueError, match="prefix_lengths"):
        QBert4Rec(_codes(), num_codes=8, hidden=16, layers=1, heads=2, max_len=10, prefix_lengths=[1])
    with pytest.raises(ValueError, match="item_id"):
        QBert4Rec(_codes(), num_codes=8, hidden=16, layers=1, heads=2, max_len=10, item_id="yes")


def _cold_start_bench():
    """benchmarks/prefix_cold_start.py, whose planted data and runner this test shares."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefix_cold_start.py"
    spec = importlib.util.spec_from_file_location("bench_prefix_cold_start", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_new_items_are_ranked_well_by_the_semantic_id_model_and_not_by_the_item_id_model():
    bench = _cold_start_bench()
    base = {"hidden": 32, "layers": 1, "heads": 2, "dropout": 0.0, "new_items": "own"}  # composed scores alone
    hr = {name: float((bench.new_item_ranks(SeqRecConfig(**base, **extra), seed=0) < 10).float().mean())
          for name, extra in {"semantic_ids": {}, "item_ids": {"item_id": "input_and_head", "head": "levels",
                                                                "code_score_weight": 0.0}}.items()}
    # 80 items, 2 new per cluster: the right cluster's new items are reachable only through their codes
    assert hr["semantic_ids"] >= 0.8, hr
    assert hr["item_ids"] <= 0.3, hr


def test_untrained_items_back_off_to_the_trained_items_sharing_their_first_code():
    torch.manual_seed(0)
    codes = _codes(n=30)
    codes[25:, 0] = 7
    codes[:25, 0] = codes[:25, 0] % 7  # first code 7: items 25..29 only, none of them trained
    m = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10,
                  new_items="backoff", new_item_weight=0.3, new_item_offset=1.2).eval()
    hist = torch.randint(1, 31, (4, 6), generator=torch.Generator().manual_seed(1))
    own = m.score(hist)  # every item trained until told otherwise: the paper's rule
    trained = torch.ones(30, dtype=torch.bool)
    trained[[3, 11, 25, 26, 27, 28, 29]] = False
    m.set_trained_items(trained.nonzero()[:, 0])
    got = m.score(hist)
    torch.testing.assert_close(got[:, trained], own[:, trained])  # trained items: unchanged
    torch.testing.assert_close(got[:, 25:], own[:, 25:])  # no trained item shares their first code
    p = own.exp()
    for i in (3, 11):  # brute force: the mean probability of the trained items of its first code
        peers = [j for j in range(30) if trained[j] and codes[j, 0] == codes[i, 0]]
        want = 0.7 * torch.log(p[:, peers].mean(1)) + 0.3 * own[:, i] + 1.2
        torch.testing.assert_close(got[:, i], want)
    # the record travels with the weights; a state saved before it existed keeps the model's own
    fresh = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10,
                      new_items="backoff", new_item_weight=0.3, new_item_offset=1.2).eval()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.score(hist), got)
    old = {k: v for k, v in m.state_dict().items() if k != "trained_items"}
    fresh.load_state_dict(old)
    assert bool(fresh.trained_items.equal(trained))
    m.new_items = "own"  # the paper's rule: every item by its own composed score
    torch.testing.assert_close(m.score(hist), own)
    with pytest.raises(ValueError, match="new_items"):
        QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, max_len=10, new_items="mean")


def test_the_content_term_adds_the_cosine_of_a_new_items_content_to_the_historys():
    torch.manual_seed(0)
    codes = _codes(n=30)
    kw = {"num_codes": 8, "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_len": 10,
          "new_items": "backoff", "new_item_weight": 0.3, "new_item_offset": 1.2}
    m = QBert4Rec(codes, **kw, new_item_content=2.5).eval()
    plain = QBert4Rec(codes, **kw).eval()
    plain.load_state_dict(m.state_dict())
    trained = torch.ones(30, dtype=torch.bool)
    trained[[3, 11, 17]] = False
    for model in (m, plain):
        model.set_trained_items(trained.nonzero()[:, 0])
    hist = torch.randint(1, 31, (4, 6), generator=torch.Generator().manual_seed(1))
    hist[0, :3] = 0  # left padding carries no content
    with pytest.raises(ValueError, match="set_item_content"):
        m.score(hist)
    content = torch.randn(30, 5)
    m.set_item_content(content)
    got, base = m.score(hist), plain.score(hist)
    torch.testing.assert_close(got[:, trained], base[:, trained])  # trained items: unchanged
    unit = F.normalize(content, dim=1)
    for b in range(4):  # brute force: the history's items, as the model sees them (the last max_len - 1)
        items = [int(t) - 1 for t in hist[b, -(10 - 1):] if t > 0]
        profile = F.normalize(unit[items].sum(0), dim=0)
        for i in (3, 11, 17):
            torch.testing.assert_close(got[b, i], base[b, i] + 2.5 * (unit[i] @ profile))
    m.set_catalogue(_codes(n=31))  # another catalogue: its content must be given again
    assert m.item_content is None
    with pytest.raises(ValueError, match="one row per catalogue item"):
        m.set_item_content(torch.randn(30, 5))
    with pytest.raises(ValueError, match="new_item_content"):
        QBert4Rec(codes, **kw, new_item_content=-1.0)


def test_the_backoff_to_content_neighbours_takes_the_mean_p_of_the_k_nearest_trained_items():
    torch.manual_seed(0)
    codes = _codes(n=30)
    codes[:, 0] %= 7
    codes[11, 0] = 7  # item 11's first code is its own: the first-code rule leaves it its own score
    kw = {"num_codes": 8, "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_len": 10}
    # own: the paper's rule, the log P the backoff replaces
    m, own, trained, hist = _rule_and_plain(codes, kw, new_items="backoff", new_item_weight=0.3,
                                            new_item_offset=1.2, new_item_neighbours=3)
    new = NEW
    with pytest.raises(ValueError, match="set_item_content"):
        m.score(hist)
    content = torch.randn(30, 5)
    content[25] = 3.0 * content[7]  # item 25's nearest trained item is item 7 (cosine 1)
    m.set_item_content(content)
    got, log_p = m.score(hist), own.score(hist)
    torch.testing.assert_close(got[:, trained], log_p[:, trained])  # trained items: unchanged
    unit = F.normalize(content, dim=1)
    peers = trained.nonzero()[:, 0]
    for i in new:  # brute force: every untrained item, whatever its first code
        nearest = peers[torch.argsort(unit[peers] @ unit[i], descending=True)[:3]]
        if i == 25:
            assert int(nearest[0]) == 7
        share = torch.log(log_p[:, nearest].exp().mean(1))
        torch.testing.assert_close(got[:, i], 0.7 * share + 0.3 * log_p[:, i] + 1.2)
    new_items = torch.tensor(new)
    near = m.content_neighbours(new_items)
    m.set_item_content(content)  # forgets the neighbours: found again in parts of one item, the same
    assert torch.equal(m.content_neighbours(new_items, chunk=1), near)
    torch.testing.assert_close(m.neighbour_log_share(log_p, new_items, budget=1),
                               m.neighbour_log_share(log_p, new_items))  # one item per part, the same
    m.new_item_neighbours = 100  # more than are trained: all trained items
    torch.testing.assert_close(m.score(hist)[:, 3],
                               0.7 * torch.log(log_p[:, peers].exp().mean(1)) + 0.3 * log_p[:, 3] + 1.2)
    m.new_item_neighbours = 1
    trained[7] = False  # a new record of trained items: item 25's nearest trained item is another one
    for model in (m, own):
        model.set_trained_items(trained.nonzero()[:, 0])
    got, log_p, peers = m.score(hist), own.score(hist), trained.nonzero()[:, 0]
    nearest = peers[torch.argmax(unit[peers] @ unit[25])]
    torch.testing.assert_close(got[:, 25], 0.7 * log_p[:, nearest] + 0.3 * log_p[:, 25] + 1.2)
    blank = content.clone()
    blank[17] = 0.0  # an item without content backs off to its first code
    m.set_item_content(blank)
    mates = peers[codes[peers, 0] == codes[17, 0]]
    torch.testing.assert_close(m.score(hist)[:, 17],
                               0.7 * torch.log(log_p[:, mates].exp().mean(1)) + 0.3 * log_p[:, 17] + 1.2)
    with pytest.raises(ValueError, match="new_item_neighbours"):
        QBert4Rec(codes, **kw, new_item_neighbours=-1)
    with pytest.raises(ValueError, match="new_item_neighbours"):
        SeqRecConfig(new_items="own", new_item_neighbours=5)


def test_the_backoff_can_read_its_peers_p_before_the_learned_repeat_shift():
    torch.manual_seed(0)
    codes = _codes(n=30)
    codes[:, 0] %= 5
    kw = {"num_codes": 8, "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_len": 10, "repeat_bias": True}
    m, own, trained, hist = _rule_and_plain(codes, kw, new_items="backoff", new_item_weight=0.3,
                                            new_item_offset=1.2, new_item_peers_before_repeat=True)
    new = NEW
    with torch.no_grad():
        for model in (m, own):
            model.repeat_raw.fill_(-0.4)  # a learned shift of -4 nats on the history's items
    hist[0, -1] = 4  # token 4 = new item 3 in a history: it keeps its own (shifted) score as its own part
    seen = torch.zeros(4, 30).scatter_(1, hist - 1, 1.0)
    got, log_p = m.score(hist), own.score(hist)
    torch.testing.assert_close(got[:, trained], log_p[:, trained])  # trained items: unchanged
    unshifted = log_p + 4.0 * seen
    peers = trained.nonzero()[:, 0]
    for i in new:  # brute force, the first-code rule
        mates = peers[codes[peers, 0] == codes[i, 0]]
        share = torch.log(unshifted[:, mates].exp().mean(1))
        torch.testing.assert_close(got[:, i], 0.7 * share + 0.3 * log_p[:, i] + 1.2)
    assert (seen[:, peers].sum(1) > 0).all()  # every row has a history peer: the reading matters
    m.new_item_peers_before_repeat = False
    assert not torch.allclose(m.score(hist)[:, new], got[:, new])
    m.new_item_peers_before_repeat, m.new_item_neighbours = True, 3  # and the content neighbours' share
    content = torch.randn(30, 5)
    m.set_item_content(content)
    unit = F.normalize(content, dim=1)
    got = m.score(hist)
    for i in new:
        nearest = peers[torch.argsort(unit[peers] @ unit[i], descending=True)[:3]]
        share = torch.log(unshifted[:, nearest].exp().mean(1))
        torch.testing.assert_close(got[:, i], 0.7 * share + 0.3 * log_p[:, i] + 1.2)
    with pytest.raises(ValueError, match="new_item_peers_before_repeat"):
        SeqRecConfig(new_items="backoff", new_item_peers_before_repeat=True)  # no repeat shift to take off
    with pytest.raises(ValueError, match="new_item_peers_before_repeat"):
        SeqRecConfig(new_items="own", repeat_bias=True, new_item_peers_before_repeat=True)
    with pytest.raises(ValueError, match="new_item_peers_before_repeat"):  # the hybrid ranks new items by its ID head
        SeqRecConfig(new_items="backoff", repeat_bias=True, item_id="input_and_head", new_item_peers_before_repeat=True)
    assert SeqRecConfig(new_items="backoff", repeat_bias=True, new_item_peers_before_repeat=True)


def test_pseudo_new_items_are_scored_without_their_own_prefix_rows():
    torch.manual_seed(0)
    codes = _codes(n=30, K=4)
    codes[:8, :3] = codes[0, :3]  # items 0..7 share their 3-prefix: no row of it is specific to one of them
    m = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10)
    with torch.no_grad():
        m.prefix.out.normal_()
        m.prefix.out_bias.normal_()
    m.set_trained_items(torch.arange(20))  # items 20..29 have no training rows: their rows are untrained
    rows, specific = m.item_prefix_rows, m.item_specific_rows()
    for i in range(30):  # brute force: a row is specific when no other trained item's rows use it
        for p in range(rows.shape[1]):
            others = [j for j in range(20) if j != i and bool((rows[j] == rows[i, p]).any())]
            assert bool(specific[i, p]) == (not others), (i, p)
    assert not specific[:8, 1].any() and specific[8:20].any()
    m.trained_items[1:8] = False  # the record changed in place: the cache follows it
    assert m.item_specific_rows()[0, 1]  # item 0 is now the only trained item with that 3-prefix
    m.set_trained_items(torch.arange(20))
    h = torch.randn(5, 16)
    plain = F.linear(m.out_transform(h), *m.item_vectors())
    drop = torch.rand(30, generator=torch.Generator().manual_seed(3)) < 0.5
    got = m.catalogue_logits(h, pseudo_new=drop)
    keep = (~(specific & drop[:, None])).float()
    torch.testing.assert_close(got, F.linear(m.out_transform(h), *m.item_vectors(keep)))
    changed = (got - plain).abs().amax(0) > 1e-6
    assert changed.any() and changed.equal((specific & drop[:, None]).any(1))  # only the drawn items' own rows
    torch.testing.assert_close(m.catalogue_logits(h), plain)  # without a draw (ranking): every row
    # an item whose two prefix lengths hash to one row still holds that row alone
    one = QBert4Rec(codes[:3], num_codes=8, hidden=16, layers=1, heads=2, max_len=10, prefix_buckets=1)
    one.set_trained_items(torch.tensor([0]))
    assert one.item_specific_rows()[0].all() and not one.item_specific_rows()[1:].any()


def test_finetune_with_pseudo_new_items_trains_draws_per_global_batch_and_leaves_ranking_untouched():
    torch.manual_seed(0)
    ds, codes = _planted(num_users=200)
    codes = np.concatenate([codes, np.arange(40)[:, None] % 4], 1)  # K = 4: prefix tables of lengths 2, 3
    split = LeaveOneOutSplit(ds, 12)
    rows = training_rows(split, 12, True)
    mask_fn = lambda valid, g: masks.finetune_mask(valid, 0.3, 0.5, g)  # noqa: E731
    plain = list(masked_batches(rows, 64, mask_fn, 0, torch.device("cpu"))(1))
    drawn = list(masked_batches(rows, 64, mask_fn, 0, torch.device("cpu"), pseudo_new=(0.3, 40))(1))
    again = list(masked_batches(rows, 64, mask_fn, 0, torch.device("cpu"), pseudo_new=(0.3, 40))(1))
    assert all(a["mask"].equal(b["mask"]) for a, b in zip(plain, drawn))  # the masks' draws are unchanged
    assert all(a["pseudo_new"].equal(b["pseudo_new"]) for a, b in zip(drawn, again))  # seeded, rank-free
    share = torch.stack([b["pseudo_new"] for b in drawn]).float().mean().item()
    assert 0.2 < share < 0.4 and not drawn[0]["pseudo_new"].equal(drawn[1]["pseudo_new"])
    model = build_model(SeqRecConfig(hidden=32, layers=2, heads=2, dropout=0.1), codes, 16, 12)
    res = finetune(model, split, FinetuneConfig(epochs=8, batch_size=64, lr=3e-3, patience=0, pseudo_new=0.3),
                   seed=0, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert evaluate_split(model, split, "test")["HR@10"] > 0.6  # 5 candidates of the next group; random 0.25


def test_sampled_candidates_hold_the_targets_and_uniform_others_of_the_pool():
    pool = torch.arange(0, 400, 2)  # the seen items
    targets = torch.tensor([4, 4, 10, 398])
    a = sampled_candidates(targets, pool, 100, torch.Generator().manual_seed(0))
    b = sampled_candidates(targets, pool, 100, torch.Generator().manual_seed(0))
    c = sampled_candidates(targets, pool, 100, torch.Generator().manual_seed(1))
    assert a.equal(b) and not a.equal(c)  # seeded by the generator
    assert len(a) == 128 and a.equal(torch.unique(a)) and bool(torch.isin(targets, a).all())  # sorted, distinct
    assert bool(torch.isin(a, pool).all())
    assert len(sampled_candidates(targets, pool, 1000, torch.Generator())) == 200  # the pool runs out
    # uniform: over many draws every non-target item of the pool is drawn about equally often
    counts = torch.zeros(400)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        counts[sampled_candidates(targets, pool, 60, g)] += 1
    others = counts[pool[~torch.isin(pool, targets)]]
    assert others.min() > 0.2 * 300 and others.max() < 0.45 * 300  # expectation (64 - 3) / 197 = 0.31
    # a large pool: i.i.d. draws kept in order of first draw (no permutation of the pool), still uniform
    big, hits = torch.arange(10_000), torch.zeros(10)
    for _ in range(300):
        c = sampled_candidates(targets, big, 60, g)
        assert len(c) == 64 and c.equal(torch.unique(c)) and bool(torch.isin(targets, c).all())
        hits += torch.bincount(c[~torch.isin(c, targets)] // 1000, minlength=10)
    assert bool(((hits - 300 * 61 / 10).abs() < 0.1 * 300 * 61 / 10).all()), hits  # 10 bins of 1,000 items


def test_sampled_softmax_is_the_cross_entropy_over_the_batch_candidates_and_shared_by_ranks():
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (80, 3), generator=torch.Generator().manual_seed(1))
    m = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10, repeat_bias=True,
                  prefix_bias=True, code_loss_weight=0.0).eval()
    with torch.no_grad():  # biases of the sequence's items and prefixes, computed for the candidates only
        m.repeat_raw.fill_(-0.5)
        m.prefix_raw.copy_(torch.tensor([0.3, 0.2]))
    tok = torch.randint(1, 81, (5, 10), generator=torch.Generator().manual_seed(2))
    mask = masks.random_mask(tok != 0, 0.4, torch.Generator().manual_seed(3))
    cand = sampled_candidates(tok[mask] - 1, torch.arange(80), 8, torch.Generator().manual_seed(4), multiple=4)
    assert len(cand) < 40
    loss, _ = m.masked_loss(tok, mask, candidates=cand)
    inp = tok.masked_fill(mask, m.mask_token)
    full = m.item_logits(m(inp)[mask], inp[mask.nonzero()[:, 0]])  # [M, 80]
    want = F.cross_entropy(full[:, cand], torch.searchsorted(cand, tok[mask] - 1))
    torch.testing.assert_close(loss, want)
    # in batches: every global batch's candidates hold its targets; both ranks get the same ones
    rows = tok.numpy()
    fn = lambda valid, g: masks.random_mask(valid, 0.4, g)  # noqa: E731
    one = list(masked_batches(rows, 4, fn, 0, torch.device("cpu"), sampled=(np.arange(80), 8))(0))
    plain = list(masked_batches(rows, 4, fn, 0, torch.device("cpu"))(0))
    ranks = [list(masked_batches(rows, 2, fn, 0, torch.device("cpu"), shard=(r, 2), sampled=(np.arange(80), 8))(0))
             for r in range(2)]
    for b, p, r0, r1 in zip(one, plain, *ranks):
        assert b["mask"].equal(p["mask"])  # the masks' draws are unchanged
        assert bool(torch.isin(b["tokens"][b["mask"]] - 1, b["candidates"]).all())
        assert r0["candidates"].equal(b["candidates"]) and r1["candidates"].equal(b["candidates"])


def test_finetune_with_a_sampled_softmax_learns_planted_transitions():
    torch.manual_seed(0)
    ds, codes = _planted(num_users=400, n=200)  # 25 items per group: 64 candidates of 200 per batch
    split = LeaveOneOutSplit(ds, 12)
    model = build_model(SeqRecConfig(hidden=32, layers=2, heads=2, dropout=0.1), codes, 32, 12)
    res = finetune(model, split, FinetuneConfig(epochs=8, batch_size=64, lr=3e-3, patience=0, negatives="sampled",
                                                num_negatives=16), seed=0, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    # the next group holds 25 items: HR@10 at most about 0.4; random 0.05 (the full softmax: 0.42)
    assert evaluate_split(model, split, "test")["HR@10"] > 0.3


def _content_cold_start_ranks(content_dim: int, pseudo_new: float, seed: int = 0) -> torch.Tensor:
    """Ranks of the planted new test targets (benchmarks/prefix_cold_start.py's data) when the
    semantic IDs say nothing of the cluster (codes shuffled across items) and only the content does."""
    from qbert.eval.metrics import target_ranks

    bench = _cold_start_bench()
    codes, train, hist, tgt, n = bench.planted_cold_start(seed)
    rng = np.random.default_rng(seed)
    codes = codes[rng.permutation(n)]  # an item's codes now belong to a random item of any cluster
    cluster = np.arange(n) // bench.PER
    content = np.eye(bench.CLUSTERS, dtype=np.float32)[cluster] + 0.1 * rng.standard_normal((n, 8)).astype(np.float32)
    torch.manual_seed(seed)
    model = build_model(SeqRecConfig(hidden=32, layers=1, heads=2, dropout=0.0, new_items="own",
                                     content_dim=content_dim), codes, 8, 10)
    model.set_item_content(torch.as_tensor(content))
    split = LeaveOneOutSplit(from_sequences("cold", train, n), 10)
    finetune(model, split, FinetuneConfig(epochs=15, batch_size=64, lr=3e-3, patience=0, precision="fp32",
                                          pseudo_new=pseudo_new), seed=seed, progress=False)
    model.eval()
    with torch.no_grad():
        return target_ranks(model.score(torch.as_tensor(hist)), torch.as_tensor(tgt))


def test_the_content_map_of_the_item_vectors_ranks_new_items_by_their_content():
    """content_dim: a map shared by all items from content to item vectors (no item-indexed
    parameter) carries new items whose semantic IDs say nothing; without it they stay unreachable."""
    with_content = _content_cold_start_ranks(16, 0.2)
    without = _content_cold_start_ranks(0, 0.2)
    hr = {"content": float((with_content < 10).float().mean()), "none": float((without < 10).float().mean())}
    # 80 items, 2 new per cluster of 10: ranking new items at random puts about 12% in a top 10
    assert hr["content"] >= 0.6, hr
    assert hr["none"] <= 0.3, hr


def test_the_content_map_starts_at_zero_is_shared_and_needs_the_content():
    torch.manual_seed(0)
    codes = _codes(n=30)
    kw = {"num_codes": 8, "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_len": 10}
    m, plain = QBert4Rec(codes, **kw, content_dim=6).eval(), QBert4Rec(codes, **kw).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("content_out")})
    hist = torch.randint(1, 31, (4, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="set_item_content"):
        m.score(hist)
    content = torch.randn(30, 40)  # wider than content_dim: randomly projected
    m.set_item_content(content)
    assert m.uses_content and m.content_reduced.shape == (30, 6)
    torch.testing.assert_close(m.score(hist), plain.score(hist))  # zero at start: the model without content
    with torch.no_grad():
        m.content_out.weight.normal_()
    vec, bias = m.item_vectors()
    base_vec, base_bias = plain.item_vectors()
    extra = m.content_out(m.content_reduced)
    torch.testing.assert_close(vec, base_vec + extra[:, :-1])
    torch.testing.assert_close(bias, base_bias + extra[:, -1])
    assert m.item_indexed_parameters() == [] and m.content_out.weight.shape == (17, 6)  # not per item
    # the projection is fixed by the content's width: a larger catalogue reads old items as before
    first = m.content_reduced.clone()
    m.set_catalogue(_codes(n=31))
    assert m.content_reduced is None
    m.set_item_content(torch.cat([content, torch.randn(1, 40)]))
    torch.testing.assert_close(m.content_reduced[:30], first)
    with pytest.raises(ValueError, match="content_dim"):
        QBert4Rec(codes, **kw, content_dim=4, head="levels")
    with pytest.raises(ValueError, match="content_dim"):
        SeqRecConfig(content_dim=8, head="levels")
    with pytest.raises(ValueError, match="content_dim"):  # the item-ID head, not the catalogue head, is trained
        SeqRecConfig(content_dim=8, item_id="input_and_head")
    from qbert.config import ConfigError
    from qbert.pipeline import quickstart_config

    with pytest.raises((ConfigError, ValueError), match="content_dim"):  # no content to read
        quickstart_config().override({"data.modalities": ["id"], "model.content_dim": 8})


def test_the_mixture_rule_scores_log_probabilities_of_known_then_new_items():
    torch.manual_seed(0)
    codes = _codes(n=30)
    kw = {"num_codes": 8, "hidden": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_len": 10}
    m, plain, trained, hist = _rule_and_plain(codes, kw, new_items="mixture", new_item_share=0.2,
                                              new_item_temperature=3.0, new_item_recency=1.5, new_item_cluster=0.5)
    new = NEW
    hist[0, :3] = 0  # left padding carries no content
    hist[1, 2] = 11 + 1  # a new item already in the history
    nine = torch.tensor([[1, 2, 5, 6, 7, 8, 9, 10, 14]])  # known items only (tokens = item + 1)
    long = torch.cat([torch.tensor([[17 + 1]]), nine], 1)  # new item 17 only where the model does not read
    content = torch.randn(30, 5)
    m.set_item_content(content)
    got, base = m.score(hist), plain.score(hist)
    # a distribution over the catalogue: known items share 1 - pi, new items pi
    torch.testing.assert_close(got[:, trained].exp().sum(1), torch.full((4,), 0.8))
    seen_new = [sorted({int(t) - 1 for t in hist[b] if t > 0} & set(new)) for b in range(4)]
    unseen_mass = torch.stack([got[b, [i for i in new if i not in seen_new[b]]].exp().sum() for b in range(4)])
    torch.testing.assert_close(unseen_mass, torch.full((4,), 0.2))
    # known items keep the model's order and ratios
    want_known = base[:, trained] - torch.logsumexp(base[:, trained], 1, keepdim=True) + math.log(0.8)
    torch.testing.assert_close(got[:, trained], want_known)
    unit = F.normalize(content, dim=1)
    p = base.exp()
    for b in range(4):  # brute force: new items by a softmax of the weighted content cosines and cluster share
        items = [int(t) - 1 for t in hist[b, -(10 - 1):] if t > 0]
        profile = F.normalize(unit[items].sum(0), dim=0)
        cand = [i for i in new if i not in seen_new[b]]
        share = []
        for i in cand:  # the mean probability of the trained items of its first code (all trained: none)
            peers = [j for j in range(30) if trained[j] and codes[j, 0] == codes[i, 0]] or trained.nonzero()[:, 0].tolist()
            share.append(torch.log(p[b, peers].mean()))
        logits = 3.0 * (unit[cand] @ profile) + 1.5 * (unit[cand] @ unit[items[-1]]) + 0.5 * torch.stack(share)
        torch.testing.assert_close(got[b, cand], math.log(0.2) + torch.log_softmax(logits, 0))
        for i in seen_new[b]:  # a new item the user already had ranks below every other item
            assert got[b, i] < got[b, [j for j in range(30) if j != i]].min()
    assert seen_new[1] == [11]
    # the model reads the last max_len - 1 items: item 17 beyond them is not "already had"
    torch.testing.assert_close(m.score(long), m.score(nine))
    assert m.score(torch.cat([nine[:, 1:], torch.tensor([[17 + 1]])], 1))[0, 17] < -1e3  # read: at the floor
    with pytest.raises(ValueError, match="new_item_share"):
        QBert4Rec(codes, **kw, new_items="mixture", new_item_share=1.0)
    with pytest.raises(ValueError, match="mixture"):
        SeqRecConfig(new_items="mixture", item_id="input_and_head")
    from qbert.config import ConfigError
    from qbert.pipeline import quickstart_config

    with pytest.raises((ConfigError, ValueError), match="mixture"):  # no content to read
        quickstart_config().override({"data.modalities": ["id"], "model.new_items": "mixture"})


def test_the_mixture_is_fitted_on_valid_by_likelihood():
    """pi is the share of valid targets that are new; tau recovers the sharpness of planted data."""
    from qbert.seqrec.new_items import fit_mixture

    rng = np.random.default_rng(0)
    n_items, users, dim = 40, 400, 8
    content = rng.standard_normal((n_items, dim)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    new = np.arange(30, 40)  # untrained items
    # each user's history holds 3 known items; the valid target is new for 30% of users, drawn by a
    # softmax of tau_true x cosine to the history's content
    tau_true = 6.0
    hist = rng.integers(0, 30, (users, 3))
    profile = content[hist].sum(1)
    profile /= np.linalg.norm(profile, axis=1, keepdims=True)
    logits = tau_true * profile @ content[new].T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    is_new = rng.random(users) < 0.3
    target = np.where(is_new, new[(p.cumsum(1) > rng.random((users, 1))).argmax(1)], rng.integers(0, 30, users))

    hist[0] = [new[0], 1, 2]  # a new target already in its history: counted in pi, not in tau's fit
    target[0] = new[0]
    is_new[0] = True

    class Split:  # the views fit_mixture reads
        num_items = n_items

        def targets(self, which):
            return target

        def history(self, which, pad, shift, max_len=None):
            return hist + shift

    codes = _codes(n=n_items)
    m = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10)
    m.set_trained_items(np.arange(30))
    m.set_item_content(torch.as_tensor(content))
    fit = fit_mixture(m, Split(), features=("new_item_temperature",))
    assert fit.share == pytest.approx(is_new.mean())
    assert fit.weights["new_item_recency"] == fit.weights["new_item_cluster"] == 0.0  # not fitted
    full = fit_mixture(m, Split())  # more features fit the same targets at least as well
    assert full.log_likelihood >= fit.log_likelihood - 1e-9 > fit.uniform_log_likelihood
    assert fit.new_targets == int(is_new.sum()) == fit.fitted_targets + 1
    tau_fit = fit.weights["new_item_temperature"]
    assert 3.0 < tau_fit < 12.0, fit  # the planted 6, from ~120 draws
    is_new[0] = False  # the fit is the maximum of the likelihood it reports, over the targets it fitted
    for tau in (tau_fit / 2, tau_fit * 2):
        m2 = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, dropout=0.0, max_len=10,
                       new_item_temperature=tau)
        m2.set_trained_items(np.arange(30))
        m2.set_item_content(torch.as_tensor(content))
        tokens = m2.append_mask(torch.as_tensor(hist[is_new] + 1))
        lp = m2.new_item_log_probs(torch.zeros(len(tokens), n_items), tokens, torch.as_tensor(new))
        col = np.searchsorted(new, target[is_new])
        assert float(lp[np.arange(len(col)), col].mean()) < fit.log_likelihood
    with pytest.raises(ValueError, match="no valid target"):
        m.set_trained_items(np.arange(n_items))
        fit_mixture(m, Split())
