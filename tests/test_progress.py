"""Progress bars know each epoch's length (a total and an ETA), for every stage's batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qbert.seqrec.stage import masked_batches
from qbert.train import Batches, LoopConfig, fit


def test_the_bar_shows_a_total_and_batches_know_their_count(capsys):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(10, 2)

    def batches(epoch):
        return Batches((data[i:i + 4] for i in range(0, 10, 4)), 3)

    fit(model, opt, batches, lambda m, b: m(b).pow(2).mean(), LoopConfig(epochs=1, patience=0, monitor="loss",
                                                                         mode="min", progress=True))
    err = capsys.readouterr().err
    assert "0/3 [" in err and "batch/s" in err  # n/total: printed only when the total is known

    rows = np.zeros((23, 6), dtype=np.int64)
    rows[:, -3:] = np.arange(1, 70).reshape(23, 3)
    for shard in (None, (0, 2), (1, 2)):
        make = masked_batches(rows, 5, lambda real, gen: real, seed=0, device=torch.device("cpu"), shard=shard)
        epoch = make(0)
        assert len(epoch) == len(list(epoch)) > 0
