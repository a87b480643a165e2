"""Learning-rate schedules: the factor curve, and that a stage's decay spans exactly its epoch budget."""

from __future__ import annotations

import math

import pytest
import torch

from qbert.data.split import LeaveOneOutSplit
from qbert.seqrec.stage import FinetuneConfig, PretrainConfig, SeqRecConfig, build_model, finetune, pretrain
from qbert.train.schedule import build_scheduler, lr_factor
from tests.test_qbert4rec import _planted


def test_lr_factor_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    assert [lr_factor(s, "cosine", 10, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, "cosine", 10, warmup_steps=4) == 1.0
    assert lr_factor(7, "cosine", 10, warmup_steps=4) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(10, "cosine", 10, warmup_steps=4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, "cosine", 10, min_ratio=0.1) == pytest.approx(0.1)  # past the budget: the floor
    assert lr_factor(0, "constant", 10, warmup_steps=2) == 0.5 and lr_factor(5, "constant", 10, warmup_steps=2) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler(opt, "constant", 10) is None
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        build_scheduler(opt, "step", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_lr_ratio"):
        FinetuneConfig(min_lr_ratio=1.5)


def _schedule_state(path) -> tuple[dict, dict]:
    payload = torch.load(path / "last.pt", map_location="cpu", weights_only=False)
    return payload["scheduler"], payload["loop"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_stage_decays_to_the_floor_at_the_end_of_its_budget(stage, tmp_path):
    torch.manual_seed(0)
    ds, codes = _planted(num_users=90)
    split = LeaveOneOutSplit(ds, 12)
    model = build_model(SeqRecConfig(hidden=16, layers=1, heads=2, dropout=0.0, item_id="input_and_head", head="levels"),
                        codes, 16, 12)
    kw = dict(epochs=3, batch_size=32, lr=2e-3, schedule="cosine", warmup_epochs=0.5, min_lr_ratio=0.1)
    if stage == "pretrain":  # rank 0 of 2: a step is a global batch of both ranks
        rows = split.train_sequences(0, 1)
        pretrain(model, rows, PretrainConfig(**kw), checkpoint_dir=tmp_path, shard=(0, 2), progress=False)
        steps_per_epoch = math.ceil(len(rows) / 64)
    else:
        finetune(model, split, FinetuneConfig(patience=0, **kw), checkpoint_dir=tmp_path, progress=False)
        steps_per_epoch = None
    sched, loop = _schedule_state(tmp_path)
    assert sched["last_epoch"] == loop["step"] > 0  # stepped once per optimizer step, saved with the loop
    if steps_per_epoch is not None:
        assert loop["step"] == 3 * steps_per_epoch
    assert sched["_last_lr"][0] == pytest.approx(0.1 * 2e-3)  # the whole budget ran: at the floor
