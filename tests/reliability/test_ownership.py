"""run.json and checkpoints/<stage>/owner.json: every artifact and checkpoint names the run and the
settings it belongs to; another run's checkpoints and changed artifacts are refused (#25 item 1)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from test_pipeline import tiny

from qbert.config import ConfigError
from qbert.pipeline import REGISTRY, STAGES, run_pipeline
from qbert.pipeline.ownership import file_hash, settings_hash
from qbert.pipeline.runs import _stage_inputs

pytestmark = pytest.mark.timeout(600)


def _cfg():
    return tiny(**{"fusion.epochs": 1, "quantize.epochs": 2, "pretrain.epochs": 1, "finetune.epochs": 1,
                   "plots": False})


def test_manifest_owners_and_refusals(tmp_path):
    run = tmp_path / "run"
    metrics = run_pipeline(_cfg(), run)
    manifest = json.loads((run / "run.json").read_text())
    rid = manifest["run_id"]
    assert metrics["run_id"] == rid == json.loads((run / "summary.json").read_text())["run_id"]
    for stage in STAGES:
        owner = json.loads((run / "checkpoints" / stage / "owner.json").read_text())
        assert owner["run_id"] == rid
        for name in REGISTRY[stage].writes:
            if (run / name).is_file():
                entry = manifest["artifacts"][name]
                assert (entry["stage"], entry["run_id"], entry["settings_hash"]) == (stage, rid, owner["settings_hash"])
                assert entry["sha256"] == file_hash(run / name)
    # settings hashes: a fine-tuning setting changes fine-tuning's hash only
    other = tmp_path / "other"
    run_pipeline(_cfg().override({"finetune.lr": 1e-3}), other, stages=list(STAGES[:1]))
    theirs = {s: json.loads((other / "checkpoints" / s / "owner.json").read_text())["settings_hash"]
              for s in STAGES[:1]}
    assert theirs["fusion"] == json.loads((run / "checkpoints/fusion/owner.json").read_text())["settings_hash"]
    finetune_hash = json.loads((run / "checkpoints/finetune/owner.json").read_text())["settings_hash"]
    assert settings_hash(_stage_inputs(_cfg().override({"finetune.lr": 1e-3}), "finetune")) != finetune_hash

    # another run's checkpoints copied into this directory are refused, not resumed
    stolen = tmp_path / "stolen"
    shutil.copytree(run, stolen)
    (stolen / "metrics.json").unlink()
    owner = stolen / "checkpoints" / "finetune" / "owner.json"
    owner.write_text(json.dumps({**json.loads(owner.read_text()), "run_id": "someone-else"}))
    with pytest.raises(ConfigError, match="checkpoints of run 'someone-else'"):
        run_pipeline(_cfg(), stolen)

    # an artifact changed after its stage wrote it is refused by a later stage run alone
    table = pq.read_table(run / "semantic_ids.parquet")
    pq.write_table(table.slice(0, table.num_rows), run / "semantic_ids.parquet", compression="gzip")
    with pytest.raises(ConfigError, match="semantic_ids.parquet: changed after run"):
        run_pipeline(_cfg(), run, stages=["finetune"])
