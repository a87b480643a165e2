"""benchmarks/table2.py in quick mode: the row shape #19's checks read, means and stds over seeds,
resume without re-training, rows of other models kept, bad input named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_benchmark_qbert4rec import _bench, one_thread  # noqa: F401 - the module's autouse fixture

TEST_METRICS = {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


def _mtimes(runs):
    return {str(p): p.stat().st_mtime_ns for p in runs.rglob("*.pt")}


def test_rows_over_seeds_resume_and_merge(tmp_path, capsys):
    bench = _bench("table2")
    runs = tmp_path / "runs"
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2"]) == 0
    (row,) = json.loads((runs / "table2.json").read_text())["rows"]
    assert (row["dataset"], row["model"], row["stage3_item_table"], row["seeds"]) == ("synthetic", "qbert4rec", False,
                                                                                     [1, 2])
    assert set(row["test"]) == set(row["test_std"]) == set(row["test_excl_history"]) == TEST_METRICS
    assert row["command"].startswith("python benchmarks/table2.py") and len(row["git_commit"]) >= 7
    per_seed = row["per_seed"]
    assert [s["seed"] for s in per_seed] == [1, 2] and per_seed[0]["test"] != per_seed[1]["test"]
    for part in ("valid", "test", "test_excl_history"):
        for k, mean in row[part].items():
            values = [s[part][k] for s in per_seed]
            assert mean == pytest.approx(np.mean(values)) and row[f"{part}_std"][k] == pytest.approx(np.std(values, ddof=1))
    # each seed's run scored its test split once, and is the pipeline's own record
    for s in per_seed:
        metrics = json.loads((runs / "synthetic" / "qbert4rec" / f"seed{s['seed']}" / "metrics.json").read_text())
        assert metrics["test"]["NDCG@10"] == s["test"]["NDCG@10"]
    assert "| synthetic | qbert4rec | no | 2 |" in (runs / "table2.md").read_text()

    before = _mtimes(runs)
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2"]) == 0
    assert _mtimes(runs) == before  # finished runs are read, not re-trained

    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "--baseline", "sasrec"]) == 0
    rows = json.loads((runs / "table2.json").read_text())["rows"]
    assert [(r["model"], r["stage3_item_table"]) for r in rows] == [("qbert4rec", False), ("sasrec", True)]
    assert rows[1]["test_std"]["HR@10"] == 0.0

    _slices_of_the_two_runs(runs, tmp_path, capsys)
    _seed_records_outlive_their_runs(bench, runs, rows, capsys)

    capsys.readouterr()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--set", "model.hidden=zero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.hidden" in err


def test_all_rows_of_a_domain_in_one_command(tmp_path, capsys):
    bench = _bench("table2")
    runs = tmp_path / "runs"
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "--all-rows"]) == 0
    rows = json.loads((runs / "table2.json").read_text())["rows"]
    assert [(r["model"], r["stage3_item_table"]) for r in rows] == [
        ("qbert4rec", False), ("hybrid", True), ("sasrec", True), ("bert4rec", True)]
    hybrid = rows[1]
    assert "--model hybrid" in hybrid["command"] and "model.item_id=input_and_head" in hybrid["command"]
    assert "--all-rows" not in hybrid["command"] and "--baseline bert4rec" in rows[3]["command"]
    # each row's command alone reproduces it: here, reads its finished runs
    before = _mtimes(runs)
    argv = hybrid["command"].split()[2:]
    assert bench.main(argv) == 0 and _mtimes(runs) == before
    again = {r["model"]: r for r in json.loads((runs / "table2.json").read_text())["rows"]}
    assert again["hybrid"]["test"] == hybrid["test"] and again["hybrid"]["command"] == hybrid["command"]
    # --collect over the four rows: complete from the runs; an empty runs directory (and no records
    # there) trains nothing, goes through every row and says that rows are missing
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "--all-rows", "--collect"]) == 0
    assert _mtimes(runs) == before
    empty = tmp_path / "empty"
    capsys.readouterr()
    assert bench.main(["--quick", "--runs-dir", str(empty), "--seeds", "1", "--all-rows", "--collect"]) == 3
    assert capsys.readouterr().err.count("no finished run or record for seeds 1") == 4
    assert not (empty / "synthetic").exists() and not (empty / "table2.json").exists()
    capsys.readouterr()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--all-rows", "--baseline", "sasrec"]) == 2
    assert capsys.readouterr().err.startswith("error: --all-rows names its rows itself")


def _slices_of_the_two_runs(runs, tmp_path, capsys):
    """benchmarks/slices.py re-scores a pipeline run and a baseline run: its buckets add up to all
    users, and each run's overall numbers are those the run recorded for the same split and protocol."""
    slices = _bench("slices")
    q, s = runs / "synthetic" / "qbert4rec" / "seed1", runs / "synthetic" / "sasrec" / "seed1"
    for split, protocol in (("valid", "excluded"), ("test", "kept")):
        argv = ["--runs", str(q), str(s), "--split", split, "--protocol", protocol, "--out-dir", str(tmp_path)]
        assert slices.main(argv) == 0
        res = json.loads((tmp_path / "slices.json").read_text())
        assert [r["label"] for r in res["runs"]] == ["qbert4rec", "sasrec"]
        for run, label in ((q, "qbert4rec"), (s, "sasrec")):
            recorded = json.loads((run / "metrics.json").read_text())["by_protocol"][split][f"history_{protocol}"]
            for m in ("HR@10", "NDCG@10"):
                assert res["all"][label][m] == pytest.approx(recorded[m], abs=1e-9)
        for key in ("target_train_count", "history_length", "shared_prefix"):
            rows = [r for r in res["slices"] if r["key"] == key]
            assert len(rows) >= 2 and sum(r["users"] for r in rows) == res["users"]
            assert all(a["hi"] < b["lo"] for a, b in zip(rows, rows[1:]))  # disjoint, ordered buckets
            for label in ("qbert4rec", "sasrec"):
                weighted = sum(r["users"] * r["metrics"][label]["NDCG@10"] for r in rows) / res["users"]
                assert weighted == pytest.approx(res["all"][label]["NDCG@10"])
        assert "| target_train_count |" in (tmp_path / "slices.md").read_text()
    # a popularity adjustment large enough to outweigh any score puts the most popular targets
    # out of every top 10, which the unadjusted ranking reaches
    unadjusted = json.loads((tmp_path / "slices.json").read_text())
    argv = ["--runs", str(q), str(s), "--split", "test", "--protocol", "kept", "--out-dir", str(tmp_path)]
    assert slices.main([*argv, "--popularity-adjust", "1000"]) == 0
    res = json.loads((tmp_path / "slices.json").read_text())
    assert res["popularity_adjust"] == 1000 and "minus 1000.0 * log(1 + train count)" in (tmp_path / "slices.md").read_text()
    top = [r for r in res["slices"] if r["key"] == "target_train_count"][-1]
    before = [r for r in unadjusted["slices"] if r["key"] == "target_train_count"][-1]
    for label in ("qbert4rec", "sasrec"):
        assert before["metrics"][label]["HR@10"] > 0 and top["metrics"][label]["HR@10"] == 0
    capsys.readouterr()
    for bad in ("-1", "nan", "inf"):
        assert slices.main([*argv, "--popularity-adjust", bad]) == 2
        assert capsys.readouterr().err.startswith("error: --popularity-adjust")
    assert slices.main(["--runs", str(q), str(runs / "nowhere"), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err
    assert slices.main(["--runs", str(q), str(q), "--out-dir", str(tmp_path)]) == 2
    assert "twice" in capsys.readouterr().err


def test_slice_keys_count_training_parts_and_real_histories():
    """The target's count in the training parts only (never a valid or test item; withheld new items
    not at all), and the history length of the real sequence, also under the cold-start protocol."""
    from qbert.data import LeaveOneOutSplit, from_sequences

    slices = _bench("slices")
    ds = from_sequences("t", [[5, 1, 2, 3], [4, 4, 0], [2, 1, 1, 5]], num_items=6)
    split = LeaveOneOutSplit(ds)  # training parts [5, 1], [4], [2, 1]; valid 2, 4, 1; test 3, 0, 5
    valid, test = slices.slice_keys(split, "valid"), slices.slice_keys(split, "test")
    assert valid["target_train_count"].tolist() == [1, 1, 2] and valid["history_length"].tolist() == [2, 1, 2]
    assert test["target_train_count"].tolist() == [0, 0, 1] and test["history_length"].tolist() == [3, 2, 3]
    cold = slices.slice_keys(split.withhold(np.array([1])), "valid")  # item 1 leaves the training parts
    assert cold["target_train_count"].tolist() == [1, 1, 0] and cold["history_length"].tolist() == [2, 1, 2]
    values = np.array([1, 1, 1, 2, 3, 9])  # quantile edges 1, 2, 3: buckets <= 1, (1, 2], (2, 3], > 3
    rows = slices.slice_table({"m": np.array([0, 20, 20, 0, 20, 20])}, {"k": values})
    assert [(r["lo"], r["hi"], r["users"]) for r in rows] == [(1, 1, 3), (2, 2, 1), (3, 3, 1), (9, 9, 1)]
    assert [r["metrics"]["m"]["HR@10"] for r in rows] == pytest.approx([1 / 3, 1, 0, 0])
    many = np.arange(20)  # more than 8 distinct values: quantile buckets
    assert len(slices.slice_table({"m": np.zeros(20)}, {"k": many})) == len(slices.QUANTILES) + 1


def test_shared_prefix_is_the_longest_code_prefix_the_target_shares_with_its_history():
    from qbert.data import LeaveOneOutSplit, from_sequences

    slices = _bench("slices")
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1]])  # items 0..4, K = 3
    ds = from_sequences("t", [[3, 1, 0, 4], [2, 4, 0, 1], [3, 3, 3, 2], [1, 0, 3, 2]], num_items=5)
    split = LeaveOneOutSplit(ds)  # valid targets 0, 0, 3, 3 after histories [3, 1], [2, 4], [3, 3], [1, 0]
    assert slices.slice_keys(split, "valid", codes)["shared_prefix"].tolist() == [2, 1, 3, 0]
    # test: targets 4, 1, 2, 2 after [3, 1, 0], [2, 4, 0], [3, 3, 3], [1, 0, 3]
    assert slices.shared_prefix(split, "test", codes).tolist() == [1, 2, 0, 1]
    assert "shared_prefix" not in slices.slice_keys(split, "test")


def test_popularity_adjusted_scores_subtract_the_log_count_prior():
    slices = _bench("slices")
    base = lambda h: torch.zeros(len(h), 3)  # noqa: E731 (three items of equal score)
    adjusted = slices.popularity_adjusted(base, np.array([0, 1, 7]), 0.5)
    expected = torch.tensor([[0.0, -0.5 * np.log(2), -0.5 * np.log(8)]] * 2, dtype=torch.float32)
    assert torch.allclose(adjusted(torch.zeros(2, 4)), expected)
    assert slices.popularity_adjusted(base, np.array([0, 1, 7]), 0.0) is base


def _seed_records_outlive_their_runs(bench, runs, rows, capsys):
    """Each finished seed is recorded beside the rows; with the runs directory gone (a new machine)
    the row is rebuilt from the records without training, and only records of the same settings
    and data count."""
    import shutil

    records_path = runs / "table2_seeds.json"
    records = json.loads(records_path.read_text())["records"]
    assert [(r["model"], r["seed"]) for r in records] == [("qbert4rec", 1), ("qbert4rec", 2), ("sasrec", 1)]
    by_key = {(r["model"], r["seed"]): r for r in records}
    for row in rows:
        for s in row["per_seed"]:
            rec = by_key[(row["model"], s["seed"])]
            assert rec["result"]["test"] == s["test"] and rec["dataset"] == "synthetic"
            assert len(rec["git_commit"]) >= 7 and rec["data"]["target"] and rec["settings"]["seed"] == s["seed"]
    saved = records_path.read_bytes()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2"]) == 0
    assert records_path.read_bytes() == saved  # reading finished runs again leaves their records as they were

    # a finished run scored with other ranking settings is not this row's run either
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2", "--collect",
                       "--set", "model.new_items=backoff"]) == 3
    assert records_path.read_bytes() == saved

    shutil.rmtree(runs / "synthetic")  # the runs are gone (a new machine); the records stay
    (runs / "table2.json").unlink()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2", "--collect"]) == 0
    assert not (runs / "synthetic").exists()  # nothing trained
    (row,) = json.loads((runs / "table2.json").read_text())["rows"]
    assert row["test"] == rows[0]["test"] and [s["seed"] for s in row["per_seed"]] == [1, 2]
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "--baseline", "sasrec"]) == 0
    assert not (runs / "synthetic").exists()  # a baseline's record is read too, without --collect

    capsys.readouterr()
    before = (runs / "table2.json").read_text()
    # other settings, a ranking-only one included: no record applies; --collect trains nothing,
    # leaves the row alone and says so in its exit status
    for other in ("finetune.epochs=2", "model.new_items=backoff"):
        assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2", "--collect",
                           "--set", other]) == 3
        assert "no finished run or record for seeds 1 2 of synthetic/qbert4rec" in capsys.readouterr().err
        assert (runs / "table2.json").read_text() == before and not (runs / "synthetic").exists()
    assert records_path.read_bytes() == saved
    # a run of other settings adds its record beside the others, which stay usable
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "--set", "finetune.epochs=2"]) == 0
    records = json.loads(records_path.read_text())["records"]
    assert sorted((r["model"], r["seed"], r["settings"].get("finetune.epochs")) for r in records) == [
        ("qbert4rec", 1, 2), ("qbert4rec", 1, 3), ("qbert4rec", 2, 3), ("sasrec", 1, None)]
    shutil.rmtree(runs / "synthetic")
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2", "--collect"]) == 0
    again = {r["model"]: r for r in json.loads((runs / "table2.json").read_text())["rows"]}
    assert again["qbert4rec"]["test"] == rows[0]["test"]
    records_path.write_bytes(saved)
    # a record made on other data is not used
    tampered = json.loads(records_path.read_text())
    tampered["records"][1]["data"]["target"] = "0" * 16
    records_path.write_text(json.dumps(tampered))
    assert bench.main(["--quick", "--runs-dir", str(runs), "--seeds", "1", "2", "--collect"]) == 3
    assert "no finished run or record for seeds 2 of synthetic/qbert4rec" in capsys.readouterr().err
    records_path.write_bytes(saved)


def test_a_record_made_before_a_setting_existed_matches_that_setting_at_its_default():
    bench = _bench("table2")
    from qbert.pipeline import PipelineConfig
    from qbert.pipeline.runs import comparable_settings

    defaults = comparable_settings(PipelineConfig(), ranking=True)
    mine = comparable_settings(PipelineConfig().override({"seed": 43}), ranking=True)
    old = {k: v for k, v in mine.items() if k != "model.new_item_share"}  # recorded before the setting existed
    records = [{"dataset": "d", "model": "qbert4rec", "seed": 43, "settings": bench._plain(old)}]
    assert bench.find_seed_record(records, "d", "qbert4rec", 43, mine, defaults) is records[0]
    assert bench.find_seed_record(records, "d", "qbert4rec", 43, mine) is None  # without defaults: exact only
    other = comparable_settings(PipelineConfig().override({"seed": 43, "model.new_item_share": 0.3}), ranking=True)
    assert bench.find_seed_record(records, "d", "qbert4rec", 43, other, defaults) is None  # set away from it
    changed = {**old, "finetune.epochs": 7}  # a setting the record has, at another value
    assert bench.find_seed_record([{**records[0], "settings": changed}], "d", "qbert4rec", 43, mine, defaults) is None
