"""No host synchronisation inside a training step (#22, GPU readiness).

On a GPU, an op whose result shape or value the host must read (``.item()``/``bool()`` of a
tensor, ``nonzero``, indexing by a bool mask) stalls the host until the device has finished every
queued kernel, so the next batch cannot be queued behind the current one. These tests run the
forward and backward pass of each trained stage's step on CPU under a dispatch mode that records
every such op: the batch builders settle data-dependent shapes on the host beforehand, so a step
must contain none. (The optimizer's step counter lives on the host, so it is left out.)"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qbert.fusion import FusionConfig
from qbert.fusion.losses import fusion_loss
from qbert.fusion.modules import FusionModel
from qbert.fusion.train import validate_features
from qbert.quantize import RQVAE, QuantizeConfig
from qbert.seqrec.stage import PretrainConfig, SeqRecConfig, build_model, masked_batches, masked_step, pretrain_mask_fn

pytestmark = pytest.mark.timeout(120)
READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
         "aten::is_nonzero", "aten::equal"}


class HostReads(TorchDispatchMode):
    """Records each op that makes the host read device data (with where it was called)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in READS or bool_index:
            frames = [f for f in traceback.extract_stack() if "/qbert/" in f.filename]
            self.found.append(f"{name} at " + (f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))
        return func(*args, **(kwargs or {}))


def _steps_read_nothing(step, batches) -> None:
    for batch in batches:
        with HostReads() as reads:
            loss, _ = step(batch)
            loss.backward()
        assert reads.found == [], reads.found


def test_the_detector_sees_a_host_read():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x[x > 2].sum()
        float(x.sum())
    assert len(reads.found) == 2 and "aten::index" in reads.found[0] and "_local_scalar_dense" in reads.found[1]


@pytest.mark.parametrize("variant", [{"item_id": "none", "head": "catalogue", "repeat_bias": True},
                                     {"item_id": "none", "head": "levels"},
                                     {"item_id": "input_and_head", "head": "levels", "repeat_bias": True}])
def test_sequence_model_step(variant):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (50, 4))
    model = build_model(SeqRecConfig(hidden=32, layers=2, heads=2, **variant), codes, 16, 12)
    rows = np.zeros((64, 12), np.int64)
    lengths = rng.integers(2, 12, 64)
    for i, n in enumerate(lengths):
        rows[i, -n:] = rng.integers(1, 51, n)
    make = masked_batches(rows, 16, pretrain_mask_fn(PretrainConfig()), 0, torch.device("cpu"))
    batches = list(make(0))[:3]
    _steps_read_nothing(lambda b: masked_step(model, b), batches)
    with HostReads() as reads:  # the same loss with the masked positions found inside the step
        model.masked_loss(batches[0]["tokens"], batches[0]["mask"])
    assert any("nonzero" in r for r in reads.found)


def test_fusion_step():
    cfg = FusionConfig(dim=16, layers=3, modalities=["text", "image", "id"])
    rng = np.random.default_rng(0)
    feats, n = validate_features({"text": rng.normal(size=(40, 8)).astype(np.float32),
                                  "image": rng.normal(size=(40, 6)).astype(np.float32)}, cfg, 40)
    tensors = {m: torch.from_numpy(a) for m, a in feats.items()}
    model = FusionModel(cfg, n, {m: t.shape[-1] for m, t in tensors.items()})
    idx = [torch.arange(16), torch.arange(16, 32)]
    _steps_read_nothing(lambda i: fusion_loss(model(i, {m: t[i] for m, t in tensors.items()}), cfg), idx)


def test_rqvae_step_after_the_first():
    x = torch.randn(96, 16)
    model = RQVAE(16, QuantizeConfig(levels=3, codebook_size=8, code_dim=4))
    model(x[:32])  # the first batch initialises the codebooks by k-means (once, on the host's request)
    step = lambda i: (model(x[i]).loss, {})  # noqa: E731
    _steps_read_nothing(step, [torch.arange(32, 64), torch.arange(64, 96)])
    fresh = RQVAE(16, QuantizeConfig(levels=3, codebook_size=8, code_dim=4))
    fresh.load_state_dict(model.state_dict())
    assert fresh.initted  # the flag is read again from the loaded buffers
