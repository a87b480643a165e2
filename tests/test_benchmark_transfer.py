"""benchmarks/transfer.py in quick mode: the four pretraining rows in the issue's shape, one
vocabulary over the union for the transfer rows (``both`` reuses ``other-domains``' semantic IDs),
pretraining on exactly the domains named, resume without re-training, bad input named."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_benchmark_qbert4rec import _bench, one_thread  # noqa: F401 - the module's autouse fixture

pytestmark = pytest.mark.timeout(900)


def test_four_pretraining_rows_share_a_vocabulary_and_resume(tmp_path, capsys):
    bench = _bench("transfer")
    runs = tmp_path / "runs"
    assert bench.main(["--quick", "--runs-dir", str(runs)]) == 0
    rows = json.loads((runs / "transfer.json").read_text())["rows"]
    assert [(r["target"], r["pretraining"], r["model"]) for r in rows] == [
        ("synthetic", p, "qbert4rec") for p in ("none", "target", "other-domains", "both")]
    for r in rows:
        assert set(r["valid"]) == {"HR@10", "NDCG@10"} and set(r["test"]) == {"HR@1", "HR@5", "HR@10", "NDCG@5",
                                                                              "NDCG@10"}
        assert r["command"].startswith("python benchmarks/transfer.py")
        metrics = json.loads((runs / "synthetic" / r["pretraining"] / "seed42" / "metrics.json").read_text())
        assert metrics["test"]["NDCG@10"] == r["test"]["NDCG@10"]  # the run's own single test pass
    by = {r["pretraining"]: r for r in rows}
    assert by["none"]["pretraining_data"] == [] and by["target"]["pretraining_data"] == ["synthetic"]
    others = by["other-domains"]["pretraining_data"]
    assert others == ["synthetic:seed=7", "synthetic:seed=8"]
    assert by["both"]["pretraining_data"] == ["synthetic", *others]
    assert by["none"]["vocabulary"] == ["synthetic"] and by["both"]["vocabulary"] == ["synthetic", *others]

    run = {p: runs / "synthetic" / p / "seed42" for p in by}
    # the transfer rows write every domain's items in one set of codes, the same for both rows
    sid_c, sid_d = (pq.read_table(run[p] / "semantic_ids.parquet") for p in ("other-domains", "both"))
    n_target = pq.read_table(run["target"] / "semantic_ids.parquet").num_rows
    assert sid_c.num_rows == n_target + 180 + 160 and sid_c.equals(sid_d)
    stages_d = json.loads((run["both"] / "metrics.json").read_text())["stages"]
    assert stages_d["fusion"]["reused_from"] == stages_d["quantize"]["reused_from"] == str(run["other-domains"].resolve())
    pre = {p: json.loads((run[p] / "metrics.json").read_text())["stages"]["pretrain"] for p in by}
    assert pre["other-domains"]["domains"] == ["source0", "source1"]
    assert pre["both"]["domains"] == ["target", "source0", "source1"]
    assert pre["both"]["rows"] > pre["other-domains"]["rows"] > 0
    assert "| synthetic | other-domains |" in (runs / "transfer.md").read_text()

    before = {str(p): p.stat().st_mtime_ns for p in runs.rglob("*.pt")}
    assert bench.main(["--quick", "--runs-dir", str(runs), "--pretraining", "both"]) == 0
    assert {str(p): p.stat().st_mtime_ns for p in runs.rglob("*.pt")} == before  # read, not re-trained
    assert len(json.loads((runs / "transfer.json").read_text())["rows"]) == 4

    capsys.readouterr()
    assert bench.main(["--runs-dir", str(runs), "--pretraining", "both"]) == 2
    assert capsys.readouterr().err.startswith("error: --others")
