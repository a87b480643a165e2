"""What a finished run writes besides the stages' artifacts: metrics.json, summary.json, plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from qbert.pipeline.config import PipelineConfig
from qbert.pipeline.data import PipelineData
from qbert.pipeline.stages import read_codes
from qbert.train.optim import resolve_precision
from qbert.utils.io import atomic_path, atomic_write_json
from qbert.utils.runtime import machine_info, pick_device


def write_plots(out_dir: str | Path, fusion_report: dict[str, Any], codes: np.ndarray, sizes: list[int]) -> list[str]:
    """Activated-layer histogram (paper Fig. 7) and per-level codebook usage, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = Path(out_dir) / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    written = []
    counts = fusion_report.get("activated_layer_counts")
    if counts:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(np.arange(1, len(counts) + 1), counts)
        ax.set_xlabel("activated layers")
        ax.set_ylabel("items")
        ax.set_title(f"fusion depth (median {fusion_report.get('activated_layers_median')})")
        fig.tight_layout()
        with atomic_path(pdir / "activated_layers.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(str(pdir / "activated_layers.png"))
    fig, axes = plt.subplots(1, len(sizes), figsize=(3 * len(sizes), 2.6), squeeze=False)
    for level, (ax, size) in enumerate(zip(axes[0], sizes)):
        c = np.sort(np.bincount(codes[:, level], minlength=size))[::-1]
        ax.bar(np.arange(size), c, width=1.0)
        ax.set_title(f"level {level}: {int((c > 0).sum())}/{size} used")
        ax.set_xlabel("code (by frequency)")
    axes[0][0].set_ylabel("items")
    fig.tight_layout()
    with atomic_path(pdir / "codebook_utilisation.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    written.append(str(pdir / "codebook_utilisation.png"))
    written.append(write_code_tree(pdir / "code_tree.png", codes, sizes))
    fused = Path(out_dir) / "fused_embeddings.parquet"
    if fused.is_file():
        from qbert.fusion.train import read_fusion_embeddings

        written.append(write_fused_projection(pdir / "fused_projection.png", read_fusion_embeddings(fused)[1], codes))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(path)


def write_code_tree(path: Path, codes: np.ndarray, sizes: list[int]) -> str:
    """The code tree level by level: how many items share each prefix of length 1..K (sorted,
    log scale); a full-length prefix holds exactly one item once collisions are reallocated."""
    import matplotlib.pyplot as plt

    K = codes.shape[1]
    fig, axes = plt.subplots(1, K, figsize=(3 * K, 2.6), squeeze=False)
    for level, ax in enumerate(axes[0]):
        _, counts = np.unique(codes[:, : level + 1], axis=0, return_counts=True)
        counts = np.sort(counts)[::-1]
        ax.bar(np.arange(len(counts)), counts, width=1.0)
        ax.set_yscale("log")
        ax.set_title(f"prefix length {level + 1}: {len(counts)} used", fontsize=9)
        ax.set_xlabel("prefix (by size)")
    axes[0][0].set_ylabel("items")
    fig.suptitle(f"code tree ({codes.shape[0]} items, codebooks {sizes})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def write_fused_projection(path: Path, embeddings: np.ndarray, codes: np.ndarray, shown: int = 10) -> str:
    """Fused embeddings projected on their first two principal components, coloured by the first
    code (the ``shown`` most used first codes; the rest grey): the paper's Figs. 6-7 view of
    whether the first level splits the embedding space."""
    import matplotlib.pyplot as plt

    x = embeddings - embeddings.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)  # components from <= 20k rows
    xy = x @ vt[:2].T
    first = codes[: len(xy), 0]
    top = np.argsort(-np.bincount(first))[:shown]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    rest = ~np.isin(first, top)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=2, c="lightgrey", label="other first codes")
    for code in top:
        sel = first == code
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=f"<a_{code}>")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("fused embeddings by first code", fontsize=9)
    ax.legend(fontsize=6, markerscale=3, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def write_semantic_id_preview(out_dir: str | Path) -> Path:
    """``semantic_ids.csv``: the semantic-ID table without the per-level code columns (item ID,
    semantic ID, original ID, title, domain), a form the MLflow UI previews."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = Path(out_dir)
    table = pq.read_table(out / "semantic_ids.parquet")
    table = table.select([c for c in table.column_names if not c.startswith("code_")])
    with atomic_path(out / "semantic_ids.csv") as tmp:
        pacsv.write_csv(table, str(tmp))
    return out / "semantic_ids.csv"


LEARNING_CURVE_METRICS = ("NDCG@10", "HR@10")  # valid metrics drawn beside the loss


def write_learning_curves(out_dir: str | Path, reports: dict[str, dict[str, Any]]) -> str | None:
    """``plots/learning_curves.png``: training loss per epoch of every stage that trained (and, on
    a second axis, the valid metrics of the stages that evaluate each epoch); None when no stage
    has a history (all reused from runs made before histories were recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = {name: r["history"] for name, r in reports.items()
              if isinstance(r, dict) and r.get("history") and all("loss" in h for h in r["history"])}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 2.8), squeeze=False)
    for ax, (name, hist) in zip(axes[0], curves.items()):
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        ax.plot(epochs, [h["loss"] for h in hist], color="tab:blue", label="train loss")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("train loss", color="tab:blue")
        shown = [m for m in LEARNING_CURVE_METRICS if all(m in h for h in hist)]
        if shown:
            twin = ax.twinx()
            for m, style in zip(shown, ("-", "--")):
                twin.plot(epochs, [h[m] for h in hist], style, color="tab:orange", label=f"valid {m}")
            twin.set_ylabel("valid " + " / ".join(shown), color="tab:orange")
            twin.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "plots" / "learning_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(path)




def finish_run(cfg: PipelineConfig, out: Path, data: PipelineData, reports: dict[str, Any],
               timings: dict[str, float], started: float, commit: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``metrics.json``, ``summary.json`` and plots from its stage reports; the one
    writer of both files for local and Ray runs (``extra`` adds executor fields to both)."""
    ft = reports["finetune"]
    history = ft.pop("history", [])
    metrics = {
        "model": "qbert4rec",
        "test": ft["test"],
        "valid": ft["valid"],
        "by_protocol": ft.get("by_protocol", {}),
        "stage3_item_table": bool(ft.get("item_indexed_parameters")),
        **({"cold_start": ft["cold_start"]} if "cold_start" in ft else {}),
        "best_epoch": ft["best_epoch"],
        "epochs_run": ft["epochs_run"],
        "params": ft["params"],
        "stages": reports,
        "timing": {"stage_seconds": timings, "total_seconds": time.time() - started,
                   "eval_seconds_per_user": ft["eval_seconds_per_user"],
                   "finetune_samples_per_s": ft["samples_per_second"]},
        "history": history,
        **(extra or {}),
    }
    plots: list[str] = []
    if cfg.plots:
        plots = write_plots(out, reports["fusion"], read_codes(out, data.all_items.num_items), cfg.quantize.sizes)
        curves = write_learning_curves(out, {**reports, "finetune": {**ft, "history": history}})
        plots += [curves] if curves else []
    write_semantic_id_preview(out)
    summary = {
        "git_commit": commit,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine_info(),
        "device": str(pick_device(cfg.device)),
        "precision": {s: resolve_precision(getattr(cfg, s).precision, pick_device(cfg.device))
                      for s in ("pretrain", "finetune")},  # what "auto" resolved to on this machine
        "data": {"source": cfg.data.source, "fingerprint": data.target.fingerprint(), "stats": data.target.stats(),
                 "pretrain_sources": [{"source": s, "fingerprint": d.fingerprint(), "stats": d.stats()}
                                      for s, d in zip(cfg.pretrain_sources, data.sources)]},
        "timings": {**timings, "total": time.time() - started},
        "test": metrics["test"],
        "valid": metrics["valid"],
        "plots": plots,
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "summary.json", summary)
    return metrics
