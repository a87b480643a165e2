"""Vectorised k-means in torch (kmeans++ or random seeding), used to initialise codebooks."""

from __future__ import annotations

import torch


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, K] between rows of ``x`` [N, D] and ``c`` [K, D]."""
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1).unsqueeze(0)).clamp_min_(0.0)


def kmeans_pp_seeds(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ~ squared distance to the chosen ones."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").to(x.device)
    centres = [x[first]]
    d2 = sq_distances(x, centres[0]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # all points covered (duplicates): fall back to uniform picks
            probs = torch.ones_like(d2)
        else:
            probs = d2 / total
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(x.device)
        centres.append(x[nxt])
        d2 = torch.minimum(d2, sq_distances(x, centres[-1]).squeeze(1))
    return torch.cat(centres)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 25, seeding: str = "kmeans++",
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means; returns centroids [k, D] and assignments [N].

    With fewer points than ``k`` the missing centres are jittered copies of random points, so
    every code starts near data. Empty clusters are re-seeded at the points farthest from
    their centres (keeps all ``k`` codes alive).
    """
    x = x.float()
    n, dim = x.shape
    if n == 0:
        raise ValueError("k-means needs at least one point")
    if n < k:
        extra = x[torch.randint(n, (k - n,), generator=generator).to(x.device)]
        scale = x.std() if n > 1 else x.abs().mean() + 1.0
        noise = torch.randn(extra.shape, generator=generator).to(x.device) * 1e-3 * (scale + 1e-6)
        c = torch.cat([x, extra + noise])
        return c, sq_distances(x, c).argmin(1)
    if seeding == "kmeans++":
        c = kmeans_pp_seeds(x, k, generator)
    elif seeding == "random":
        c = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    else:
        raise ValueError(f"unknown k-means seeding '{seeding}' (kmeans++ or random)")
    assign = sq_distances(x, c).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, dim, device=x.device).index_add_(0, assign, x)
        nonempty = counts > 0
        c = torch.where(nonempty.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1).float(), c)
        d = sq_distances(x, c)
        empty = (~nonempty).nonzero().squeeze(1)
        if empty.numel():
            far = d.min(1).values.topk(min(empty.numel(), n)).indices
            c[empty[: far.numel()]] = x[far]
            d = sq_distances(x, c)
        new_assign = d.argmin(1)
        if torch.equal(new_assign, assign) and not empty.numel():
            break
        assign = new_assign
    return c, assign
