"""Stage 0 on Ray Data: actor pools, resume, failure policy, CLI and the ray job entrypoint.

One local Ray session (2 CPUs, no dashboard) for the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from qbert.data.dataset import SeqDataset, from_sequences
from qbert.features.config import FeatureConfig, TemplateConfig
from qbert.features.extract import done_item_ids, load_features
from qbert.features.templates import assemble_texts
from feature_fixtures import make_tiny_clip, make_tiny_llama, tiny_items, write_images

ray = pytest.importorskip("ray")
N_ITEMS = 14
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipe_assets")
    images = [f"images/img{i}.{'png' if i % 2 == 0 else 'jpg'}" for i in range(N_ITEMS)]
    items = tiny_items(N_ITEMS, images)
    seqs = [[(u + k) % N_ITEMS for k in range(3 + u % 3)] for u in range(5)]
    data = from_sequences("tiny", seqs, N_ITEMS, items=items).save(root / "data")
    write_images(data / "images", N_ITEMS)
    return {"root": root, "data": data, "llama": make_tiny_llama(root / "llama", assemble_texts(items, TemplateConfig())),
            "clip": make_tiny_clip(root / "clip")}


def cfg_dict(assets: dict, out: Path, **over) -> dict:
    base = {
        "data": str(assets["data"]), "out": str(out), "modalities": ["text"],
        "text": {"model": str(assets["llama"]), "max_length": 32, "batch_size": 4},
        "image": {"model": assets["clip"]["local_dir"], "pretrained": None, "batch_size": 4},
        "pipeline": {"batch_size": 4, "actors": 1, "progress": False},
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return base


def stored_ids(fdir: Path) -> list[int]:
    return sorted(np.concatenate([pq.read_table(p).column("item_id").to_numpy() for p in fdir.glob("part-*.parquet")]).tolist())


def test_one_vs_two_actors_give_the_same_vectors_then_merge(assets, tmp_path):
    from qbert.platform.feature_pipeline import extract_features

    one, two = tmp_path / "one", tmp_path / "two"
    rep1 = extract_features(FeatureConfig.from_dict(cfg_dict(assets, one)))["modalities"]["text"]
    rep2 = extract_features(FeatureConfig.from_dict(cfg_dict(assets, two, pipeline={"actors": 2})))["modalities"]["text"]
    for rep, actors in ((rep1, 1), (rep2, 2)):
        assert rep["actors"] == actors and rep["encoded"] == N_ITEMS and rep["remaining"] == 0
        assert rep["files"] == 4 and rep["items_per_s"] > 0 and rep["num_gpus_per_actor"] == 0.0
        assert 1 <= rep["workers"] <= actors and rep["encode_items_per_s"] >= rep["items_per_s"]
    assert stored_ids(one / "text") == stored_ids(two / "text") == list(range(N_ITEMS))
    a, _ = load_features(str(one), "text", N_ITEMS)
    b, _ = load_features(str(two), "text", N_ITEMS)
    assert a.shape == (N_ITEMS, 32) and np.abs(a).sum() > 0
    np.testing.assert_allclose(a, b, atol=1e-6)
    # a re-run finds nothing to do and merges the features into the dataset
    res = extract_features(FeatureConfig.from_dict(cfg_dict(assets, two, merge_into=str(tmp_path / "merged"))))
    assert res["modalities"]["text"]["encoded"] == 0 and res["modalities"]["text"]["skipped_done"] == N_ITEMS
    merged = SeqDataset.load(tmp_path / "merged")
    np.testing.assert_array_equal(merged.feature("text"), b)
    assert merged.num_users == SeqDataset.load(assets["data"]).num_users


def test_fail_policy_then_resume_with_zero_policy_via_cli_and_ray_job(assets, tmp_path, capsys):
    from qbert.cli import main as cli_main

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    (data / "images" / "img12.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    (data / "images" / "img3.jpg").unlink()  # missing
    out = tmp_path / "feats"
    rc = cli_main(["features", "extract", "--data", str(data), "--out", str(out), "--modality", "image",
                   "--image-model", assets["clip"]["local_dir"], "--image-pretrained", "none", "--on-error", "fail",
                   "--batch-size", "5", "--actors", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("item 3 (orig_id 'B00003')" in err and "img3.jpg" in err) or \
           ("item 12 (orig_id 'B00012')" in err and "img12.png" in err), err
    first = done_item_ids(str(out / "image")).tolist()
    assert 3 not in first and 12 not in first  # a failing batch commits nothing
    assert not [p for p in (out / "image").iterdir() if p.name.endswith(".tmp")]

    # resume through the `ray job submit` entrypoint, now writing zero vectors + flags
    cfg_file = tmp_path / "features.yaml"
    cfg_file.write_text(yaml.safe_dump({"features": cfg_dict(assets, out, data=str(data), modalities=["image"],
                                                             on_error="zero", pipeline={"batch_size": 5})}))
    spec = importlib.util.spec_from_file_location("extract_features_job", REPO / "ray_jobs" / "extract_features.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    report_file = tmp_path / "report.json"
    assert job.main(["--config", str(cfg_file), "--actors", "2", "--report", str(report_file)]) == 0
    rep = json.loads(report_file.read_text())["modalities"]["image"]
    assert rep["skipped_done"] == len(first) and rep["encoded"] == N_ITEMS - len(first)
    assert rep["missing"] == 2 and sorted(rep["missing_items"]) == [3, 12]
    assert any("img3.jpg" in r for r in rep["missing_reasons"]) and any("img12.png" in r for r in rep["missing_reasons"])
    assert stored_ids(out / "image") == list(range(N_ITEMS))  # each item exactly once
    m, miss = load_features(str(out), "image", N_ITEMS)
    assert miss.tolist() == [i in (3, 12) for i in range(N_ITEMS)] and not m[[3, 12]].any()
    np.testing.assert_allclose(np.linalg.norm(m[~miss], axis=1), 1.0, atol=1e-5)


def test_a_failed_run_waits_for_writes_in_progress_and_refuses_new_ones(tmp_path):
    """The race a failing multi-actor run had: another actor's batch landed after the CLI returned."""
    import time

    from qbert.features.extract import CommitAborted
    from qbert.platform.feature_pipeline import _CommitGate, _gated, _settle

    @ray.remote(num_cpus=0)
    def write(gate, path: str, seconds: float) -> str:
        with _gated(gate):
            time.sleep(seconds)
            Path(path).write_text("committed")
        return path

    def until_writing(gate) -> None:
        deadline = time.monotonic() + 60
        while ray.get(gate.writing.remote()) == 0:  # the slow write has begun
            assert time.monotonic() < deadline, "the write never entered the gate"
            time.sleep(0.02)

    gate = ray.remote(num_cpus=0)(_CommitGate).remote()
    slow = write.remote(gate, str(tmp_path / "slow"), 1.5)
    until_writing(gate)
    assert _settle(gate, 60) == 0
    assert (tmp_path / "slow").read_text() == "committed"  # it landed before the failure was reported
    with pytest.raises(CommitAborted, match="stopped before this batch was written"):
        ray.get(write.remote(gate, str(tmp_path / "late"), 0.0))
    assert not (tmp_path / "late").exists() and ray.get(slow)
    ray.kill(gate)

    stuck = ray.remote(num_cpus=0)(_CommitGate).remote()  # a write that outlives the wait is reported, not hidden
    hung = write.remote(stuck, str(tmp_path / "hung"), 3.0)
    until_writing(stuck)
    assert _settle(stuck, 0.2) == 1
    ray.get(hung)
    assert ray.get(stuck.writing.remote()) == 0
    ray.kill(stuck)
