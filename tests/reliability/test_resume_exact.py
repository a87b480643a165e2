"""Resume equals an uninterrupted run, bit for bit on CPU (#25): every random state a step draws
from (dropout's global generator, a stage's own generators such as the RQ-VAE's dead-code
reseeding) is in the checkpoint, and resumed stages report their true training time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.quantize import train_rqvae
from qbert.quantize.config import QuantizeConfig
from qbert.train.loop import Callback, LoopConfig, fit

pytestmark = pytest.mark.timeout(300)


class _Interrupt(Exception):
    pass


class _StopAfter(Callback):
    """Stands in for a kill after epoch ``n``: the checkpoint of epoch n is written, then the run dies."""

    def __init__(self, n: int):
        self.n = n

    def on_epoch_end(self, model, state, metrics, checkpoint):  # noqa: ANN001
        if state.epoch == self.n:
            raise _Interrupt


def _dropout_fit(ckpt, epochs: int, callbacks=()):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        return [x[torch.randperm(64, generator=g)[:16]] for _ in range(4)]

    res = fit(model, opt, batches, lambda m, b: m(b).pow(2).mean(), LoopConfig(epochs=epochs, patience=0,
              monitor="loss", mode="min", progress=False), callbacks=callbacks, checkpoint_dir=ckpt)
    return model, res


def test_a_resumed_fit_with_dropout_equals_the_uninterrupted_one(tmp_path):
    whole, _ = _dropout_fit(tmp_path / "a", 4)
    with pytest.raises(_Interrupt):
        _dropout_fit(tmp_path / "b", 4, [_StopAfter(2)])
    torch.manual_seed(123)  # a new process: the global generator starts elsewhere
    (tmp_path / "b" / ".last.pt.abc.tmp").write_bytes(b"half")  # a write the kill cut short
    resumed, res = _dropout_fit(tmp_path / "b", 4)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "b").glob("*.tmp"))
    assert len(res.history) == 4 and res.train_seconds >= sum(h["epoch_time_s"] for h in res.history) * 0.99


def test_a_resumed_rqvae_gives_every_item_the_same_semantic_id(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    cfg = QuantizeConfig(levels=2, codebook_size=128, hidden=[32], code_dim=8, epochs=6, batch_size=64, seed=3)
    whole = train_rqvae(x, cfg, checkpoint_dir=tmp_path / "a")
    with pytest.raises(_Interrupt):
        train_rqvae(x, cfg, callbacks=[_StopAfter(3)], checkpoint_dir=tmp_path / "b")
    torch.manual_seed(99)
    resumed = train_rqvae(x, cfg, checkpoint_dir=tmp_path / "b")
    assert np.array_equal(whole.codes, resumed.codes)
    assert whole.report["final_losses"] == resumed.report["final_losses"]
