"""Every failure a user can cause ends in `error: ...`, exit 2, no traceback (#25 item 3): corrupt
parquet in a prepared dataset, --out that is a file / under one / not writable, a non-positive
--threads, a non-UTF-8 config, a diverging loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qbert.data.synthetic import SyntheticConfig, make_synthetic

Q = [sys.executable, "-c", "import sys; from qbert.cli import main; sys.exit(main())"]
TINY = ["--set", "data.synthetic.num_users=60", "--set", "data.synthetic.num_items=40", "--set", "fusion.epochs=1",
        "--set", "quantize.epochs=2", "--set", "pretrain.epochs=1", "--set", "finetune.epochs=1", "--set", "plots=false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    make_synthetic(SyntheticConfig(num_users=50, num_items=30, num_clusters=3)).save(d / "corrupt")
    items = d / "corrupt" / "items.parquet"
    items.write_bytes(items.read_bytes()[:200])
    (d / "afile").write_text("x")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    return d


CASES = {
    "stats of a corrupt parquet": (["data", "stats", "{d}/corrupt"], "items.parquet: not a readable parquet file"),
    "pipeline on a corrupt parquet": (["pipeline", "--out", "{d}/r1", "--set", "data.source={d}/corrupt"],
                                      "items.parquet: not a readable parquet file"),
    "baseline on a corrupt parquet": (["baseline", "--model", "sasrec", "--data", "{d}/corrupt", "--out", "{d}/b1"],
                                      "items.parquet: not a readable parquet file"),
    "--out is a file": (["pipeline", "--out", "{d}/afile"], "is a file, not a directory"),
    "--out under a file": (["pipeline", "--out", "{d}/afile/sub"], "afile is a file"),
    "--out not writable": (["pipeline", "--out", "/proc/qbert-run"], "not writable"),
    "--threads -3": (["pipeline", "--out", "{d}/r2", "--threads", "-3"], "expected a positive integer, got -3"),
    "non-UTF-8 config": (["pipeline", "--config", "{d}/binary.yaml", "--out", "{d}/r3"], "is not UTF-8 text"),
    "diverging loss": (["pipeline", "--out", "{d}/r4", *TINY, "--set", "finetune.lr=1e9", "--set", "pretrain.lr=1e9"],
                       "non-finite loss"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_a_named_error_and_no_traceback(case, inputs):
    args, message = CASES[case]
    r = subprocess.run([*Q, *[a.format(d=inputs) for a in args]], capture_output=True, text=True, timeout=280)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-2000:]
    assert "error: " in r.stderr
