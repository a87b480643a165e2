"""Cost of a sequence model (paper Table 6): parameters, FLOPs per sample, full-ranking latency
per user and training throughput, measured on the model itself rather than estimated.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention, linear
layers; embedding look-ups and element-wise ops count zero, as in the usual FLOP tables).
Every measurement works on a copy of the model or under ``no_grad``, so profiling a trained
model leaves its weights untouched. Works with any model exposing ``masked_loss(tokens, mask,
keep=)`` and ``score(history)`` (Q-BERT4Rec).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qbert.train.optim import build_optimizer

MaskFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def parameter_count(model: nn.Module) -> int:
    """Every parameter (trainable or not): the model's size on disk, less its buffers."""
    return int(sum(p.numel() for p in model.parameters()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_flops_per_sample(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """FLOPs of one training step (forward + backward of ``masked_loss``) divided by the rows."""
    m = copy.deepcopy(model).train()
    dev = _device(m)
    with FlopCounterMode(display=False) as fc:
        loss, _ = m.masked_loss(tokens.to(dev), mask.to(dev))
        loss.backward()
    return fc.get_total_flops() / len(tokens)


def score_flops_per_sample(model: nn.Module, history: torch.Tensor) -> float:
    """FLOPs of one full-ranking forward (scores over the whole catalogue) per user."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.score(history.to(_device(model)))
    finally:
        model.train(was)
    return fc.get_total_flops() / len(history)


def ranking_latency_per_user(model: nn.Module, histories: torch.Tensor, batch_size: int = 256, k: int = 10,
                             warmup: int = 1) -> float:
    """Seconds per user to score the whole catalogue and take the top ``k`` (batched inference)."""
    dev = _device(model)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model.score(histories[:batch_size].to(dev)).topk(k, dim=-1)
            _sync(dev)
            t0 = time.perf_counter()
            for lo in range(0, len(histories), batch_size):
                model.score(histories[lo : lo + batch_size].to(dev)).topk(k, dim=-1)
            _sync(dev)
            secs = time.perf_counter() - t0
    finally:
        model.train(was)
    return secs / len(histories)


def training_throughput(model: nn.Module, rows: torch.Tensor, mask_fn: MaskFn, batch_size: int = 256,
                        steps: int = 10, lr: float = 1e-4, warmup: int = 1, seed: int = 0,
                        bucket: bool = True) -> float:
    """Training samples (rows) per second of AdamW steps on a copy of ``model``, over the batches
    training itself uses (:func:`qbert.seqrec.stage.masked_batches`: shuffled, length-bucketed
    unless ``bucket`` is False, trimmed to each batch's longest row)."""
    from qbert.seqrec.stage import masked_batches

    if len(rows) == 0:
        raise ValueError("training_throughput needs at least one row")
    m = copy.deepcopy(model).train()
    dev = _device(m)
    opt = build_optimizer(m, lr)
    rows_np = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
    epoch = masked_batches(rows_np, batch_size, mask_fn, seed, dev, bucket=bucket)

    def batches():
        e = 0
        while True:
            yield from epoch(e)
            e += 1

    it = batches()

    def step() -> int:
        b = next(it)
        loss, _ = m.masked_loss(b["tokens"], b["mask"], keep=b.get("keep"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(b["tokens"])

    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    samples = sum(step() for _ in range(steps))
    _sync(dev)
    return samples / (time.perf_counter() - t0)
