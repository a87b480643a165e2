"""benchmarks/cost_growth.py: one process per domain, every stage measured (seconds per epoch,
peak memory of the stage), the JSON and markdown written, bad input named."""

from __future__ import annotations

import json

import pytest
from test_benchmark_qbert4rec import _bench

pytestmark = pytest.mark.timeout(600)


def test_each_domain_and_stage_measured(tmp_path, capsys):
    bench = _bench("cost_growth")
    small, large = "synthetic:users=200,items=80,max_len=12", "synthetic:users=600,items=160,max_len=12"
    args = ["--quick", "--runs-dir", str(tmp_path), "--threads", "1", "--sources", small, large,
            "--set", "finetune.epochs=2", "--set", "pretrain.epochs=2", "--set", "finetune.negatives=sampled",
            "--set", "finetune.num_negatives=16", "--name", "cost_growth_sampled"]
    assert bench.main(args) == 0
    out = json.loads((tmp_path / "cost_growth_sampled.json").read_text())
    rows = out["rows"]
    assert [r["source"] for r in rows] == [small, large] and rows[0]["interactions"] < rows[1]["interactions"]
    for r in rows:  # every training prefix is a fine-tuning row: more tokens than interactions in the training parts
        assert r["interactions"] < r["finetune_tokens"] and 0 < r["finetune_rows"] < r["finetune_tokens"]
    for r in rows:
        assert list(r["stages"]) == ["fusion", "quantize", "pretrain", "finetune"]
        for stage, s in r["stages"].items():
            assert s["epoch_seconds"] > 0 and s["peak_rss_mib"] > 50, (stage, s)
        assert r["stages"]["finetune"]["epochs"] == 2
        # every stage ran in the domain's own run directory, one stage at a time
        assert (tmp_path / f"d{rows.index(r)}" / "model.pt").is_file()
    assert out["command"].startswith("python benchmarks/cost_growth.py") and out["threads"] == 1
    md = (tmp_path / "cost_growth_sampled.md").read_text()
    assert "| finetune |" in md and "(1.00x)" in md

    capsys.readouterr()
    assert bench.main(["--quick"]) == 2 and "--runs-dir" in capsys.readouterr().err
    assert bench.main(["--runs-dir", str(tmp_path)]) == 2 and "--sources" in capsys.readouterr().err
    assert bench.main(["--quick", "--runs-dir", str(tmp_path), "--name", "../x"]) == 2
    assert "error: --name '../x'" in capsys.readouterr().err


def test_epoch_load_counts_the_rows_an_epoch_draws():
    import numpy as np

    bench = _bench("cost_growth")
    rows = np.array([[0, 1], [1, 2], [0, 3], [3, 4], [4, 5], [0, 6]])  # tokens 1, 2, 1, 2, 2, 1
    owners = np.array([0, 0, 1, 1, 1, 2])
    assert bench.epoch_load(rows, owners, 0) == (6, 9)
    # cap 2: user 1's three rows are each drawn with chance 2/3 (5 tokens -> 10/3)
    assert bench.epoch_load(rows, owners, 2) == (5, round(3 + 10 / 3 + 1))
    assert bench.epoch_load(rows, owners, 1) == (3, round(1.5 + 5 / 3 + 1))
    padded = np.concatenate([rows, [[0, 0]]]), np.append(owners, 3)  # an all-padding row is never trained on
    assert bench.epoch_load(*padded, 0) == (6, 9)
