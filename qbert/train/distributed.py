"""Data-parallel helpers in plain ``torch.distributed`` (no Ray): what makes N workers compute
exactly what one worker computes at the same global batch.

Conventions every sharded stage follows (see docs/platform.md, "Exact data parallelism"):

* a global batch is drawn once, identically on every rank (same seed, no rank in it), and rank
  ``r`` takes its rows ``r::world``;
* each rank's loss is its share of the global loss times ``world``: ``sum over my rows / (N / world)``
  with ``N`` the global count (of masked tokens, of items). The gradient averaging of the data-
  parallel adapter (a mean over ranks) then gives exactly the gradient of the global mean;
* quantities that need every row of the global batch (InfoNCE negatives) are all-gathered with
  :func:`gather_rows`, whose backward returns every rank's gradient to the rows' owner;
* evaluation is sharded by user and gathered back in the users' order (:func:`gather_interleaved`).

With no process group (or one rank) every helper is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world(shard: tuple[int, int] | None) -> tuple[int, int]:
    """``shard`` (rank, world) checked; (0, 1) without one."""
    if shard is None:
        return 0, 1
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    return int(rank), int(world)


def collective_device() -> torch.device:
    """Where collectives run: the current CUDA device under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Numeric ``metrics`` averaged over the ranks (one all-reduce). A sharded step's loss is the
    rank's share times ``world`` (above), so the mean is the global batch's loss."""
    if not active():
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {**metrics, **dict(zip(keys, t.tolist()))}


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` replaced in place by its sum over the ranks (one all-reduce); returned."""
    if active():
        dev = collective_device()
        buf = t.to(dev)
        dist.all_reduce(buf)
        t.copy_(buf)
    return t


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized ``[m, ...]`` blocks into ``[world * m, ...]`` (rank-major); the
    backward sums the gradient of the whole gathered tensor over ranks and returns this rank's block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.m = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.m : (ctx.rank + 1) * ctx.m]


def gather_rows(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(every rank's rows along dim 0 [world * rows, ...], which of them are real [world * rows] bool,
    where this rank's rows start). ``x`` holds this rank's ``len(x) <= rows`` rows; it is padded to
    ``rows`` so the blocks have one size. Differentiable. Without a process group: (x, all True, 0)."""
    if not active():
        return x, torch.ones(len(x), dtype=torch.bool, device=x.device), 0
    n = len(x)
    if n > rows:
        raise ValueError(f"{n} local rows exceed the block size {rows}")
    if n < rows:
        x = torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])
    counts = torch.tensor([n], device=x.device)
    all_counts = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(all_counts, counts)
    real = torch.cat([torch.arange(rows, device=x.device) < int(c) for c in all_counts])
    return _GatherRows.apply(x), real, dist.get_rank() * rows


def gather_interleaved(part: torch.Tensor, total: int, shard: tuple[int, int]) -> torch.Tensor:
    """The inverse of taking rows ``rank::world``: every rank's ``part`` gathered into ``[total, ...]``
    in the original order (on CPU). Without a process group ``part`` is returned as is."""
    rank, world = shard
    if world == 1 or not active():
        return part
    parts: list = [None] * world
    dist.all_gather_object(parts, part.cpu())
    out = torch.empty((total, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out
