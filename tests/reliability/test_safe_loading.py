"""Model and checkpoint files are loaded weights-only: a file from elsewhere cannot run code, and
a truncated, corrupt or foreign file is an ``error:`` naming it (exit 2), not a traceback (#25)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from qbert.cli import main as cli
from qbert.data.errors import DataError
from qbert.train.loop import LoopConfig, fit
from qbert.utils.io import load_weights

pytestmark = pytest.mark.timeout(120)


class _Payload:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"model": {}, "config": _Payload(str(marker))}, path)
    with pytest.raises(DataError, match=str(path)):
        load_weights(path, "model file")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_truncated_or_foreign_files_name_the_file(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:  # a real checkpoint cut short
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="last.pt"):
        load_weights(path)
    torch.save([1, 2], path)  # loads, but is not a payload
    with pytest.raises(DataError, match="expected a dict"):
        load_weights(path)


def test_resume_from_a_corrupt_checkpoint_is_an_error_naming_it(tmp_path):
    (tmp_path / "last.pt").write_bytes(pickle.dumps("x")[:3])
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DataError, match="last.pt"):
        fit(model, opt, lambda e: [torch.ones(1, 2)], lambda m, b: m(b).sum(), LoopConfig(epochs=1, progress=False),
            checkpoint_dir=tmp_path)


def test_cli_evaluate_on_a_corrupt_model_file_exits_2_with_the_file_named(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"garbage")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "semantic_ids.parquet").write_bytes(b"")
    assert cli(["evaluate", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.pt" in err and "Traceback" not in err


def test_a_corrupt_semantic_id_table_is_an_error_naming_it(tmp_path):
    from qbert.pipeline import read_codes

    (tmp_path / "semantic_ids.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="semantic_ids.parquet: not a readable parquet file"):
        read_codes(tmp_path, 3)
