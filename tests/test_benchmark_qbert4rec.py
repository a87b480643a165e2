"""benchmarks/qbert4rec.py in smoke mode: tables, dedupe of rows equal to the main run, resume,
and the cost table measured on the real saved model; plus the profiling helpers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qbert.pipeline import load_run_model
from qbert.seqrec.profile import (
    parameter_count,
    ranking_latency_per_user,
    score_flops_per_sample,
    train_flops_per_sample,
    training_throughput,
)
from qbert.seqrec.qbert4rec import QBert4Rec

REPO = Path(__file__).resolve().parents[1]
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def _bench(name: str = "qbert4rec"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # OMP_WAIT_POLICY=PASSIVE (set by the script) comes too late once torch is imported, and
    # spinning OpenMP workers on the shared CI cores made these tests 5-20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _mtimes(runs: Path) -> dict[str, int]:
    return {str(p.relative_to(runs)): p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()
            and not p.name.startswith("qbert4rec.")}


def test_quick_benchmark_tables_dedupe_resume_and_cost(bench, tmp_path):
    runs, out_json, out_md = tmp_path / "runs", tmp_path / "q.json", tmp_path / "q.md"
    argv = ["--quick", "--runs-dir", str(runs), "--tables", "main,pretraining,cost",
            "--out-json", str(out_json), "--out-md", str(out_md)]
    assert bench.main(argv) == 0
    res = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["main", "pretraining-none", "pretraining-mlm", "pretraining-multi"]
    for r in rows.values():
        assert set(r["test"]) == set(METRICS) and all(0.0 <= r["test"][k] <= 1.0 for k in METRICS)
        assert r["valid NDCG@10"] is not None and r["best_epoch"] >= 1
        assert r["collision_rate_after"] == 0.0 and r["data_fingerprint"] and r["git_commit"]
        assert r["activated_layers_median"] is not None
    assert {rows[n]["status"] for n in ("main", "pretraining-none", "pretraining-mlm")} == {"ran"}
    # the multi row has the main row's config: it shares that run instead of training again
    assert rows["pretraining-multi"]["status"] == "shared"
    assert rows["pretraining-multi"]["run_dir"] == rows["main"]["run_dir"] == str(runs / "main")
    assert rows["pretraining-multi"]["test"] == rows["main"]["test"]
    assert not (runs / "pretraining-multi").exists()
    assert not (runs / "pretraining-none" / "pretrain.pt").exists() and rows["pretraining-none"]["init"] == "scratch"
    assert (runs / "main" / "pretrain.pt").is_file()
    assert rows["pretraining-none"]["overrides"] == {"pretrain.strategy": "none"}
    meta = res["meta"]
    assert meta["quick"] and meta["seed"] == 0 and "--quick" in meta["command"] and meta["machine"]["cpu_count"]

    md = out_md.read_text()
    for needle in ("Table 2", "Table 4", "Table 6", "Q-BERT4Rec (paper)", "0.1418", "no pretraining", "multi-mask",
                   meta["command"]):
        assert needle in md, needle
    assert "Table 3" not in md and "Table 5" not in md

    # --finished-only tabulates the finished runs and names the rest, training nothing
    before = sorted(p.name for p in runs.iterdir())
    assert bench.main(["--quick", "--runs-dir", str(runs), "--tables", "main,pretraining,fusion", "--finished-only",
                       "--out-json", str(tmp_path / "f.json"), "--out-md", str(tmp_path / "f.md")]) == 0
    partial = json.loads((tmp_path / "f.json").read_text())
    assert [r["name"] for r in partial["rows"]] == ["main", "pretraining-none", "pretraining-mlm", "pretraining-multi",
                                                     "fusion-dynamic"]
    assert partial["not_run"] == ["fusion/fixed fusion"] and sorted(p.name for p in runs.iterdir()) == before
    assert "Not run yet (their runs have not finished): fusion/fixed fusion" in (tmp_path / "f.md").read_text()

    # cost: measured on the main run's saved model
    cost = res["cost"]
    model, _ = load_run_model(runs / "main")
    assert cost["params"] == sum(p.numel() for p in model.parameters()) > 0
    for k in ("train_flops_per_sample", "score_flops_per_sample", "latency_ms_per_user", "train_samples_per_s"):
        assert cost[k] > 0, k

    # the ranking weight of the semantic-ID term exists only in the hybrid: the paper's model is refused
    cw = _bench("code_weight")
    with pytest.raises(SystemExit):
        cw.main(["--run", str(runs / "main")])
    with pytest.raises(SystemExit):
        cw.main(["--run", str(tmp_path / "nowhere")])

    # the table of finished runs reads what each run recorded, without retraining
    rt = _bench("runs_table")
    assert rt.main(["--name", "t", "--out-dir", str(tmp_path), "--run", str(runs / "main"),
                    "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = json.loads((tmp_path / "t.json").read_text())
    assert got["best_valid"] == str(runs / "main") and got["rows"][0]["test"] == rows["main"]["test"]
    assert got["rows"][0]["valid"]["NDCG@10"] == pytest.approx(rows["main"]["valid NDCG@10"], abs=1e-9)
    assert got["rows"][0]["repeat_weight"] is None and "(best valid)" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        rt.main(["--name", "t", "--out-dir", str(tmp_path), "--run", str(tmp_path / "nowhere")])
    # a run of the same setup under another seed: the two are repeats, so main marks neither best
    twin = tmp_path / "main-twin"
    twin.mkdir()
    summary = json.loads((runs / "main" / "summary.json").read_text())
    seed = summary["config"].get("seed", 42)
    summary["config"]["seed"] = seed + 1
    (twin / "summary.json").write_text(json.dumps(summary))
    (twin / "metrics.json").write_text((runs / "main" / "metrics.json").read_text())
    assert rt.main(["--name", "t2", "--out-dir", str(tmp_path), "--run", str(runs / "main"), "--run", str(twin)]) == 0
    got = json.loads((tmp_path / "t2.json").read_text())
    assert got["best_valid"] is None and [g["seeds"] for g in got["seed_groups"]] == [[seed, seed + 1]]
    assert "(best valid)" not in (tmp_path / "t2.md").read_text()

    # resume: a second call trains nothing and leaves every run file as it was
    before = _mtimes(runs)
    assert bench.main(argv) == 0
    again = {r["name"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert [again[n]["status"] for n in rows] == ["resumed", "resumed", "resumed", "shared"]
    assert _mtimes(runs) == before
    assert {n: again[n]["test"] for n in rows} == {n: r["test"] for n, r in rows.items()}

    # a finished run of another config in the same directory is an error, never silently reported
    assert bench.main(argv + ["--seed", "7"]) == 2
    assert _mtimes(runs) == before


def test_bad_table_name_is_rejected(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--runs-dir", str(tmp_path), "--tables", "main,tabel9"]) == 2
    assert "tabel9" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_plan_rows_covers_every_ablation(bench):
    rows = bench.plan_rows(list(bench.TABLES))
    names = [r.name for r in rows]
    assert names[0] == "main" and len(set(names)) == len(names)
    assert {tuple(r.overrides.get("data.modalities", [])) for r in rows if r.table == "modalities"} == {
        ("image",), ("text",), ("id",), ("text", "image", "id")}
    assert {r.overrides["pretrain.strategy"] for r in rows if r.table == "pretraining"} == {"none", "mlm", "multi"}
    assert {r.overrides["fusion.variant"] for r in rows if r.table == "fusion"} == {"fixed", "dynamic"}


def test_profile_helpers_measure_without_touching_the_model():
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (30, 2))
    model = QBert4Rec(codes, num_codes=8, hidden=16, layers=1, heads=2, max_len=8, item_id="input_and_head", head="levels")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(1, 31, (12, 8))
    tokens[:3, :4] = 0  # some left padding
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    train = train_flops_per_sample(model, tokens, mask)
    score = score_flops_per_sample(model, tokens[:, :-1])
    assert train > score > 0  # forward + backward over every position costs more than one ranking forward
    last = lambda valid, g: valid & (torch.arange(valid.shape[1]) == valid.shape[1] - 1)
    assert training_throughput(model, tokens, last, batch_size=4, steps=2) > 0
    assert ranking_latency_per_user(model, tokens[:, :-1], batch_size=5) > 0
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # restored


def test_dry_run_prints_the_plan_and_runs_nothing(bench, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert bench.main(["--quick", "--runs-dir", str(runs), "--tables", "main,fusion", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    status = {ln.split()[0] + ":" + ln.split()[1]: ln for ln in lines}
    assert len(lines) == 3 and " todo " in status["fusion:fixed"] and " shared " in status["fusion:dynamic"]
    assert str(runs / "main") in status["fusion:dynamic"]
    assert not runs.exists()


def test_runs_table_lists_only_the_options_a_run_moved_off_their_default():
    from qbert.pipeline import PipelineConfig

    rt = _bench("runs_table")
    assert rt._options(PipelineConfig()) == {}
    cfg = PipelineConfig.from_dict({"model": {"hidden": 256, "prefix_bias": True},
                                    "finetune": {"ema_decay": 0.999, "mask_ratio": 0.3, "label_smoothing": 0.1}})
    assert rt._options(cfg) == {"model.hidden": 256, "model.prefix_bias": True, "finetune.ema_decay": 0.999,
                                "finetune.label_smoothing": 0.1}


def test_runs_table_groups_seed_repeats_of_one_setup():
    from qbert.pipeline import PipelineConfig

    rt = _bench("runs_table")
    base = {"finetune": {"lr": 1e-3}}
    key = rt.setup_key(PipelineConfig.from_dict(base))
    # the seed (copied into fusion and quantize) and where stages came from do not change the setup ...
    assert rt.setup_key(PipelineConfig.from_dict({**base, "seed": 7, "device": "cpu"})) == key
    assert rt.setup_key(PipelineConfig.from_dict(
        {**base, "reuse": {"from_run": "runs/x", "stages": ["fusion"]}})) == key
    # ... a training setting or the synthetic data's own seed does
    assert rt.setup_key(PipelineConfig.from_dict({"finetune": {"lr": 2e-3}})) != key
    assert rt.setup_key(PipelineConfig.from_dict({**base, "data": {"synthetic": {"seed": 1}}})) != key

    def row(run, setup, seed, v):
        return {"run": run, "setup": setup, "seed": seed, "valid": dict.fromkeys(METRICS, v),
                "test": dict.fromkeys(METRICS, v / 2)}

    rows = [row("a", "s1", 1, 0.10), row("b", "s1", 2, 0.14), row("c", "s2", 1, 0.2), row("d", "s1", 3, 0.12)]
    (g,) = rt.seed_groups(rows)  # s2 has one seed: no group
    assert g["runs"] == ["a", "b", "d"] and g["seeds"] == [1, 2, 3]
    assert g["valid"]["NDCG@10"]["mean"] == pytest.approx(0.12) and g["valid"]["HR@1"]["std"] == pytest.approx(0.02)
    assert g["test"]["HR@10"]["mean"] == pytest.approx(0.06) and g["test"]["HR@10"]["std"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="repeated seed"):
        rt.seed_groups(rows + [row("e", "s1", 2, 0.1)])
    md = rt._seed_markdown([g])
    assert any("0.1200 ± 0.0200" in ln and "1, 2, 3" in ln for ln in md)
    for r in rows:
        r.update(settings={"pretrain_epochs": 1, "pretrain_schedule": "constant", "finetune_lr": 1e-3,
                           "finetune_schedule": "cosine"}, repeat_weight=None, code_score_weight=1.0,
                 best_epoch=1, epochs_run=1)
    meta = {"command": "c", "git_commit": "g", "date": "d"}
    assert "(best valid)" not in rt.markdown(rows[:2], None, meta, [g]) and "none is marked best" in \
        rt.markdown(rows[:2], None, meta, [g])
    assert "**b** (best valid)" in rt.markdown(rows, 1, meta)
    # a search run that kept test off is listed with its valid numbers, test "not scored"
    valid_only = {**rows[1], "run": "v", "seed": 9, "test": None}
    assert "| v | 9 |" in rt.markdown([rows[0], valid_only], 0, meta)
    assert rt.markdown([rows[0], valid_only], 0, meta).split("| v | 9 |")[1].split("\n")[0].count("not scored") == 5
    (g2,) = rt.seed_groups([rows[0], valid_only])
    assert g2["test"] is None and g2["valid"]["NDCG@10"]["mean"] == pytest.approx(0.12)
    assert any("not scored" in ln for ln in rt._seed_markdown([g2]))
