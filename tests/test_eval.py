"""Full-ranking metrics: hand-computed cases, ties, history exclusion, batching, brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qbert.eval import METRIC_NAMES, evaluate_ranking, metrics_from_ranks, target_ranks
from qbert.eval.metrics import ndcg_at


def scores_with_target_at_rank(num_items: int, target: int, rank: int) -> torch.Tensor:
    """One score row in which exactly ``rank`` items beat ``target`` (distinct scores)."""
    others = [i for i in range(num_items) if i != target]
    order = others[:rank] + [target] + others[rank:]
    s = torch.empty(num_items)
    s[torch.tensor(order)] = torch.arange(num_items, 0, -1, dtype=torch.float)
    return s


def brute_force_metrics(scores: np.ndarray, targets: np.ndarray, histories: np.ndarray | None = None,
                        pad: int = -1) -> dict[str, float]:
    """Independent reference: per-user Python sort, pessimistic ties (target placed after equals)."""
    hr = {1: [], 5: [], 10: []}
    nd = {5: [], 10: []}
    for u in range(len(targets)):
        t = int(targets[u])
        banned = set()
        if histories is not None:
            banned = {int(i) for i in histories[u] if i != pad and int(i) != t}
        cand = [i for i in range(scores.shape[1]) if i not in banned]
        # sort descending by score; among equal scores put the target last (pessimistic)
        ranked = sorted(cand, key=lambda i: (-float(scores[u, i]), i == t))
        rank = ranked.index(t)
        for k in hr:
            hr[k].append(1.0 if rank < k else 0.0)
        for k in nd:
            nd[k].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    out = {f"HR@{k}": float(np.mean(v)) for k, v in hr.items()}
    out.update({f"NDCG@{k}": float(np.mean(v)) for k, v in nd.items()})
    return out


@pytest.mark.parametrize("rank", [0, 1, 3, 4, 5, 9, 10, 50])
def test_hand_computed_single_user(rank: int) -> None:
    n = 64
    s = scores_with_target_at_rank(n, target=7, rank=rank)
    r = target_ranks(s[None], torch.tensor([7]))
    assert int(r[0]) == rank
    m = metrics_from_ranks(r)
    assert m["HR@1"] == (1.0 if rank < 1 else 0.0)
    assert m["HR@5"] == (1.0 if rank < 5 else 0.0)
    assert m["HR@10"] == (1.0 if rank < 10 else 0.0)
    assert m["NDCG@5"] == pytest.approx(1.0 / math.log2(rank + 2) if rank < 5 else 0.0)
    assert m["NDCG@10"] == pytest.approx(1.0 / math.log2(rank + 2) if rank < 10 else 0.0)


def test_hand_computed_values() -> None:
    # rank 0 -> perfect; rank 3 -> 1/log2(5); the mean over users is a plain mean
    m = metrics_from_ranks(torch.tensor([0, 3]))
    assert m["HR@1"] == 0.5
    assert m["HR@5"] == 1.0
    assert m["NDCG@5"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 2)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 2)
    assert ndcg_at(3, 5) == pytest.approx(1 / math.log2(5))
    assert ndcg_at(5, 5) == 0.0
    assert set(m) == set(METRIC_NAMES)


def test_ties_are_pessimistic() -> None:
    # target tied with 4 other items at the top: counted behind all of them -> rank 4
    s = torch.zeros(1, 20)
    s[0, [2, 5, 7, 11, 13]] = 1.0
    for target in (2, 13):  # result must not depend on the item's position among the tied ones
        assert int(target_ranks(s, torch.tensor([target]))[0]) == 4
    # constant scores: the target is last, not credited by item order
    flat = torch.ones(3, 20)
    assert target_ranks(flat, torch.tensor([0, 5, 19])).tolist() == [19, 19, 19]
    m = metrics_from_ranks(target_ranks(flat, torch.tensor([0, 5, 19])))
    assert all(v == 0.0 for v in m.values())


def test_exclude_history_never_excludes_target() -> None:
    n = 12
    scores = torch.arange(n, 0, -1, dtype=torch.float)[None].repeat(2, 1)  # item i has rank i
    targets = np.array([6, 3])
    # histories hold items 0,1,2 (+ the target itself for user 1), stored shifted by +1, pad 0
    hist = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])

    def score_fn(h: torch.Tensor) -> torch.Tensor:
        return scores[: len(h)]

    keep = evaluate_ranking(score_fn, hist, targets, n, exclude_history=False)
    excl = evaluate_ranking(score_fn, hist, targets, n, exclude_history=True, history_pad=0, history_shift=1)
    # kept: ranks 6 and 3 ; excluded: user 0 loses items 0,1,2 -> rank 3 ; user 1 loses 0,1,2 (not 3) -> rank 0
    assert keep["HR@1"] == 0.0 and keep["NDCG@10"] == pytest.approx((ndcg_at(6, 10) + ndcg_at(3, 10)) / 2)
    assert excl["HR@1"] == 0.5
    assert excl["NDCG@10"] == pytest.approx((ndcg_at(3, 10) + ndcg_at(0, 10)) / 2)
    assert excl["users"] == keep["users"] == 2


def random_case(users: int = 53, items: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    # integer-valued scores make ties frequent
    scores = rng.integers(0, 12, size=(users, items)).astype(np.float32)
    targets = rng.integers(0, items, size=users)
    hist = rng.integers(0, items, size=(users, 6))
    hist[rng.random(hist.shape) < 0.3] = -1  # padding
    hist[:5, 0] = targets[:5]  # some histories contain the target
    return scores, targets, hist


def in_order_score_fn(scores: np.ndarray, histories: np.ndarray):
    """score_fn serving each user's row of ``scores`` by its history (the evaluator may reorder
    users, e.g. by history length); checks that every user is scored exactly once."""
    table = torch.as_tensor(scores)
    unserved = list(range(len(histories)))

    def fn(h: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in h.numpy():
            i = next(i for i in unserved if np.array_equal(histories[i], row))
            unserved.remove(i)
            rows.append(i)
        return table[rows]

    return fn


@pytest.mark.parametrize("exclude", [False, True])
def test_matches_brute_force_and_batching_invariant(exclude: bool) -> None:
    scores, targets, hist = random_case()
    users, items = scores.shape
    ref = brute_force_metrics(scores, targets, hist if exclude else None, pad=-1)
    for bs in (1, 7, users, 4 * users):
        res = evaluate_ranking(in_order_score_fn(scores, hist), hist, targets, items, batch_size=bs,
                               exclude_history=exclude, history_pad=-1, history_shift=0)
        assert res["users"] == users  # every user counted exactly once
        for k in METRIC_NAMES:
            assert res[k] == pytest.approx(ref[k], abs=1e-12), (bs, k, res[k], ref[k])


def test_exclusion_changes_results_on_random_case() -> None:
    """Guard for the test above: with these data, excluding history must matter."""
    scores, targets, hist = random_case()
    a = brute_force_metrics(scores, targets, hist, pad=-1)
    b = brute_force_metrics(scores, targets, None)
    assert a["NDCG@10"] > b["NDCG@10"]


def test_random_scores_against_brute_force_float() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(31, 25)).astype(np.float32)
    targets = rng.integers(0, 25, size=31)
    ranks = target_ranks(torch.as_tensor(scores), torch.as_tensor(targets))
    ref = brute_force_metrics(scores, targets)
    got = metrics_from_ranks(ranks)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_score_shape_checked() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranking(lambda h: torch.zeros(len(h), 3), np.zeros((4, 2), dtype=np.int64), np.zeros(4, dtype=np.int64), 5)


def test_target_concentration_by_hand():
    from qbert.eval.metrics import target_concentration

    ranks = np.array([0, 1, 50, 3, 100, 2, 200, 300, 400, 500])
    targets = np.array([7, 7, 7, 8, 9, 5, 9, 9, 9, 9])  # item 5 is not in the slice
    c = target_concentration(ranks, targets, np.array([7, 8, 9]))
    assert (c["users"], c["hits"], c["distinct_targets"]) == (9, 3, 3)
    assert c["most_frequent_target"] == {"item": 9, "users": 5, "hits": 0}
    assert c["most_hit_target"] == {"item": 7, "users": 3, "hits": 2}
    assert c["item_macro"]["HR@10"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert c["item_macro"]["NDCG@10"] == pytest.approx(((1 + 1 / np.log2(3)) / 3 + 1 / np.log2(5)) / 3)
    assert target_concentration(torch.as_tensor(ranks), targets, np.array([7, 8, 9])) == c
    assert target_concentration(ranks, targets, np.array([9]))["most_hit_target"] is None  # no hits
    assert target_concentration(ranks, targets, np.array([42])) == {"users": 0, "hits": 0, "distinct_targets": 0}
