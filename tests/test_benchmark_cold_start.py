"""benchmarks/cold_start.py in quick mode: the issue's row shape, the paper's model ranks new items
(``model.new_items: backoff``: backing off to their first code) where the item-ID hybrid and
popularity cannot, a finished run is re-scored rather than re-trained, bad input named."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml
from test_benchmark_qbert4rec import _bench, one_thread  # noqa: F401 - the module's autouse fixture

pytestmark = pytest.mark.timeout(900)


def test_rows_new_items_ranked_by_the_semantic_id_model_and_rescored_without_training(tmp_path, capsys):
    bench = _bench("cold_start")
    runs = tmp_path / "runs"
    models = "qbert4rec,hybrid,popularity,content_knn"
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", models, "--set", "model.new_items=backoff"]) == 0
    rows = json.loads((runs / "cold_start.json").read_text())["rows"]
    assert [(r["model"], r["slice"]) for r in rows] == [(m, s) for m in models.split(",") for s in ("new", "known")]
    by = {(r["model"], r["slice"]): r for r in rows}
    assert [by[(m, "new")]["stage3_item_table"] for m in models.split(",")] == [False, True, None, None]
    metrics = json.loads((runs / "qbert4rec" / "metrics.json").read_text())
    rule = by[("qbert4rec", "new")]["new_items"]
    assert rule["rule"] == "backoff" and rule["untrained"] == metrics["stages"]["finetune"]["untrained_items"]
    assert rule["untrained"] >= metrics["cold_start"]["new_items"] > 0
    for r in rows:  # the concentration of the new slice adds up to the slice's HR@10, under each protocol
        if r["slice"] == "new":
            for w, (field, slices) in itertools.product(("valid", "test"), (
                    ("new_target_concentration", ""), ("new_target_concentration_excl_history", "_excl_history"))):
                c, hr = r[field][w], r[w + slices]["HR@10"]
                assert c["users"] == r[w]["users"] and 1 <= c["distinct_targets"] <= c["users"]
                assert c["hits"] == round(c["users"] * hr) >= (c["most_hit_target"] or {"hits": 0})["hits"]
                assert (c["most_hit_target"] is None) == (c["hits"] == 0)
                assert 0 <= c["item_macro"]["HR@10"] <= 1 and (c["item_macro"]["HR@10"] > 0) == (c["hits"] > 0)
    md = (runs / "cold_start.md").read_text()  # the concentration table: a row per model, "none" without hits
    assert "| synthetic | hybrid | " in md.split("most hit target")[1] and "| none |" in md
    for model in ("hybrid", "popularity"):  # nothing ranks an item it never saw
        assert by[(model, "new")]["test"]["HR@10"] == 0.0
    # planted clusters: the semantic-ID model reaches new items through their codes, above content kNN
    assert by[("qbert4rec", "new")]["test"]["HR@10"] > by[("content_knn", "new")]["test"]["HR@10"] > 0
    assert metrics["cold_start"]["slices"]["test"]["history_kept"]["new"] == by[("qbert4rec", "new")]["test"]
    # the valid probe behind the choice of the backoff rule scores valid exactly as the benchmark does
    probe = _bench("new_item_offset")
    assert probe.main(["--run", str(runs / "qbert4rec"), "--deltas", "0", "--backoff-weights", "0.25",
                       "--backoff-offsets", "1.5", "--content-knn", "--out-dir", str(tmp_path)]) == 0
    own, back, knn = json.loads((tmp_path / "new_item_offset.json").read_text())["rows"]
    assert (own["rule"], back["rule"], knn["rule"]) == ("own", "backoff", "content_knn")
    for probed, row in ((back, "qbert4rec"), (knn, "content_knn")):  # both protocols, as the rows have them
        assert probed["new"]["HR@10"] == pytest.approx(by[(row, "new")]["valid"]["HR@10"])
        assert probed["excluded"]["new"]["NDCG@10"] == pytest.approx(by[(row, "new")]["valid_excl_history"]["NDCG@10"])
        assert probed["excluded"]["known"]["HR@10"] == pytest.approx(by[(row, "known")]["valid_excl_history"]["HR@10"])
    assert knn["excluded"]["known"]["HR@10"] > knn["known"]["HR@10"]  # its top 10s held history items
    for probed, row in ((back, "qbert4rec"), (knn, "content_knn")):  # item-macro too, under both protocols
        for field, slices in (("new_target_concentration", probed["new"]),
                              ("new_target_concentration_excl_history", probed["excluded"]["new"])):
            macro = by[(row, "new")][field]["valid"]["item_macro"]
            assert (slices["item_macro_HR@10"], slices["item_macro_NDCG@10"]) == \
                (pytest.approx(macro["HR@10"]), pytest.approx(macro["NDCG@10"]))
    assert own["new"]["median_rank"] > back["new"]["median_rank"]
    # the frontier reads that probe: every rule row a point, each ratio to content kNN, the budget
    frontier = _bench("new_item_frontier")
    bound = min(own["known"]["NDCG@10"], back["known"]["NDCG@10"])
    assert frontier.main([str(tmp_path / "new_item_offset.json"), "--reference-known", str(bound), "--budget", "0",
                          "--name", "frontier", "--out-dir", str(tmp_path), "--plot", str(tmp_path / "f.png")]) == 0
    front = json.loads((tmp_path / "frontier.json").read_text())

    def four(r):  # new NDCG@10 and item-macro NDCG@10, history kept and excluded
        return [r["new"]["NDCG@10"], r["new"]["item_macro_NDCG@10"],
                r["excluded"]["new"]["NDCG@10"], r["excluded"]["new"]["item_macro_NDCG@10"]]

    def ratio(r):
        return min(a / b if b else float("inf") for a, b in zip(four(r), four(knn)))

    assert [(r["label"], r["within_budget"]) for r in front["rows"]] == [
        ("own", True), ("backoff w 0.25, first code", True)]
    assert [r["min_ratio"] for r in front["rows"]] == pytest.approx([ratio(own), ratio(back)])
    assert front["best"]["label"] == max(front["rows"], key=lambda r: r["min_ratio"])["label"]
    assert front["beats_knn"] == (front["best"]["min_ratio"] > 1) and (tmp_path / "f.png").stat().st_size > 0
    # the diagnostics: with all weight on the item's own score the backoff orders new items as own log P
    diag = _bench("new_item_diagnostics")
    assert diag.main(["--run", str(runs / "qbert4rec"), "--backoff-weight", "1", "--out-dir", str(tmp_path)]) == 0
    found = json.loads((tmp_path / "new_item_diagnostics.json").read_text())
    scorers = found["order"]["scorers"]
    assert scorers["backoff"] == scorers["own log P"] and scorers["own log P"]["users"] > 0
    assert found["signal"]["users"] == own["new"]["users"] + own["known"]["users"]
    assert found["signal"]["new_share"] == pytest.approx(own["new"]["users"] / found["signal"]["users"])
    # planted clusters: the history's content points at the new target far better than chance
    assert scorers["cos to the history (content kNN)"]["median_rank"] < found["order"]["new_items"] / 4
    # a ranking-only change is re-scored from model.pt, not re-trained
    stamp = (runs / "qbert4rec" / "model.pt").stat().st_mtime_ns
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec",
                       "--set", "model.new_items=own"]) == 0
    own = json.loads((runs / "cold_start.json").read_text())["rows"]
    assert (runs / "qbert4rec" / "model.pt").stat().st_mtime_ns == stamp
    assert own[0]["new_items"]["rule"] == "own" and own[0]["test"]["HR@10"] < by[("qbert4rec", "new")]["test"]["HR@10"]
    # the content row re-scores the same run with the content term (same offset as the plain row):
    # new items' ranks move, nothing trains
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec,qbert4rec-content",
                       "--set", "model.new_items=backoff", "--content-set", "model.new_item_content=4"]) == 0
    assert (runs / "qbert4rec" / "model.pt").stat().st_mtime_ns == stamp
    both = {(r["model"], r["slice"]): r for r in json.loads((runs / "cold_start.json").read_text())["rows"]}
    assert both[("qbert4rec-content", "new")]["new_items"]["content"] == 4.0
    assert both[("qbert4rec-content", "new")]["valid"] != both[("qbert4rec", "new")]["valid"]
    assert both[("qbert4rec", "new")]["test"] == by[("qbert4rec", "new")]["test"]
    # the neighbours row: the backoff rule's peers are content neighbours; the probe scores valid the same
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-neighbours",
                       "--set", "model.new_items=backoff", "--neighbours-set", "model.new_item_neighbours=3"]) == 0
    assert (runs / "qbert4rec" / "model.pt").stat().st_mtime_ns == stamp
    nbr = {(r["model"], r["slice"]): r for r in json.loads((runs / "cold_start.json").read_text())["rows"]}
    assert nbr[("qbert4rec-neighbours", "new")]["new_items"]["neighbours"] == 3
    assert nbr[("qbert4rec-neighbours", "new")]["valid"] != both[("qbert4rec", "new")]["valid"]
    assert probe.main(["--run", str(runs / "qbert4rec"), "--deltas", "--backoff-weights", "0.25",
                       "--backoff-offsets", "1.5", "--backoff-neighbours", "3", "--out-dir", str(tmp_path)]) == 0
    (probed,) = json.loads((tmp_path / "new_item_offset.json").read_text())["rows"]
    assert probed["neighbours"] == 3
    assert probed["new"]["HR@10"] == pytest.approx(nbr[("qbert4rec-neighbours", "new")]["valid"]["HR@10"])
    capsys.readouterr()
    assert probe.main(["--run", str(runs / "qbert4rec"), "--deltas", "--backoff-weights", "0.25", "--backoff-offsets",
                       "1.5", "--backoff-peers", "before-repeat", "--out-dir", str(tmp_path)]) == 2
    assert "has no learned repeat shift" in capsys.readouterr().err
    # another setting's rows under their own name, beside the first ones
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-neighbours",
                       "--neighbours-label", "neighbours-k1", "--set", "model.new_items=backoff",
                       "--neighbours-set", "model.new_item_neighbours=1"]) == 0
    two = {(r["model"], r["slice"]): r for r in json.loads((runs / "cold_start.json").read_text())["rows"]}
    assert two[("qbert4rec-neighbours-k1", "new")]["new_items"]["neighbours"] == 1
    assert two[("qbert4rec-neighbours", "new")] == nbr[("qbert4rec-neighbours", "new")]
    capsys.readouterr()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-neighbours"]) == 2
    assert "error: --neighbours-set: missing" in capsys.readouterr().err
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-neighbours",
                       "--neighbours-label", "content", "--set", "model.new_items=backoff",
                       "--neighbours-set", "model.new_item_neighbours=1"]) == 2
    assert "error: --neighbours-label 'content'" in capsys.readouterr().err
    # the peers before the repeat shift need a learned repeat shift: refused before anything is scored
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-neighbours",
                       "--set", "model.new_items=backoff", "--neighbours-set",
                       "model.new_item_peers_before_repeat=true"]) == 2
    assert "new_item_peers_before_repeat" in capsys.readouterr().err
    # the mixture row re-scores the same run with pi and tau fitted on valid; the probe fits the same
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-mixture"]) == 0
    assert (runs / "qbert4rec" / "model.pt").stat().st_mtime_ns == stamp
    mix = {(r["model"], r["slice"]): r for r in json.loads((runs / "cold_start.json").read_text())["rows"]}
    rule, valid = mix[("qbert4rec-mixture", "new")]["new_items"], mix[("qbert4rec-mixture", "new")]["valid"]
    users = valid["users"] + mix[("qbert4rec-mixture", "known")]["valid"]["users"]
    # pi: the share of valid targets no training row held (the withheld items, and any item seen only
    # as a valid or test target)
    assert rule["rule"] == "mixture" and rule["fit"]["users"] == users
    assert rule["temperature"] == rule["fit"]["weights"]["new_item_temperature"]
    assert rule["fit"]["fitted_targets"] <= rule["fit"]["new_targets"]
    assert rule["fit"]["log_likelihood"] > rule["fit"]["uniform_log_likelihood"]  # the fit beats no weights
    assert rule["share"] == pytest.approx(rule["fit"]["new_targets"] / users) and rule["fit"]["new_targets"] >= valid["users"]
    assert probe.main(["--run", str(runs / "qbert4rec"), "--deltas", "--mixture", "--mixture-scales", "1", "0.5",
                       "--out-dir", str(tmp_path)]) == 0
    probed = json.loads((tmp_path / "new_item_offset.json").read_text())
    assert probed["mixture_fits"][0]["weights"]["new_item_temperature"] == pytest.approx(rule["temperature"])
    fitted, half = probed["rows"]
    assert fitted["rule"] == "mixture" and fitted["new"]["HR@10"] == pytest.approx(valid["HR@10"])
    assert half["weight"] == pytest.approx(rule["share"] / 2) and half["new"]["HR@10"] <= fitted["new"]["HR@10"]
    capsys.readouterr()
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-mixture",
                       "--set", "model.item_id=input_and_head"]) == 2
    assert "needs the paper's model" in capsys.readouterr().err
    assert probe.main(["--run", str(runs / "hybrid"), "--deltas", "--mixture", "--out-dir", str(tmp_path)]) == 2
    assert probe.main(["--run", str(runs / "qbert4rec"), "--deltas", "--mixture", "--mixture-scales", "0",
                       "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: --mixture: ") == 2 and "Traceback" not in err
    # a rule of the paper's model set for both runs does not reach the hybrid (which has its own head)
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "popularity",
                       "--set", "model.new_items=mixture"]) == 0
    # pseudo-new fine-tuning: stages 1-3 are the qbert4rec run's, only fine-tuning trains again
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-pseudo-new",
                       "--pseudo-new", "0.3"]) == 0
    pseudo = json.loads((runs / "qbert4rec-pseudo-new" / "metrics.json").read_text())
    for stage in ("fusion", "quantize", "pretrain"):
        assert pseudo["stages"][stage]["reused_from"] == str((runs / "qbert4rec").resolve())
    assert "reused_from" not in pseudo["stages"]["finetune"]
    assert "pseudo_new: 0.3" in (runs / "qbert4rec-pseudo-new" / "config.yaml").read_text()
    # settings stages 1-3 read differ from the qbert4rec run's: nothing is reused, every stage trains
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-pseudo-new",
                       "--pseudo-new", "0.3", "--pseudo-new-set", "pretrain.epochs=2"]) == 0
    pseudo = json.loads((runs / "qbert4rec-pseudo-new" / "metrics.json").read_text())
    assert not any("reused_from" in pseudo["stages"][s] for s in ("fusion", "quantize", "pretrain", "finetune"))
    # the mixture rule fitted on the pseudo-new run's valid re-scores that run: nothing trains
    stamp = (runs / "qbert4rec-pseudo-new" / "model.pt").stat().st_mtime_ns
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-pseudo-new-mixture",
                       "--pseudo-new", "0.3", "--pseudo-new-set", "pretrain.epochs=2"]) == 0
    assert (runs / "qbert4rec-pseudo-new" / "model.pt").stat().st_mtime_ns == stamp
    pmix = {r["slice"]: r for r in json.loads((runs / "cold_start.json").read_text())["rows"]
            if r["model"] == "qbert4rec-pseudo-new-mixture"}
    assert pmix["new"]["new_items"]["rule"] == "mixture"
    assert pmix["new"]["new_items"]["fit"]["users"] == pmix["new"]["valid"]["users"] + pmix["known"]["valid"]["users"]
    # a baseline row's concentration comes from its test_ranks.parquet
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "sasrec"]) == 0
    sas = next(r for r in json.loads((runs / "cold_start.json").read_text())["rows"]
               if (r["model"], r["slice"]) == ("sasrec", "new"))
    c = sas["new_target_concentration"]["test"]
    assert c["users"] == sas["test"]["users"] and set(sas["new_target_concentration"]) == {"test"}
    assert c["hits"] == round(c["users"] * sas["test"]["HR@10"])
    excl = sas["new_target_concentration_excl_history"]["test"]
    assert excl["hits"] == round(excl["users"] * sas["test_excl_history"]["HR@10"])
    # one RUNS_DIR per dataset: a run of other data there is refused, neither read nor replaced
    capsys.readouterr()
    stamp = (runs / "hybrid" / "model.pt").stat().st_mtime_ns
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "hybrid",
                       "--set", "data.synthetic.seed=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runs-dir: ") and f"{runs / 'hybrid'} holds a run of other data (data fingerprint" in err
    assert "Traceback" not in err and (runs / "hybrid" / "model.pt").stat().st_mtime_ns == stamp
    # an unfinished run of other data (no fingerprint recorded yet) is refused from its config's dataset keys,
    # before any row trains or is written
    other = tmp_path / "other"
    (other / "hybrid").mkdir(parents=True)
    theirs = yaml.safe_load((runs / "hybrid" / "config.yaml").read_text())
    theirs["data"]["synthetic"]["seed"] = 7
    (other / "hybrid" / "config.yaml").write_text(yaml.safe_dump(theirs))
    assert bench.main(["--quick", "--runs-dir", str(other), "--models", "popularity,hybrid"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run of other data (data.synthetic.seed differ)" in err
    assert not (other / "cold_start.json").exists() and not (other / "popularity").exists()
    # re-running some models replaces only their rows: the others stay, each with its own command
    rows = json.loads((runs / "cold_start.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {*models.split(","), "qbert4rec-content", "qbert4rec-neighbours",
                                         "qbert4rec-neighbours-k1", "qbert4rec-mixture", "qbert4rec-pseudo-new", "qbert4rec-pseudo-new-mixture",
                                         "sasrec"}
    assert all(r["command"].startswith("python benchmarks/cold_start.py --quick") for r in rows)
    pseudo_rows = [r for r in rows if r["model"].startswith("qbert4rec-pseudo-new")]
    assert len(pseudo_rows) == 4 and all("pretrain.epochs=2" in r["command"] for r in pseudo_rows)
    assert not any("pretrain.epochs=2" in r["command"] for r in rows if r not in pseudo_rows)
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-transfer"]) == 2
    assert "error: --models qbert4rec-transfer: qbert4rec-transfer needs --pretrain-sources" in capsys.readouterr().err
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "sasrec2"]) == 2
    assert "unknown sasrec2" in capsys.readouterr().err
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-content"]) == 2
    assert "error: --content-set: missing" in capsys.readouterr().err
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-content",
                       "--content-set", "finetune.epochs=2"]) == 2  # would retrain into the qbert4rec run
    assert "error: --content-set: finetune.epochs would retrain" in capsys.readouterr().err


def _probe_row(rule: str, offset: float, known: float, new: float, run: str = "runs/a") -> dict:
    """A probe row (benchmarks/new_item_offset.py's shape) whose new-slice measures all equal ``new``."""
    slice_ = {"NDCG@10": new, "item_macro_NDCG@10": new}
    return {"rule": rule, "weight": 0.25, "delta": offset, "content": 0.0, "neighbours": 10,
            "peers_before_repeat": False, "new": slice_, "known": {"NDCG@10": known}, "excluded": {"new": slice_}}


def test_the_frontier_picks_the_best_rule_within_the_known_budget_and_names_bad_probes(tmp_path, capsys):
    frontier = _bench("new_item_frontier")
    probe = tmp_path / "probe.json"
    rows = [_probe_row("backoff", 0.5, 0.120, 0.008), _probe_row("backoff", 1.0, 0.117, 0.012),
            _probe_row("backoff", 1.5, 0.110, 0.030), _probe_row("content_knn", 0.0, 0.02, 0.010)]
    probe.write_text(json.dumps({"rows": rows, "split": "valid", "run": "runs/a"}))
    args = [str(probe), "--reference-known", "0.12", "--budget", "0.03", "--out-dir", str(tmp_path)]
    assert frontier.main(args) == 0
    front = json.loads((tmp_path / "new_item_frontier.json").read_text())
    assert [r["within_budget"] for r in front["rows"]] == [True, True, False]  # bound 0.1164
    assert front["best"]["offset"] == 1.0 and front["best"]["min_ratio"] == pytest.approx(1.2) and front["beats_knn"]
    assert frontier.main([*args, "--budget", "0"]) == 0  # only the first row within: behind kNN
    front = json.loads((tmp_path / "new_item_frontier.json").read_text())
    assert front["best"]["offset"] == 0.5 and not front["beats_knn"]
    capsys.readouterr()
    bad = {"no_knn.json": {"rows": rows[:3], "split": "valid", "run": "runs/a"},
           "test.json": {"rows": rows, "split": "test", "run": "runs/a"},
           "kept_only.json": {"rows": [{k: v for k, v in rows[0].items() if k != "excluded"}, rows[3]],
                              "split": "valid", "run": "runs/a"},
           "other_run.json": {"rows": [rows[3]], "split": "valid", "run": "runs/b"}}
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    for files, says in ((["no_knn.json"], "no content_knn row"), (["test.json"], "valid probes only"),
                        (["kept_only.json"], "kept_only.json row 0"), (["missing.json"], "missing.json"),
                        (["no_knn.json", "other_run.json"], "different runs")):
        assert frontier.main([str(tmp_path / f) for f in files] + ["--out-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_the_diagnostics_auc_is_the_share_of_correctly_ordered_pairs_ties_half(tmp_path, capsys):
    diag = _bench("new_item_diagnostics")
    assert diag.main(["--run", str(tmp_path / "no-run"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run ") and "no-run" in err and not (tmp_path / "out").exists()
    auc = diag.auc
    rng = np.random.default_rng(0)
    score, label = rng.integers(0, 4, 300).astype(float), rng.random(300) < 0.3
    pos, neg = score[label][:, None], score[~label][None, :]
    assert auc(score, label) == pytest.approx(((pos > neg) + 0.5 * (pos == neg)).mean())
    assert auc(np.arange(4.0), np.array([0, 0, 1, 1])) == 1.0 and np.isnan(auc(np.ones(3), np.ones(3)))


def test_an_unknown_row_is_refused_before_any_data_is_read(tmp_path, capsys):
    bench = _bench("cold_start")
    missing = tmp_path / "no-such-dataset"
    assert bench.main(["--runs-dir", str(tmp_path / "runs"), "--set", f"data.source={missing}",
                       "--models", "popularity,sasrec2"]) == 2
    err = capsys.readouterr().err
    assert "error: --models popularity,sasrec2: unknown sasrec2 (known: qbert4rec," in err
    assert str(missing) not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_merge_keeps_other_datasets_rows_and_gives_old_rows_the_files_command(tmp_path):
    bench = _bench("cold_start")
    path = tmp_path / "cold_start.json"
    row = lambda d, m, s, v, seed=0: {"dataset": d, "model": m, "slice": s, "test": {"HR@10": v},  # noqa: E731
                                      "fraction": 0.1, "seed": seed}
    path.write_text(json.dumps({"rows": [row("a", "x", "new", 1), row("a", "x", "known", 2), row("a", "y", "new", 3)],
                                "command": "python old", "git_commit": "abc"}))
    merged = bench.merge_rows(path, [row("b", "x", "new", 4), row("a", "x", "new", 5), row("a", "x", "known", 6)])
    assert [(r["dataset"], r["model"], r["slice"], r["test"]["HR@10"]) for r in merged] == [
        ("a", "x", "new", 5), ("a", "x", "known", 6), ("a", "y", "new", 3), ("b", "x", "new", 4)]
    assert merged[2]["command"] == "python old" and merged[2]["git_commit"] == "abc"
    assert "command" not in merged[0]  # a new row carries its own (main adds it)
    assert bench.merge_rows(tmp_path / "absent.json", merged) == merged
    path.write_text(json.dumps({"rows": merged}))  # another draw of new items is a row of its own
    again = bench.merge_rows(path, [row("a", "x", "new", 7, seed=1)])
    assert [(r["seed"], r["test"]["HR@10"]) for r in again if (r["dataset"], r["model"], r["slice"]) == ("a", "x", "new")] == [
        (0, 5), (1, 7)]


def test_rows_of_several_draws_are_named_and_averaged_per_draw_share():
    bench = _bench("cold_start")

    def row(model, slice_name, seed, hr, fraction=0.1, users=100):
        m = {"users": users, "HR@10": hr, "NDCG@10": hr / 2}
        return {"dataset": "a", "model": model, "slice": slice_name, "fraction": fraction, "seed": seed,
                "stage3_item_table": False, "test": m, "test_excl_history": {**m, "HR@10": hr + 0.1}}

    empty = {**row("x", "new", 3, 0.0), "test": {"users": 0}, "test_excl_history": {"users": 0}}
    rows = [row("x", "new", 0, 0.2), row("x", "new", 1, 0.4, users=90), row("x", "known", 0, 0.5),
            row("y", "new", 0, 0.3), row("x", "new", 2, 0.9, fraction=0.2), empty,  # a draw with no such user
            row("y", "new", 0, 0.3)]  # the same draw twice counts once
    means = bench.over_draws(rows)  # x/known, y and the 0.2 share were scored on one draw each
    assert [(g["model"], g["slice"], g["fraction"], g["seeds"], g["users"]) for g in means] == [
        ("x", "new", 0.1, [0, 1], [100, 90])]
    g = means[0]
    assert g["test/HR@10"] == pytest.approx((0.3, 0.2 / 2 ** 0.5))  # sample std
    assert g["test/NDCG@10"] == pytest.approx((0.15, 0.1 / 2 ** 0.5))
    assert g["test_excl_history/HR@10"][0] == pytest.approx(0.4)
    md = bench.render(rows)
    assert "| a | x | no | 0.1 / 1 | new | 90 | 0.4000 | 0.2000 |" in md
    assert "| a | x | 0.1 | 0, 1 | new | 100, 90 | 0.3000 ± 0.1414 | 0.1500 ± 0.0707 | 0.4000 ± 0.1414 |" in md
    assert "over draws" not in bench.render(rows[2:])
    assert "| a | x | no | 0.1 / 3 | new | 0 | nan | nan |" in md
    # the concentration table: item-macro under both protocols; n/a for a row scored before the second
    conc = {"users": 4, "hits": 1, "distinct_targets": 2, "most_frequent_target": {"item": 7, "users": 3, "hits": 0},
            "most_hit_target": {"item": 8, "users": 1, "hits": 1}, "item_macro": {"HR@10": 0.5, "NDCG@10": 0.25}}
    old = {**row("x", "new", 0, 0.2), "new_target_concentration": {"test": conc}}
    both = {**old, "model": "z", "new_target_concentration_excl_history":
            {"test": {**conc, "item_macro": {"HR@10": 0.5, "NDCG@10": 0.3}}}}
    md = bench.render([old, both])
    assert "| a | x | 0.1 / 0 | 4 | 1 | 2 | 7: 3, 0 | 8: 1, 1 | 0.5000 | 0.2500 | n/a | n/a |" in md
    assert "| a | z | 0.1 / 0 | 4 | 1 | 2 | 7: 3, 0 | 8: 1, 1 | 0.5000 | 0.2500 | 0.5000 | 0.3000 |" in md


def test_results_are_merged_and_written_under_a_lock_a_second_process_cannot_take(tmp_path, monkeypatch):
    import subprocess
    import sys

    bench = _bench("cold_start")
    path = tmp_path / "cold_start.json"  # two cold-start commands may finish at once
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'w')\n"
             "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(7)")
    take = lambda: subprocess.run([sys.executable, "-c", probe, f"{path}.lock"], timeout=60).returncode  # noqa: E731
    seen, merge = [], bench.merge_rows

    def merge_and_probe(p, rows):  # what a second process finds while this one merges
        seen.append(take())
        return merge(p, rows)

    monkeypatch.setattr(bench, "merge_rows", merge_and_probe)
    m = {"users": 5, "HR@10": 0.2, "NDCG@10": 0.1}
    row = {"dataset": "a", "model": "x", "slice": "new", "fraction": 0.1, "seed": 0, "stage3_item_table": None,
           "test": m, "test_excl_history": m}
    assert bench.write_results(tmp_path, [row]) == [row]
    assert seen == [7] and take() == 0
    assert json.loads(path.read_text())["rows"] == [row] and "| a | x |" in (tmp_path / "cold_start.md").read_text()


def test_a_baseline_run_of_other_data_is_refused(tmp_path):
    bench = _bench("cold_start")
    from types import SimpleNamespace

    from qbert.data.synthetic import SyntheticConfig, make_synthetic

    data = SimpleNamespace(target=make_synthetic(SyntheticConfig(num_users=50, num_items=30, num_clusters=3)))
    run = tmp_path / "sasrec"
    run.mkdir()
    bench._refuse_other_dataset(run, data)  # nothing there yet
    (run / "metrics.json").write_text(json.dumps({"data": {"fingerprint": data.target.fingerprint()}}))
    bench._refuse_other_dataset(run, data)  # the same data
    (run / "metrics.json").write_text(json.dumps({"data": {"fingerprint": "0123456789abcdef"}}))
    with pytest.raises(bench.OtherDataset, match="0123456789abcdef"):
        bench._refuse_other_dataset(run, data)
    (run / "metrics.json").unlink()  # an unfinished baseline: its checkpoint record names the data
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "settings.json").write_text(json.dumps({"data_fingerprint": "fedcba9876543210"}))
    with pytest.raises(bench.OtherDataset, match="fedcba9876543210"):
        bench._refuse_other_dataset(run, data)
    (run / "checkpoints" / "settings.json").write_text(json.dumps({"data_fingerprint": data.target.fingerprint()}))
    bench._refuse_other_dataset(run, data)


def test_the_content_map_row_trains_the_paper_model_with_content_in_its_item_vectors(tmp_path):
    bench = _bench("cold_start")
    runs = tmp_path / "runs"
    assert bench.main(["--quick", "--runs-dir", str(runs), "--models", "qbert4rec-content-map", "--content-dim", "16",
                       "--pseudo-new", "0.2", "--content-map-set", "model.new_items=backoff"]) == 0
    rows = json.loads((runs / "cold_start.json").read_text())["rows"]
    assert [(r["model"], r["slice"], r["stage3_item_table"]) for r in rows] == [
        ("qbert4rec-content-map", "new", False), ("qbert4rec-content-map", "known", False)]
    cfg = yaml.safe_load((runs / "qbert4rec-content-map" / "config.yaml").read_text())
    assert (cfg["model"]["content_dim"], cfg["finetune"]["pseudo_new"], cfg["model"]["new_items"]) == (16, 0.2, "backoff")
    assert rows[0]["new_items"]["rule"] == "backoff" and rows[0]["test"]["users"] > 0
