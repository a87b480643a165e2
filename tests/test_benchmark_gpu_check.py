"""benchmarks/gpu_check.py on CPU against CPU (what a maintainer runs with --device cuda on a lent
GPU): every stage measured, the report's shape, and exact agreement of two fp32 runs on one device."""

from __future__ import annotations

import json

import pytest
from test_benchmark_qbert4rec import _bench

pytestmark = pytest.mark.timeout(600)
STAGES = ["fusion", "quantize", "pretrain", "finetune"]


def test_every_stage_against_the_reference(tmp_path, capsys):
    bench = _bench("gpu_check")
    assert bench.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    for run in ("reference", "fp32", "low_precision"):
        assert list(r[run]) == STAGES
        assert all(s["samples_per_second"] > 0 and s["peak_mib"] > 0 for s in r[run].values())
    eq = r["equivalence"]  # the same device twice in fp32: the same numbers
    assert eq["first_loss_rel_diff"] == dict.fromkeys(STAGES, 0.0)
    assert eq["same_semantic_id"] == 1.0 and eq["valid_ndcg10_diff"] == 0.0
    assert r["low_precision"]["pretrain"]["first_loss"] != r["fp32"]["pretrain"]["first_loss"]  # bf16 did run
    assert "| quantize |" in (tmp_path / "gpu_check_cpu.md").read_text()

    capsys.readouterr()
    assert bench.main(["--device", "cpu", "--quick"]) == 2 and "--out-dir" in capsys.readouterr().err
