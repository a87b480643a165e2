"""SIGKILL a real `qbert pipeline` process in each stage, run the same command again, and get
exactly what an uninterrupted run gives: the same semantic IDs and the same test metrics (#25)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

STAGES = {"fusion": "fused_embeddings.parquet", "quantize": "semantic_ids.parquet", "pretrain": "pretrain.pt",
          "finetune": "model.pt"}  # stage -> what it writes when it ends
SETTINGS = [  # tiny, 1 thread, fp32: seconds per stage, deterministic on CPU
    "data.synthetic.num_users=200", "data.synthetic.num_items=80", "data.synthetic.num_clusters=8",
    "data.synthetic.max_len=10", "data.max_len=10",
    "fusion.dim=16", "fusion.layers=2", "fusion.epochs=6", "fusion.batch_size=16",
    "quantize.levels=2", "quantize.codebook_size=16", "quantize.code_dim=8", "quantize.hidden=[16]",
    "quantize.epochs=30", "quantize.batch_size=8",
    "model.hidden=16", "model.layers=1", "model.prefix_buckets=256",
    "pretrain.epochs=4", "pretrain.batch_size=16", "pretrain.precision=fp32",
    "finetune.epochs=4", "finetune.batch_size=16", "finetune.patience=0", "finetune.precision=fp32",
    "plots=false", "device=cpu",
]
CMD = [sys.executable, "-c", "import sys; from qbert.cli import main; sys.exit(main())", "pipeline", "--threads", "1",
       *[a for s in SETTINGS for a in ("--set", s)]]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(out: Path) -> None:
    subprocess.run([*CMD, "--out", str(out)], check=True, env=_env(), capture_output=True, timeout=300)


def _results(out: Path) -> tuple[list, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return pq.read_table(out / "semantic_ids.parquet").column("sid").to_pylist(), metrics["test"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list, dict]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run(out)
    return _results(out)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_in_a_stage_and_resumed_equals_the_uninterrupted_run(stage, reference, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / stage / "last.pt"
    proc = subprocess.Popen([*CMD, "--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before {stage} wrote its first checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: after its first checkpoint, before it ends
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / STAGES[stage]).exists(), f"{stage} had finished: the kill came too late"
    # what a kill inside a checkpoint write leaves (writes go to a temporary sibling, then rename):
    # a truncated temporary file beside the last complete checkpoint
    (ckpt.parent / f".{ckpt.name}.killed.tmp").write_bytes(ckpt.read_bytes()[:1000])
    _run(out)  # the same command: resumes from the stage's checkpoint (the lock of the dead run is stale)
    assert _results(out) == reference
    assert not list(out.rglob("*.tmp"))
