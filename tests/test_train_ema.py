"""The loop's weight average (``LoopConfig.ema_decay``): exact values, what evaluation sees, resume."""

from __future__ import annotations

import torch
from torch import nn

from qbert.train.loop import LoopConfig, fit

X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


def _model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(3, 1)


def _batches(epoch: int):
    return [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)]


def _step(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _raw_trajectory(epochs: int) -> list[torch.Tensor]:
    """Weights after every optimizer step of a plain run (no EMA): the EMA's inputs."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    traj = [_weights(model)]
    for _ in range(epochs):
        for b in _batches(0):
            opt.zero_grad()
            _step(model, b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            traj.append(_weights(model))
    return traj


def _expected_ema(traj: list[torch.Tensor], decay: float, steps: int, ramp: float = 10.0) -> torch.Tensor:
    e = traj[0].clone()
    for t in range(steps):
        d = min(decay, (1 + t) / (ramp + t))
        e = d * e + (1 - d) * traj[t + 1]
    return e


def test_without_evaluation_the_loop_returns_the_exact_ema_of_the_steps():
    traj = _raw_trajectory(3)
    model = _model()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches, _step,
        LoopConfig(epochs=3, patience=0, monitor="none", progress=False, ema_decay=0.9))
    want = _expected_ema(traj, 0.9, 12)
    assert torch.allclose(_weights(model), want, atol=1e-6)
    assert not torch.allclose(_weights(model), traj[-1], atol=1e-3)  # the average, not the last step


def test_ema_ramp_sets_how_fast_the_decay_reaches_its_cap():
    traj = _raw_trajectory(3)
    for ramp in (1.0, 2.0):
        model = _model()
        fit(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches, _step,
            LoopConfig(epochs=3, patience=0, monitor="none", progress=False, ema_decay=0.99, ema_ramp=ramp))
        assert torch.allclose(_weights(model), _expected_ema(traj, 0.99, 12, ramp), atol=1e-6)
        if ramp == 2.0:  # (1 + t) / (2 + t) stays below the cap: the plain mean of all 13 weights so far
            assert torch.allclose(_weights(model), torch.stack(traj).mean(0), atol=1e-6)
        else:  # a constant decay from the start, unlike the default ramp
            assert not torch.allclose(_weights(model), _expected_ema(traj, 0.99, 12, 10.0), atol=1e-4)


def test_evaluation_sees_the_average_training_continues_from_the_raw_weights(tmp_path):
    traj = _raw_trajectory(4)
    seen: list[torch.Tensor] = []

    def evaluate(model, epoch):
        seen.append(_weights(model))
        return {"score": -float(epoch - 1) ** 2}  # best at epoch 2

    model = _model()
    res = fit(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches, _step,
              LoopConfig(epochs=4, patience=0, monitor="score", mode="max", progress=False, ema_decay=0.8),
              evaluate=evaluate, checkpoint_dir=tmp_path)
    for epoch, w in enumerate(seen):
        assert torch.allclose(w, _expected_ema(traj, 0.8, 4 * (epoch + 1)), atol=1e-6)
    assert res.best_epoch == 2 and torch.allclose(_weights(model), seen[1])
    # the optimiser never trained the averaged weights: the raw run is the plain one
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert torch.allclose(torch.cat([v.flatten() for v in last["model"].values()]), traj[-1], atol=1e-6)


def test_resuming_continues_the_average(tmp_path):
    cfg = dict(patience=0, monitor="none", progress=False, ema_decay=0.9)
    straight = _model()
    fit(straight, torch.optim.SGD(straight.parameters(), lr=0.05), _batches, _step, LoopConfig(epochs=4, **cfg))
    resumed = _model()
    fit(resumed, torch.optim.SGD(resumed.parameters(), lr=0.05), _batches, _step, LoopConfig(epochs=2, **cfg),
        checkpoint_dir=tmp_path)
    again = _model()
    fit(again, torch.optim.SGD(again.parameters(), lr=0.05), _batches, _step, LoopConfig(epochs=4, **cfg),
        checkpoint_dir=tmp_path)
    assert torch.allclose(_weights(again), _weights(straight), atol=1e-6)
