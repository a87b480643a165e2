"""Collision reallocation of paper Sec. 3.4: make every item's semantic ID unique.

Items whose full code tuples collide are ranked by their minimum last-level distance; the
closest keeps the tuple. Every other item, in that order, is reassigned from the last
codebook upward: first its next-nearest codes at the last level (upper levels kept); when
the last level is exhausted, the next-nearest code one level up, with the levels below
re-filled nearest-first; and so on up to the first level. Candidate order comes from the
argsort of the distance tensor computed once on the trained model.

Unlike MQL4GRec's script (which stops after two rounds and can leave collisions), the
search covers the whole code space, so a free tuple is always found when
prod(sizes) >= #items; subtrees with no free tuple are skipped using per-prefix counts, so
a reassignment touches at most sum(sizes) candidates per level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qbert.quantize.config import check_capacity

DistanceSource = np.ndarray | Callable[[np.ndarray], np.ndarray]


@dataclass
class ReallocationInfo:
    collision_rate_before: float
    collision_rate_after: float
    colliding_items: int
    collision_groups: int
    reassigned: int
    max_group_size: int
    changed_from_level: list[int] = field(default_factory=list)  # reassigned items by shallowest changed level

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def collision_rate(codes: np.ndarray) -> float:
    """(#items - #distinct tuples) / #items, the rate MQL4GRec and the paper report."""
    n = codes.shape[0]
    return 0.0 if n == 0 else (n - np.unique(codes, axis=0).shape[0]) / n


def tuple_keys(codes: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Mixed-radix integer key of each code tuple (object ints if the space exceeds int64)."""
    strides = _strides(sizes)
    if math.prod(sizes) < 2**62:
        return codes.astype(np.int64) @ np.asarray(strides, dtype=np.int64)
    return np.array([sum(int(c) * s for c, s in zip(row, strides)) for row in codes.tolist()], dtype=object)


def _strides(sizes: list[int]) -> list[int]:
    return [math.prod(sizes[l + 1:]) for l in range(len(sizes))]


def reallocate_collisions(codes: np.ndarray, distances: DistanceSource,
                          sizes: list[int]) -> tuple[np.ndarray, ReallocationInfo]:
    """Return unique codes [N, K] and a summary.

    ``distances``: the distance tensor [N, K, C_max] (inf-padded) between each item's level-l
    residual and every code of level l, or a function ``idx -> [len(idx), K, C_max]`` so only
    colliding items are ever materialised. Non-colliding items are returned unchanged.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n, K = codes.shape
    if K != len(sizes):
        raise ValueError(f"codes have {K} levels but {len(sizes)} codebook sizes were given")
    if n and ((codes < 0) | (codes >= np.asarray(sizes)[None, :])).any():
        raise ValueError(f"codes out of range for codebook sizes {sizes}")
    check_capacity(sizes, n)
    keys = tuple_keys(codes, sizes)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    before = collision_rate(codes)
    colliding = np.flatnonzero(counts[inverse] > 1)
    if colliding.size == 0:
        return codes.copy(), ReallocationInfo(before, 0.0, 0, 0, 0, int(counts.max(initial=0)), [0] * K)

    dist = distances(colliding) if callable(distances) else np.asarray(distances)[colliding]
    dist = np.asarray(dist, dtype=np.float64)
    if dist.shape[:2] != (colliding.size, K) or dist.shape[2] < max(sizes):
        raise ValueError(f"distance tensor must be [items, {K}, >= {max(sizes)}], got {dist.shape}")
    order = np.argsort(dist, axis=2, kind="stable")  # nearest code first, per level
    last_min = dist[:, K - 1, :].min(axis=1)  # the item's distance to its own last-level code
    group = inverse[colliding]
    rank = np.lexsort((last_min, group))  # by group, closest first
    keeper = np.ones(rank.size, dtype=bool)
    keeper[1:] = group[rank[1:]] != group[rank[:-1]]
    movers = rank[~keeper]

    strides = _strides(sizes)
    caps = [math.prod(sizes[l + 1:]) for l in range(K)]  # tuples below a prefix of length l+1
    occupied = set(keys.tolist())
    # number of distinct occupied tuples under each prefix of length l+1 (l < K-1)
    prefix_count = []
    uniq = np.unique(keys)
    for l in range(K - 1):
        pk, pc = np.unique(uniq // strides[l], return_counts=True)
        prefix_count.append(dict(zip(pk.tolist(), pc.tolist())))

    new_codes = codes.copy()
    changed_from = [0] * K
    for j in movers.tolist():  # loop over colliding items only
        item = int(colliding[j])
        tup, lvl = _search(codes[item], order[j], sizes, strides, caps, occupied, prefix_count)
        new_codes[item] = tup
        changed_from[lvl] += 1
        key = int(np.dot(tup, strides)) if isinstance(keys[0], np.integer) else sum(int(c) * s for c, s in zip(tup, strides))
        occupied.add(key)
        for l in range(K - 1):
            pk = key // strides[l]
            prefix_count[l][pk] = prefix_count[l].get(pk, 0) + 1
    after = collision_rate(new_codes)
    if after != 0.0:
        raise RuntimeError("collision reallocation left a collision (bug)")
    info = ReallocationInfo(before, after, int(colliding.size), int((counts > 1).sum()), int(movers.size),
                            int(counts.max()), changed_from)
    return new_codes, info


def _search(code: np.ndarray, order: np.ndarray, sizes: list[int], strides: list[int], caps: list[int],
            occupied: set, prefix_count: list[dict]) -> tuple[list[int], int]:
    """First free tuple in the Sec. 3.4 order; returns it and the shallowest level changed."""
    K = len(sizes)
    code = [int(c) for c in code]
    ranked = [order[l, :sizes[l]].tolist() for l in range(K)]

    def complete(prefix: list[int], prefix_key: int) -> list[int] | None:
        """Nearest-first free completion of ``prefix`` (depth-first, skipping full subtrees)."""
        l = len(prefix)
        if l == K:
            return prefix if prefix_key in occupied else None  # caller checks; unreachable
        for c in ranked[l]:
            key = prefix_key + c * strides[l]
            if l == K - 1:
                if key not in occupied:
                    return prefix + [c]
                continue
            if prefix_count[l].get(key // strides[l], 0) >= caps[l]:
                continue  # subtree full
            found = complete(prefix + [c], key)
            if found is not None:
                return found
        return None

    for level in range(K - 1, -1, -1):  # last codebook first, then move up
        base = sum(code[i] * strides[i] for i in range(level))
        for c in ranked[level]:
            if level < K - 1 and c == code[level]:
                continue  # this subtree was exhausted by the previous (deeper) stage
            key = base + c * strides[level]
            if level == K - 1:
                if key not in occupied:
                    return code[:level] + [c], level
                continue
            if prefix_count[level].get(key // strides[level], 0) >= caps[level]:
                continue
            found = complete(code[:level] + [c], key)
            if found is not None:
                return found, level
    raise RuntimeError("no free semantic ID although capacity suffices (bug)")
