"""The new-versus-known trade of the ranking rules for new items, read from valid probes.

    python benchmarks/new_item_frontier.py benchmarks/results/neighbours_probe/arts0_both_protocols.json \
        --reference-known 0.1159 --budget 0.03 --name arts0_frontier \
        --plot docs/figures/arts0_new_item_frontier.png

Each row of a probe (``benchmarks/new_item_offset.py``, run with ``--content-knn``) is one point:
the known-target valid NDCG@10 (history kept) against the new-target valid NDCG@10 and item-macro
NDCG@10 under each protocol (history kept and excluded). The content nearest-neighbour row is
the bar (#19: the semantic-ID model beats it on new items). ``--reference-known`` (e.g. the
hybrid's known valid NDCG@10) and ``--budget`` (#19: at most 3% below it) mark the rows whose
known score stays within the budget; among those, the row with the largest min ratio to content
kNN (over both measures and protocols) is ``best``, and ``beats_knn`` says whether its every ratio
is above 1. Valid only: nothing is trained or scored. Writes ``benchmarks/results/<name>.{json,md}``
and, with ``--plot``, the picture (one panel per measure and protocol, one line per rule over its
offsets, content kNN as a dashed bar, the budget as a dotted line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.utils.io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta  # noqa: E402

PROTOCOLS = ("kept", "excluded")
MEASURES = (("new", "NDCG@10"), ("item_macro", "item_macro_NDCG@10"))


def rule_label(row: dict) -> str:
    """The rule of a probe row without its offset: the line the row's point belongs to."""
    if row["rule"] != "backoff":
        return row["rule"] + (" (fitted)" if row["rule"] == "mixture" else "")
    peers = f"k {row['neighbours']}" if row["neighbours"] else "first code"
    repeat = ", before repeat" if row.get("peers_before_repeat") else ""
    content = f", content {row['content']:g}" if row["content"] else ""
    return f"backoff w {row['weight']:g}, {peers}{repeat}{content}"


def point(row: dict, where: str) -> dict:
    """Known NDCG@10 (history kept) and the new slice's two measures under both protocols."""
    try:
        out = {"label": rule_label(row), "offset": row["delta"] if isinstance(row["delta"], (int, float)) else None,
               "known": row["known"]["NDCG@10"]}
        for protocol in PROTOCOLS:
            new = row["new"] if protocol == "kept" else row["excluded"]["new"]
            out[protocol] = {name: new[key] for name, key in MEASURES}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a probe row with both protocols (missing {e}); rerun "
                         "benchmarks/new_item_offset.py, which reports history kept and excluded") from None
    return out


def read_probes(paths: list[Path]) -> tuple[list[dict], dict, list[dict]]:
    """(rule points, the content kNN point, each probe's run and command) from probe JSON files."""
    points, knn, sources = [], None, []
    for path in paths:
        try:
            probe = json.loads(path.read_text())
            rows = probe["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a probe result of benchmarks/new_item_offset.py ({e})") from None
        if probe.get("split") != "valid":
            raise ValueError(f"{path}: split is {probe.get('split')!r}: the frontier reads valid probes only")
        sources.append({"file": str(path), "run": probe.get("run"), "command": probe.get("command"),
                        "git_commit": probe.get("git_commit")})
        for i, row in enumerate(rows):
            p = point(row, f"{path} row {i}")
            if row.get("rule") == "content_knn":
                if knn is not None and knn["run"] != probe.get("run"):
                    raise ValueError(f"{path}: a content kNN row of another run ({probe.get('run')} vs {knn['run']})")
                knn = {**p, "run": probe.get("run")}
            else:
                points.append({**p, "run": probe.get("run")})
    if knn is None:
        raise ValueError("no content_knn row in " + ", ".join(map(str, paths))
                         + ": run benchmarks/new_item_offset.py with --content-knn")
    if len({p["run"] for p in points} | {knn["run"]}) > 1:
        raise ValueError("the probes are of different runs: a frontier compares rules on one run's valid")
    return points, knn, sources


def min_ratio(p: dict, knn: dict) -> float:
    """The smallest ratio to content kNN over both measures and protocols (> 1: ahead on all four)."""
    return min(p[protocol][m] / knn[protocol][m] if knn[protocol][m] > 0 else float("inf")
               for protocol in PROTOCOLS for m, _ in MEASURES)


def frontier(points: list[dict], knn: dict, reference: float | None, budget: float) -> dict:
    """Each point with its min ratio and whether its known score is within ``budget`` of ``reference``."""
    bound = None if reference is None else reference * (1.0 - budget)
    rows = [{**p, "min_ratio": min_ratio(p, knn), "within_budget": bound is None or p["known"] >= bound}
            for p in points]
    inside = [r for r in rows if r["within_budget"]]
    best = max(inside, key=lambda r: r["min_ratio"], default=None)
    return {"rows": rows, "content_knn": knn, "reference_known": reference, "budget": budget, "known_bound": bound,
            "best": best, "beats_knn": best is not None and best["min_ratio"] > 1.0}


def markdown(result: dict) -> str:
    knn = result["content_knn"]
    md = ["| rule | offset | known NDCG@10 | new NDCG@10 | new item-macro NDCG@10 | new NDCG@10, history excl. | "
          "new item-macro NDCG@10, history excl. | min ratio to content kNN | within budget |",
          "|---|---|---|---|---|---|---|---|---|",
          f"| content kNN | | {knn['known']:.4f} | {knn['kept']['new']:.4f} | {knn['kept']['item_macro']:.4f} | "
          f"{knn['excluded']['new']:.4f} | {knn['excluded']['item_macro']:.4f} | 1 | |"]
    for r in sorted(result["rows"], key=lambda r: (r["label"], r["offset"] is None, r["offset"] or 0)):
        mark = "**best**" if r is result["best"] else ("yes" if r["within_budget"] else "no")
        md.append(f"| {r['label']} | {'' if r['offset'] is None else format(r['offset'], 'g')} | {r['known']:.4f} | "
                  f"{r['kept']['new']:.4f} | {r['kept']['item_macro']:.4f} | {r['excluded']['new']:.4f} | "
                  f"{r['excluded']['item_macro']:.4f} | {r['min_ratio']:.3f} | {mark} |")
    if result["known_bound"] is not None:
        md.append(f"\nBudget: known NDCG@10 >= {result['known_bound']:.4f} ({result['budget']:.1%} below "
                  f"{result['reference_known']:.4f}). Best within it "
                  + ("beats content kNN on all four." if result["beats_knn"] else "does not beat content kNN on all four."))
    md.append("\nValid only. Probes: " + ", ".join(s["file"] for s in result["probes"]))
    return "\n".join(md) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    knn = result["content_knn"]
    lines: dict[str, list[dict]] = {}
    for r in result["rows"]:
        lines.setdefault(r["label"], []).append(r)
    for i, protocol in enumerate(PROTOCOLS):
        for j, (measure, _) in enumerate(MEASURES):
            ax = axes[i][j]
            for label, rows in sorted(lines.items()):
                rows = sorted(rows, key=lambda r: r["known"])
                ax.plot([r["known"] for r in rows], [r[protocol][measure] for r in rows], marker="o", ms=3,
                        label=label)
            ax.axhline(knn[protocol][measure], color="black", ls="--", lw=1, label="content kNN")
            if result["known_bound"] is not None:
                ax.axvline(result["known_bound"], color="grey", ls=":", lw=1,
                           label=f"known budget ({result['budget']:.0%} below {result['reference_known']:.4f})")
            name = "new NDCG@10" if measure == "new" else "new item-macro NDCG@10"
            ax.set_title(f"{name}, history {protocol}", fontsize=10)
            ax.set_ylabel(name, fontsize=9)
            if i == 1:
                ax.set_xlabel("known-target NDCG@10 (valid, history kept)", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("New versus known targets on valid: ranking rules for new items, over their offsets", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probes", type=Path, nargs="+", help="new_item_offset.json files of one run (valid)")
    ap.add_argument("--reference-known", type=float, default=None,
                    help="known-target valid NDCG@10 the budget is read against (e.g. the hybrid's)")
    ap.add_argument("--budget", type=float, default=0.03, help="allowed relative loss on known targets (#19: 3%%)")
    ap.add_argument("--name", default="new_item_frontier")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--plot", type=Path, default=None, help="write the picture here (PNG)")
    args = ap.parse_args(argv)
    if not 0 <= args.budget < 1 or (args.reference_known is not None and not args.reference_known > 0):
        print(f"error: --budget must be in [0, 1) and --reference-known > 0, got {args.budget}, "
              f"{args.reference_known}", file=sys.stderr)
        return 2
    try:
        points, knn, sources = read_probes(args.probes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = frontier(points, knn, args.reference_known, args.budget)
    result["probes"] = sources
    md = markdown(result)
    atomic_write_json(args.out_dir / f"{args.name}.json",
                      {**result, **benchmark_meta("benchmarks/new_item_frontier.py", argv, REPO)})
    atomic_write_text(args.out_dir / f"{args.name}.md", md)
    if args.plot:
        plot(result, args.plot)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
