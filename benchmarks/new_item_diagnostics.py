"""Where the new-target slice is lost, on VALID only: whether anything about a user says the next
item is new, and how well each scorer orders the new items among themselves.

    python benchmarks/new_item_diagnostics.py --run runs/s27-cold-arts/qbert4rec-pseudo-new \
        --backoff-neighbours 10 --backoff-peers before-repeat --out-dir benchmarks/results/neighbours_probe

``--run`` is a finished pseudo-new (cold-start) run of the paper's model. Two measurements:

- **A per-user signal of a new target.** For every valid user, ``FEATURES``: the highest content
  cosine of the last history item, and of the history's summed content, to an unseen new item and
  to an unseen trained item; the model's highest log P over trained items and the entropy of its
  P over them; the share of new items in the history; whether the last item is new; the log of
  the history's length. Each feature's AUC for "the target is new", and a logistic regression
  fitted on a seeded half of the users, scored (AUC, and the new share among the users it ranks
  highest) on the other half. An AUC near 0.5 says a rule cannot spend a known-item budget only
  where new targets are.
- **The order among new items.** For users whose target is new and not in their history, the
  target's rank among the new items they have not had, under each scorer: content cosine to the
  last history item, content cosine to the history (content kNN's score), the model's own log P,
  and the backoff rule's score (``model.new_items: backoff`` with ``--backoff-weight``, the peers
  of ``--backoff-neighbours`` and ``--backoff-peers``; the offset moves every new item alike and
  does not change this order). The level at which new items enter a top 10 is the frontier's
  business (``benchmarks/new_item_frontier.py``); this is the other half.

Nothing is trained and test is never read. Writes ``<out-dir>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbert.pipeline import PipelineConfig, load_data  # noqa: E402
from qbert.pipeline.data import target_split  # noqa: E402
from qbert.pipeline.runs import rescoring_model, run_content  # noqa: E402
from qbert.seqrec.new_items import content_knn_scorer  # noqa: E402
from qbert.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from qbert.utils.runtime import benchmark_meta, pick_device  # noqa: E402

FEATURES = ("max cos last-new", "max cos last-trained", "max cos history-new", "max cos history-trained",
            "max log P trained", "entropy over trained", "share of new in history", "last item new",
            "log history length")
SCORERS = ("cos to the last item", "cos to the history (content kNN)", "own log P", "backoff")
TOP_SHARES = (0.5, 0.1, 0.01)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0  # the mean 1-based rank of each distinct value
    ranks = mid[inverse]
    pos = label.astype(bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if not n1 or not n0:
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights (last: bias) of an L2-penalised logistic regression of ``y`` on ``x`` (L-BFGS)."""
    xt = torch.as_tensor(np.column_stack([x, np.ones(len(x))]), dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


@torch.no_grad()
def measure(model, split, batch_size: int, device) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """([users, len(FEATURES)] every valid user's features, {scorer: [new-target users] rank of the
    target among the unseen new items}) of ``model`` (its ``new_items`` settings give "backoff").
    A target is new when the protocol withheld it; the items it is ranked among are every item
    fine-tuning did not train (what the backoff rule scores as new)."""
    n = model.num_items
    trained = model.trained_items.to(device)
    withheld = torch.zeros(n, dtype=torch.bool, device=device)
    withheld[torch.as_tensor(split.withheld, dtype=torch.long, device=device)] = True
    content = model.item_content  # [N + 2, D] unit rows, 0 = padding (tokens are item + 1)
    targets = torch.as_tensor(np.asarray(split.targets("valid")), device=device)
    history = torch.as_tensor(split.history("valid", 0, 1, max_len=model.max_len - 1))
    knn = content_knn_scorer(content[1: n + 1])  # content kNN's score: cosine to the history's content
    rule = model.new_items
    feats, ranks = [], {s: [] for s in SCORERS}
    for lo in range(0, len(history), batch_size):
        h, t = history[lo: lo + batch_size].to(device), targets[lo: lo + batch_size]
        model.new_items = "own"
        own = model.score_parts(h)[0]
        backoff = model.new_item_scores(own, model.append_mask(h))  # the backoff rule on the same log P
        seen = torch.zeros(len(h), n + 1, dtype=torch.bool, device=device).scatter_(1, h, True)[:, 1:]
        cos_last = content[h[:, -1]] @ content[1: n + 1].T  # padding row is zero: an empty history scores 0
        cos_hist = knn(h)
        length = (h > 0).sum(1)
        in_hist_new = ((~trained)[(h - 1).clamp(min=0)] & (h > 0)).sum(1)
        p_trained = own.masked_fill(~trained, float("-inf"))
        prob = torch.softmax(p_trained, dim=1)
        entropy = -(prob * torch.log_softmax(p_trained, dim=1).nan_to_num(neginf=0.0)).sum(1)

        def unseen_max(cos: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
            return cos.masked_fill(seen | ~among, -2.0).max(1).values

        feats.append(torch.stack([
            unseen_max(cos_last, ~trained), unseen_max(cos_last, trained),
            unseen_max(cos_hist, ~trained), unseen_max(cos_hist, trained),
            p_trained.max(1).values, entropy, in_hist_new / length.clamp(min=1),
            ((~trained)[(h[:, -1] - 1).clamp(min=0)] & (h[:, -1] > 0)).float(), length.clamp(min=1).float().log(),
        ], 1).double().cpu())
        want = withheld[t] & ~seen.gather(1, t[:, None])[:, 0]  # a new target the user has not had
        if want.any():
            pool = seen[want] | trained[None, :]  # what a new target is not ranked against
            tw = t[want][:, None]
            for name, s in zip(SCORERS, (cos_last, cos_hist, own, backoff)):
                s = s[want]
                ranks[name].append((s.masked_fill(pool, float("-inf")) > s.gather(1, tw)).sum(1).cpu())
    model.new_items = rule
    return torch.cat(feats).numpy(), {k: torch.cat(v).numpy() if v else np.zeros(0, np.int64)
                                      for k, v in ranks.items()}


def signal(x: np.ndarray, is_new: np.ndarray, seed: int) -> dict:
    """Each feature's AUC, and a logistic regression fitted on a seeded half, scored on the other."""
    perm = np.random.default_rng(seed).permutation(len(is_new))
    fit, held = perm[: len(perm) // 2], perm[len(perm) // 2:]
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-12
    w = logistic_fit((x[fit] - mu) / sd, is_new[fit].astype(float))
    score = ((x[held] - mu) / sd) @ w[:-1] + w[-1]
    order = np.argsort(-score, kind="stable")
    top = {f"{share:g}": float(is_new[held][order[: max(1, int(round(share * len(held))))]].mean())
           for share in TOP_SHARES}
    return {"users": int(len(is_new)), "new_share": float(is_new.mean()),
            "features": {f: {"auc": auc(x[:, i], is_new), "mean_new": float(x[is_new, i].mean()),
                             "mean_known": float(x[~is_new, i].mean())} for i, f in enumerate(FEATURES)},
            "logistic": {"held_out_auc": auc(score, is_new[held]), "held_out_users": int(len(held)),
                         "held_out_new_share": float(is_new[held].mean()), "new_share_in_top": top,
                         "weights": dict(zip([*FEATURES, "bias"], w.tolist())), "seed": seed}}


def order(ranks: dict[str, np.ndarray], pool: int) -> dict:
    def stats(r: np.ndarray) -> dict:
        hit = r < 10
        return {"users": int(r.size), "median_rank": float(np.median(r)) if r.size else float("nan"),
                "top10": float(hit.mean()) if r.size else float("nan"),
                "top50": float((r < 50).mean()) if r.size else float("nan"),
                "NDCG@10": float(np.where(hit, 1 / np.log2(r + 2), 0).mean()) if r.size else float("nan")}
    return {"new_items": pool, "scorers": {k: stats(v) for k, v in ranks.items()}}


def markdown(result: dict) -> str:
    sig, ordr = result["signal"], result["order"]
    md = [f"**A per-user signal of a new target** ({sig['users']} valid users, {sig['new_share']:.3f} with a new "
          "target): each feature's AUC, mean for new / known targets.", "",
          "| feature | AUC | mean, new target | mean, known target |", "|---|---|---|---|"]
    md += [f"| {f} | {v['auc']:.3f} | {v['mean_new']:.3f} | {v['mean_known']:.3f} |"
           for f, v in sig["features"].items()]
    lg = sig["logistic"]
    md += ["", f"Logistic regression on all features, fitted on half the users (seed {lg['seed']}): held-out AUC "
           f"{lg['held_out_auc']:.3f}; new share among the held-out users it ranks highest: "
           + ", ".join(f"top {float(k):.0%} {v:.3f}" for k, v in lg["new_share_in_top"].items())
           + f" (all: {lg['held_out_new_share']:.3f}).", "",
           f"**The order among new items** ({ordr['new_items']} new items; users whose valid target is new and "
           "not in their history): the target's rank among the new items the user has not had.", "",
           "| scorer | users | median rank | in the top 10 | in the top 50 | NDCG@10 |", "|---|---|---|---|---|---|"]
    md += [f"| {k} | {v['users']} | {v['median_rank']:.0f} | {v['top10']:.3f} | {v['top50']:.3f} | "
           f"{v['NDCG@10']:.4f} |" for k, v in ordr["scorers"].items()]
    md.append(f"\nValid only. Run: {result['run']}; backoff: {result['backoff']}.")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--backoff-weight", type=float, default=0.25)
    ap.add_argument("--backoff-neighbours", type=int, default=0, help="0: the first-code cluster")
    ap.add_argument("--backoff-peers", choices=("shifted", "before-repeat"), default="shifted")
    ap.add_argument("--seed", type=int, default=0, help="the halves of the logistic regression")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="new_item_diagnostics")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = PipelineConfig.from_yaml(args.run / "config.yaml")
    except (OSError, ValueError) as e:
        print(f"error: --run {args.run}: no readable config.yaml of a finished run ({e})", file=sys.stderr)
        return 2
    if cfg.model.item_id != "none" or cfg.model.head != "catalogue" or not 0 <= args.backoff_weight <= 1 \
            or args.backoff_neighbours < 0:
        print(f"error: --run {args.run} must be a run of the paper's model (model.item_id: none, model.head: "
              "catalogue); --backoff-weight in [0, 1], --backoff-neighbours >= 0", file=sys.stderr)
        return 2
    data = load_data(cfg)
    split = target_split(cfg, data)
    if not split.withheld.size:
        print(f"error: {args.run} was not trained under the cold-start protocol (data.cold_start)", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    model = rescoring_model(args.run, cfg, split, device)
    if args.backoff_peers == "before-repeat" and model.repeat_weight is None:
        print(f"error: --backoff-peers before-repeat: {args.run} has no learned repeat shift (model.repeat_bias)",
              file=sys.stderr)
        return 2
    model.set_item_content(run_content(args.run, cfg, model.num_items, data))
    model.new_item_weight, model.new_item_neighbours = args.backoff_weight, args.backoff_neighbours
    model.new_item_peers_before_repeat, model.new_item_content = args.backoff_peers == "before-repeat", 0.0
    model.eval()
    x, ranks = measure(model, split, cfg.eval.batch_size, device)
    is_new = np.isin(split.targets("valid"), split.withheld)
    backoff = {"weight": args.backoff_weight, "neighbours": args.backoff_neighbours, "peers": args.backoff_peers}
    result = {"run": str(args.run), "split": "valid", "backoff": backoff, "signal": signal(x, is_new, args.seed),
              "order": order(ranks, int((~model.trained_items).sum())),
              **benchmark_meta("benchmarks/new_item_diagnostics.py", argv, REPO)}
    md = markdown(result)
    atomic_write_json(args.out_dir / f"{args.name}.json", result)
    atomic_write_text(args.out_dir / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
