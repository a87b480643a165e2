"""End to end: fusion -> RQ-VAE -> pretrain -> finetune -> evaluation on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qbert.config import ConfigError
from qbert.data.errors import DataError
from qbert.data.split import LeaveOneOutSplit
from qbert.data.synthetic import SyntheticConfig, make_synthetic
from qbert.eval.evaluator import evaluate_ranking
from qbert.pipeline import (PipelineConfig, check_reuse, config_differences, load_data, load_run_model, pretraining_rows, quickstart_config, run_pipeline,
                            stage_features)

REPO = Path(__file__).resolve().parents[1]
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def tiny(**over) -> PipelineConfig:
    """A config small enough for CI: 2 cores, well under a minute per run."""
    base = {
        "data": {"source": "synthetic", "max_len": 15,
                 "synthetic": {"seed": 0, "num_users": 500, "num_items": 150, "num_clusters": 10, "max_len": 15}},
        "fusion": {"dim": 32, "layers": 3, "epochs": 4, "batch_size": 150},
        "quantize": {"levels": 3, "codebook_size": 16, "hidden": [64, 32], "code_dim": 16, "epochs": 15,
                     "batch_size": 150},
        "model": {"hidden": 32, "layers": 2, "heads": 2, "dropout": 0.1},
        # fp32: the margins below were set in fp32, and "auto" is bf16 only on CPUs with bf16 units
        "pretrain": {"strategy": "multi", "epochs": 3, "batch_size": 128, "lr": 2e-3, "precision": "fp32"},
        "finetune": {"epochs": 12, "batch_size": 64, "lr": 3e-3, "patience": 4, "eval_batch_size": 512,
                     "precision": "fp32"},
        "seed": 0, "device": "cpu", "plots": True,
    }
    cfg = PipelineConfig.from_dict(base)
    return cfg.override(over) if over else cfg


def popularity_test_metrics(ds) -> dict[str, float]:
    split = LeaveOneOutSplit(ds, 15)
    train_items = np.concatenate([ds.seq_items[s:e] for s, e in zip(split.user_start, split.train_end)])
    counts = torch.as_tensor(np.bincount(train_items, minlength=ds.num_items), dtype=torch.float)
    return evaluate_ranking(lambda h: counts.expand(len(h), -1), split.history("test"), split.targets("test"),
                            ds.num_items)


def test_end_to_end_beats_popularity_and_writes_every_artifact(tmp_path):
    cfg = tiny()
    run = tmp_path / "run"
    metrics = run_pipeline(cfg, run)
    for name in ("config.yaml", "fused_embeddings.parquet", "fusion_report.json", "rqvae.pt", "semantic_ids.parquet",
                 "quantize_report.json", "pretrain.pt", "model.pt", "metrics.json", "summary.json",
                 "checkpoints/finetune/last.pt", "checkpoints/pretrain/last.pt", "plots/activated_layers.png",
                 "plots/codebook_utilisation.png", "plots/learning_curves.png",
                 "plots/code_tree.png", "plots/fused_projection.png"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "metrics.json").read_text())
    assert set(on_disk["test"]) == set(METRICS) and set(on_disk["valid"]) == set(METRICS)
    assert on_disk["test"] == metrics["test"]
    assert on_disk["stage3_item_table"] is False and on_disk["stages"]["finetune"]["item_indexed_parameters"] == []
    both = on_disk["by_protocol"]  # both ranking protocols, from one scoring pass per split
    assert both["test"]["history_kept"] == metrics["test"] and set(both["valid"]) == {"history_kept", "history_excluded"}
    assert both["test"]["history_excluded"]["HR@10"] >= both["test"]["history_kept"]["HR@10"]  # fewer competitors
    ranks = pq.read_table(run / "test_ranks.parquet").to_pydict()
    assert np.mean(np.array(ranks["rank_history_kept"]) < 10) == pytest.approx(metrics["test"]["HR@10"])
    assert {"fusion", "quantize", "pretrain", "finetune"} <= set(on_disk["stages"])
    summary = json.loads((run / "summary.json").read_text())
    assert {"git_commit", "machine", "timings", "config", "data"} <= set(summary)
    assert summary["data"]["fingerprint"] == make_synthetic(cfg.data.synthetic).fingerprint()
    assert PipelineConfig.from_yaml(run / "config.yaml") == cfg
    assert (run / "plots/activated_layers.png").read_bytes()[:4] == b"\x89PNG"
    # one learning curve per stage: every stage reports its per-epoch history
    epochs = {"fusion": cfg.fusion.epochs, "quantize": cfg.quantize.epochs, "pretrain": cfg.pretrain.epochs}
    for stage, n in epochs.items():
        assert [h["epoch"] for h in on_disk["stages"][stage]["history"]] == list(range(1, n + 1)), stage
    assert on_disk["history"][-1]["NDCG@10"] > 0  # fine-tuning's, with its valid metrics
    assert str(run / "plots/learning_curves.png") in summary["plots"]

    sid = pq.read_table(run / "semantic_ids.parquet")
    codes = np.stack([sid.column(f"code_{i}").to_numpy() for i in range(3)], 1)
    assert len(codes) == 150 and np.unique(codes, axis=0).shape[0] == 150
    data = make_synthetic(cfg.data.synthetic)  # the table reads without the dataset: original IDs and titles
    assert sid.column("orig_id").to_pylist() == data.items.column("orig_id").to_pylist()
    assert sid.column("title").to_pylist() == data.items.column("title").to_pylist()
    preview = (run / "semantic_ids.csv").read_text().splitlines()  # MLflow previews CSV
    assert preview[0] == '"item_id","sid","orig_id","title"' and len(preview) == 151
    assert metrics["stages"]["finetune"]["init"].startswith("pretrained")

    pop = popularity_test_metrics(make_synthetic(cfg.data.synthetic))
    assert metrics["test"]["HR@10"] > pop["HR@10"] + 0.08, (metrics["test"], pop)
    assert metrics["test"]["NDCG@10"] > pop["NDCG@10"] + 0.04


def test_multi_domain_pretraining_then_finetune_on_a_third_domain(tmp_path):
    cfg = tiny(**{"pretrain_sources": ["synthetic:seed=1,users=300,items=120,clusters=10,max_len=15",
                                       "synthetic:seed=2,users=300,items=100,clusters=10,max_len=15"],
                  "pretrain.include_target": False, "pretrain.epochs": 2, "plots": False})  # tiny's 12 fine-tuning epochs:
    # at 8 the model was still far from trained (HR@10 0.400 against popularity's 0.402, at 12 0.472)
    data = load_data(cfg)
    assert data.union.num_items == 150 + 120 + 100
    rows = pretraining_rows(cfg, data)
    # only the two source domains: every token lies in their item ranges (union ids + 1)
    real = rows[rows > 0] - 1
    assert len(rows) == 600 and real.min() >= 150 and real.max() < 370

    metrics = run_pipeline(cfg, tmp_path / "md")
    sid = pq.read_table(tmp_path / "md" / "semantic_ids.parquet")
    assert sid.num_rows == 370 and set(sid.column("domain").to_pylist()) == {"target", "source0", "source1"}
    assert metrics["stages"]["pretrain"]["rows"] == 600
    assert metrics["stages"]["pretrain"]["domains"] == ["source0", "source1"]  # the target is left out
    assert "shared encoder" in metrics["stages"]["finetune"]["init"]
    pop = popularity_test_metrics(make_synthetic(cfg.data.synthetic))
    assert metrics["test"]["HR@10"] > pop["HR@10"]


def test_single_domain_pretraining_uses_only_the_training_part():
    cfg = tiny()
    data = load_data(cfg)
    rows = pretraining_rows(cfg, data)
    assert np.array_equal(rows, LeaveOneOutSplit(data.target, 15).train_sequences(pad=0, shift=1))


def test_target_itself_as_pretrain_source_is_refused():
    cfg = tiny(**{"pretrain_sources": ["synthetic:seed=0,users=500,items=150,clusters=10,max_len=15"]})
    with pytest.raises(ConfigError, match="leak"):
        load_data(cfg)


def _no_training_outputs(run: Path) -> None:
    assert not (run / "fused_embeddings.parquet").exists() and not (run / "metrics.json").exists()


def test_bad_features_fail_before_training(tmp_path):
    ds = make_synthetic(SyntheticConfig(num_users=60, num_items=40, num_clusters=4))
    img = np.array(ds.feature("image"))
    img[3, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):  # the dataset itself refuses NaN features
        ds.with_feature("image", img)
    text = np.array(ds.feature("text"))
    text[5] = 0.0  # an item without features for an enabled modality
    bad = ds.with_feature("text", text)
    bad.save(tmp_path / "bad")
    with pytest.raises(DataError, match="item 5"):
        run_pipeline(tiny(**{"data.source": str(tmp_path / "bad")}), tmp_path / "r1")
    _no_training_outputs(tmp_path / "r1")
    with pytest.raises(DataError, match="feat_missing"):
        run_pipeline(tiny(**{"data.source": str(tmp_path / "bad"), "data.features": {"text": "missing",
                                                                                     "image": "image"}}),
                     tmp_path / "r2")
    _no_training_outputs(tmp_path / "r2")


def test_a_modality_can_concatenate_several_feature_columns(tmp_path):
    """data.features.text as a list: each column L2-normalised, then concatenated (two views of
    one modality weigh equally whatever their scale); a column missing for an item is an error."""
    ds = make_synthetic(SyntheticConfig(num_users=60, num_items=40, num_clusters=4))
    title = np.array(ds.feature("text"))[:, :8] * 10.0  # a second, differently scaled text view
    ds2 = ds.with_feature("title", title)
    ds2.save(tmp_path / "two")
    cfg = tiny(**{"data.source": str(tmp_path / "two"), "data.features": {"text": ["text", "title"], "image": "image"}})
    feats = stage_features(cfg, load_data(cfg))
    text = np.array(ds.feature("text"))
    assert feats["text"].shape == (40, text.shape[1] + 8)
    np.testing.assert_allclose(feats["text"][:, : text.shape[1]], text / np.linalg.norm(text, axis=1, keepdims=True),
                               rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats["text"][:, text.shape[1]:], axis=1), 1.0, rtol=1e-5)
    assert "feat_image" in load_data(cfg).target.items.column_names
    title[7] = 0.0
    ds.with_feature("title", title).save(tmp_path / "hole")
    with pytest.raises(DataError, match="feat_title.*item 7"):
        run_pipeline(cfg.override({"data.source": str(tmp_path / "hole")}), tmp_path / "r")
    _no_training_outputs(tmp_path / "r")
    with pytest.raises(ValueError, match="distinct"):
        tiny(**{"data.features": {"text": ["text", "text"], "image": "image"}})


def test_impossible_codebook_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="distinct"):
        run_pipeline(tiny(**{"quantize.levels": 2, "quantize.codebook_size": 8}), tmp_path / "r")  # 64 < 150
    _no_training_outputs(tmp_path / "r")


def test_config_modalities_and_errors():
    cfg = tiny(**{"data.modalities": ["image", "id"]})
    assert cfg.fusion.modalities == ["image", "id"] and cfg.model.item_id == "none"  # two separate switches
    assert PipelineConfig().model.item_id == "none" and PipelineConfig().model.head == "catalogue"  # the paper's
    assert PipelineConfig.from_dict({"data": {"modalities": ["text"]}}).fusion.modalities == ["text"]
    assert tiny(**{"data.modalities": None, "fusion.modalities": ["text", "id"]}).fusion.use_id
    with pytest.raises(ConfigError, match="strategy"):
        tiny(**{"pretrain.strategy": "bogus"})
    with pytest.raises(ConfigError, match="unknown field"):
        tiny(**{"finetune.epoch": 3})
    assert tiny(**{"finetune.label_smoothing": 0.1}).finetune.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="label_smoothing.*smooths an item softmax"):
        tiny(**{"model.head": "levels", "finetune.label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="select_code_weight.*input_and_head"):
        tiny(**{"finetune.select_code_weight": [0, 1]})
    assert tiny(**{"finetune.pseudo_new": 0.2}).finetune.pseudo_new == 0.2
    assert tiny(**{"finetune.negatives": "sampled", "pretrain.num_negatives": 64}).pretrain.num_negatives == 64
    with pytest.raises(ConfigError, match="pretrain.negatives 'sampled' samples an item softmax"):
        tiny(**{"model.head": "levels", "pretrain.negatives": "sampled"})
    for bad in ({"model.head": "levels"}, {"model.prefix_lengths": []}, {"model.item_id": "input_and_head"}):
        with pytest.raises(ConfigError, match="pseudo_new.*prefix rows"):
            tiny(**{"finetune.pseudo_new": 0.2, **bad})
    for name in ("synthetic.yaml", "instruments.yaml", "instruments-hybrid.yaml"):
        PipelineConfig.from_yaml(REPO / "configs" / name)
    for name in ("synthetic.yaml", "instruments.yaml"):  # the paper's model: no item-ID table in stage 3
        assert PipelineConfig.from_yaml(REPO / "configs" / name).model.item_id == "none"
    assert PipelineConfig.from_yaml(REPO / "configs" / "synthetic.yaml") == quickstart_config()


def test_hybrid_instruments_config_is_the_documented_search_command():
    """configs/instruments-hybrid.yaml = configs/instruments.yaml + the flags of runs/s9-ema2k-20ep's command
    (whose item-ID switches are now spelled out: model.item_id input_and_head, model.head levels)."""
    from qbert.cli.pipeline_cmd import load_config

    flags = ["finetune.lr=1e-3", "finetune.schedule=cosine", "finetune.warmup_epochs=1", "finetune.patience=5",
             "finetune.select_code_weight=[0,0.25,0.5,1]", "finetune.epochs=15", "pretrain.epochs=10",
             "model.hidden=256", "model.repeat_bias=true", "finetune.mask_ratio=0.15", "finetune.ema_ramp=2",
             "finetune.ema_decay=0.9995", "model.item_id=input_and_head", "model.head=levels",
             "finetune.epochs=20"]
    best = load_config(REPO / "configs" / "instruments-hybrid.yaml", [])
    assert best == load_config(REPO / "configs" / "instruments.yaml", flags)
    assert best != load_config(REPO / "configs" / "instruments.yaml", flags[:-1])  # the 20-epoch budget is part of it


def test_cli_pipeline_reports_bad_override_and_bad_config(tmp_path, capsys):
    from qbert.cli import main

    assert main(["pipeline", "--out", str(tmp_path / "x"), "--set", "finetune.nope=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: {lr: -1}\n")
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "finetune.lr" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_pipeline_runs_and_prints_metrics(tmp_path, capsys):
    from qbert.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    tiny(**{"plots": False}).to_yaml(cfg_path)
    rc = main(["pipeline", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--set", "pretrain.strategy=none",
               "--set", "finetune.epochs=2", "--set", "fusion.epochs=1", "--set", "quantize.epochs=2"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["test"]) == set(METRICS)
    assert not (tmp_path / "run" / "pretrain.pt").exists()
    saved = PipelineConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.pretrain.strategy == "none" and saved.finetune.epochs == 2
    # `qbert evaluate` reloads a pipeline run and reproduces its recorded test metrics
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in METRICS} == pytest.approx(printed["test"], abs=1e-9)
    assert again["exclude_history"] is False and again["code_score_weight"] == 1.0
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--split", "valid", "--exclude-history"]) == 0
    assert json.loads(capsys.readouterr().out)["exclude_history"] is True
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data", "synthetic"]) == 2
    assert "--data applies to baseline runs" in capsys.readouterr().err
    # a stage alone, inside the run directory, through the one driver: another fine-tuning config is
    # fine, another setting of an earlier stage (whose outputs it would read) is refused
    assert main(["finetune", "--out", str(tmp_path / "run"), "--set", "finetune.epochs=1"]) == 0
    # its own settings changed, so the 2-epoch run's checkpoint was not resumed: it trained 1 epoch anew
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1
    assert not (tmp_path / "run" / "metrics.json").exists()  # no longer the finished run it described
    assert main(["finetune", "--out", str(tmp_path / "run"), "--set", "quantize.epochs=99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "quantize.epochs: 2 there, 99 here" in err


def test_reuse_takes_earlier_stages_from_a_finished_run_only_when_their_settings_match(tmp_path):
    fast = {"fusion.epochs": 1, "quantize.epochs": 2, "pretrain.epochs": 1, "finetune.epochs": 2, "plots": False,
            "model.item_id": "input_and_head", "model.head": "levels"}  # the hybrid: its ranking weight is chosen
    src = tmp_path / "src"
    run_pipeline(tiny(**fast), src)
    reuse = {"reuse.from_run": str(src), "reuse.stages": ["fusion", "quantize", "pretrain"]}
    cfg = tiny(**fast, **reuse, **{"finetune.mask_ratio": 0.15,  # a fine-tuning-only change (Fig. 5)
                                   "finetune.select_code_weight": [0.0, 1.0]})
    metrics = run_pipeline(cfg, tmp_path / "dst")
    ft = metrics["stages"]["finetune"]  # the ranking weight is chosen on valid and kept with the model
    assert ft["code_score_weight"] in (0.0, 1.0) and set(ft["code_weight_valid"]) == {"0.0", "1.0"}
    assert metrics["valid"] == {k: ft["code_weight_valid"][str(ft["code_score_weight"])][k] for k in metrics["valid"]}
    payload = torch.load(tmp_path / "dst" / "model.pt", weights_only=False)
    assert payload["code_score_weight"] == ft["code_score_weight"]
    for name in ("fused_embeddings.parquet", "semantic_ids.parquet", "pretrain.pt"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes(), name
    assert not (tmp_path / "dst" / "checkpoints" / "pretrain").exists()  # nothing upstream was retrained
    assert metrics["stages"]["quantize"]["reused_from"] == str(src.resolve())
    assert metrics["stages"]["finetune"]["init"].startswith("pretrained") and metrics["epochs_run"] == 2
    # a setting the pretrained encoder depends on differs: refused, naming it, before any training
    with pytest.raises(ConfigError, match="model.layers"):
        run_pipeline(tiny(**fast, **reuse, **{"model.layers": 1}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # reusing only fusion + quantize is fine with another encoder (one layer, a learned repeat bias)
    ok = run_pipeline(tiny(**fast, **{"reuse.from_run": str(src), "reuse.stages": ["fusion", "quantize"],
                                      "model.layers": 1, "model.repeat_bias": True, "model.prefix_bias": True}),
                      tmp_path / "layers1")
    assert "reused_from" not in ok["stages"]["pretrain"]
    model, _ = load_run_model(tmp_path / "layers1")  # the learned shift is recorded and reloads with the model
    assert ok["stages"]["finetune"]["repeat_weight"] == pytest.approx(float(model.repeat_weight.detach()))
    assert ok["stages"]["finetune"]["prefix_weight"] == pytest.approx(model.prefix_weight.tolist())
    assert len(ok["stages"]["finetune"]["prefix_weight"]) == model.K - 1
    assert "repeat_weight" not in metrics["stages"]["finetune"]
    check_reuse(tiny(**fast, **reuse, **{"model.code_score_weight": 0.5}))  # ranking-only: no stage depends on it
    # the cold-start protocol withholds interactions, not content: stages 1-2 are reusable, pretraining is not
    cold = {"data.cold_start.fraction": 0.2}
    check_reuse(tiny(**fast, **cold, **{"reuse.from_run": str(src), "reuse.stages": ["fusion", "quantize"]}))
    with pytest.raises(ConfigError, match="pretrain stage .*data.cold_start.fraction"):
        check_reuse(tiny(**fast, **reuse, **cold))
    with pytest.raises(ConfigError, match="first stages"):
        tiny(**{"reuse.from_run": str(src), "reuse.stages": ["quantize"]})
    with pytest.raises(ConfigError, match="no finished run"):
        run_pipeline(tiny(**fast, **{"reuse.from_run": str(tmp_path / "nowhere"), "reuse.stages": ["fusion"]}),
                     tmp_path / "none")


def test_settings_added_later_keep_the_hashes_of_older_runs_until_set():
    """A setting added after run directories existed (model.tie_prefix, ...) is absent from a stage's
    inputs at its default, so those directories stay resumable and reusable; set, it counts."""
    from qbert.pipeline.runs import _HASHED_WHEN_SET, _stage_inputs

    plain, tied = tiny(), tiny(**{"model.tie_prefix": True})
    for stage in ("pretrain", "finetune"):
        inputs = _stage_inputs(plain, stage)
        assert not [k for k in _HASHED_WHEN_SET if k.split(".")[1] in inputs.get(k.split(".")[0], {})]
        assert _stage_inputs(tied, stage)["model"]["tie_prefix"] is True
    assert _stage_inputs(tied, "quantize") == _stage_inputs(plain, "quantize")


def test_stage_1_settings_leave_out_the_cold_start_protocol_and_reuse_counts_only_for_finished_runs(tmp_path):
    from qbert.pipeline.runs import _stage_inputs

    plain, cold = tiny(), tiny(**{"data.cold_start.fraction": 0.2})
    for stage in ("fusion", "quantize"):  # content only: the same settings, the same as before `ignores`
        assert _stage_inputs(cold, stage) == _stage_inputs(plain, stage)
        assert _stage_inputs(plain, stage)["data"] == plain.to_dict()["data"]
    for stage in ("pretrain", "finetune"):  # they read the interactions the protocol withholds
        assert _stage_inputs(cold, stage)["data"] == cold.to_dict()["data"] != plain.to_dict()["data"]
    plain.to_yaml(tmp_path / "config.yaml")
    reused = plain.override({"reuse.from_run": str(tmp_path), "reuse.stages": ["fusion"]})
    assert config_differences(tmp_path / "config.yaml", reused) == ["reuse.from_run", "reuse.stages"]  # resume: not the same
    assert config_differences(tmp_path / "config.yaml", reused, ignore_reuse=True) == []  # a finished run: the same
