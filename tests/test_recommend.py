"""`qbert recommend` and the Recommender API (#24): top-K in original IDs, equal to the model's own
ranking, history exclusion, arbitrary histories, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qbert.cli import main as cli
from qbert.pipeline import run_pipeline
from qbert.recommend import COLUMNS, Recommender
from test_pipeline import tiny

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "run"
    run_pipeline(tiny(**{"finetune.epochs": 3, "pretrain.epochs": 1, "plots": False}), out)
    return out


def test_every_user_gets_k_items_equal_to_the_models_own_ranking(run):
    rec = Recommender.from_run(run)
    table = rec.recommend(k=5)
    ds = rec.dataset
    assert table.column_names == list(COLUMNS) and table.num_rows == ds.num_users * 5
    assert table.column("rank").to_pylist()[:5] == [1, 2, 3, 4, 5]
    scores = np.asarray(table.column("score")).reshape(ds.num_users, 5)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    # brute force for a few users: argsort of model.score over their whole sequence
    users, tokens = rec.user_histories()
    with torch.no_grad():
        full = rec.model.score(torch.as_tensor(tokens[:7])).float()
    best = torch.argsort(full, dim=1, descending=True)[:, :5].numpy()
    got = np.asarray(table.column("item_id").to_pylist(), dtype=object).reshape(ds.num_users, 5)[:7]
    assert (got == rec.item_ids[best]).all()
    sids = dict(zip(pq.read_table(run / "semantic_ids.parquet").column("item_id").to_pylist(),
                    pq.read_table(run / "semantic_ids.parquet").column("sid").to_pylist()))
    assert table.column("sid")[0].as_py() == sids[int(best[0, 0])]
    assert list(table.column("user_id").to_pylist()[:5]) == [users[0]] * 5


def test_exclude_history_and_given_histories(run):
    rec = Recommender.from_run(run)
    u = rec.dataset.user_ids[3]
    seq = rec.item_ids[rec.dataset.sequence(3)]
    excl = rec.recommend(users=[u], k=10, exclude_history=True)
    assert not set(excl.column("item_id").to_pylist()) & set(seq)
    same = rec.recommend(histories={"x": list(seq)}, k=10)  # a history given by hand = that user's
    kept = rec.recommend(users=[u], k=10)
    assert same.column("item_id").to_pylist() == kept.column("item_id").to_pylist()
    with pytest.raises(Exception, match="not in the catalogue"):
        rec.recommend(histories={"x": ["no-such-item"]})
    with pytest.raises(Exception, match="not in dataset"):
        rec.recommend(users=["no-such-user"])


def test_cli_writes_the_table_and_refuses_bad_input(run, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("\n".join(Recommender.from_run(run).dataset.user_ids[:4]) + "\n")
    out = tmp_path / "recs.parquet"
    assert cli(["recommend", "--run", str(run), "--users", str(users), "--k", "3", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 12
    assert pq.read_table(out).num_rows == 12
    hist = tmp_path / "h.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "items": [["nope"]]}), hist)
    assert cli(["recommend", "--run", str(run), "--histories", str(hist), "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not in the catalogue" in err and not (tmp_path / "x.parquet").exists()
    assert cli(["recommend", "--run", str(tmp_path), "--out", str(tmp_path / "y.parquet")]) == 2
    assert "model.pt" in capsys.readouterr().err
