"""Fitting the mixture rule for new items (``model.new_items: mixture``) on valid, by likelihood.

The rule (:meth:`QBert4Rec.mixture_scores`) says: the next item is new with probability pi, and a
new item j then has probability q_j = softmax_j(w . f_j) among the new items the user has not had,
where f_j are :meth:`QBert4Rec.new_item_features` (content cosine to the history, to the last item,
log cluster share). Both are fitted by maximising the log-likelihood of the valid targets, so
nothing is chosen by a ranking metric:

- pi: the share of valid users whose target is an untrained item (the maximum-likelihood estimate
  of a Bernoulli share, whatever w is);
- w: the maximiser of the mean log q of the valid new targets that are not already in their
  history, a concave function of w (a log-softmax of a linear function), found by L-BFGS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["MixtureFit", "fit_mixture", "FEATURES", "content_knn_scorer"]

log = logging.getLogger(__name__)

# what each weight multiplies (QBert4Rec.new_item_features), by its model.* setting
FEATURES = ("new_item_temperature", "new_item_recency", "new_item_cluster")


def content_knn_scorer(content: np.ndarray | torch.Tensor):
    """The content nearest-neighbour baseline (#19): a score function of [B, L] history tokens (item
    + 1, 0 = padding) -> [B, N] cosine of each item's content (``content`` [N, D], unit rows) to the
    sum of the history's content. Summed by ``embedding_bag``, without a [B, L, D] gather."""
    x = torch.as_tensor(content, dtype=torch.float32)
    padded = torch.cat([x.new_zeros(1, x.shape[1]), x])  # row 0 = padding (tokens are item + 1)

    def score(h: torch.Tensor) -> torch.Tensor:
        profile = torch.nn.functional.normalize(torch.nn.functional.embedding_bag(h, padded, mode="sum"), dim=1)
        return profile @ x.T

    return score


@dataclass(frozen=True)
class MixtureFit:
    share: float  # pi
    weights: dict[str, float] = field(default_factory=dict)  # by FEATURES name
    users: int = 0  # valid users
    new_targets: int = 0  # of them, with an untrained target
    fitted_targets: int = 0  # of those, the ones w was fitted on (target not already in the history)
    log_likelihood: float = 0.0  # mean log q of those targets at w
    uniform_log_likelihood: float = 0.0  # the same with w = 0 (every unseen new item alike)

    def overrides(self) -> dict[str, object]:
        return {"model.new_items": "mixture", "model.new_item_share": self.share,
                **{f"model.{k}": v for k, v in self.weights.items()}}

    def apply(self, model) -> None:
        """Set the fitted rule on ``model``."""
        model.new_items, model.new_item_share = "mixture", self.share
        for k, v in self.weights.items():
            setattr(model, k, v)


def fit_mixture(model, split, which: str = "valid", batch_size: int = 1024,
                features: tuple[str, ...] = FEATURES) -> MixtureFit:
    """pi and w of the mixture rule from ``split``'s ``which`` targets (valid: never test).

    ``features``: the weights fitted (of :data:`FEATURES`); the others stay 0. ``model`` needs its
    record of trained items and the items' content (``set_item_content``).
    """
    if not features or any(f not in FEATURES for f in features):
        raise ValueError(f"features must name some of {FEATURES}, got {features}")
    if model.num_items != split.num_items:
        raise ValueError(f"the model's catalogue has {model.num_items} items, the split {split.num_items}")
    trained = model.trained_items.cpu().numpy()
    targets = np.asarray(split.targets(which))
    is_new = ~trained[targets]
    if not is_new.any():
        raise ValueError(f"no {which} target is an untrained item: the mixture rule has nothing to fit")
    new, slot = model._untrained_slots()
    # item + 1 tokens, the last max_len - 1 items: what the model reads before its [MASK]
    history = torch.as_tensor(split.history(which, 0, 1, max_len=model.max_len - 1))[torch.as_tensor(is_new)]
    want = slot[torch.as_tensor(targets[is_new]) + 1].cpu()
    feats, seens, keep = [], [], []
    rule = model.new_items
    model.new_items = "own"  # the catalogue's log-softmax, which the features read
    try:
        with torch.no_grad():
            for lo in range(0, len(history), batch_size):
                h = history[lo: lo + batch_size].to(model.codes.device)
                log_p, _ = model.score_parts(h)
                f, seen = model.new_item_features(log_p, model.append_mask(h), new)
                t = want[lo: lo + batch_size]
                ok = ~seen.cpu().gather(1, t[:, None])[:, 0]  # a target already in the history is not fitted
                feats.append(f.cpu()[:, ok].double())
                seens.append(seen.cpu()[ok])
                keep.append(t[ok])
    finally:
        model.new_items = rule
    use = [FEATURES.index(f) for f in FEATURES if f in features]
    x, seen, target = torch.cat(feats, 1)[use], torch.cat(seens), torch.cat(keep)
    if not len(target):
        raise ValueError(f"every new {which} target is already in its history: the weights have nothing to fit")

    def mean_log_q(w: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("k,kbu->bu", w, x).masked_fill(seen, float("-inf"))
        return (z.gather(1, target[:, None])[:, 0] - torch.logsumexp(z, 1)).mean()

    w = torch.zeros(len(use), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -mean_log_q(w)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ll, uniform = float(mean_log_q(w)), float(mean_log_q(torch.zeros_like(w)))
    fitted = dict(zip([FEATURES[i] for i in use], w.detach().tolist()))
    return MixtureFit(share=float(is_new.mean()), weights={k: float(fitted.get(k, 0.0)) for k in FEATURES},
                      users=int(len(targets)), new_targets=int(is_new.sum()), fitted_targets=int(len(target)),
                      log_likelihood=ll, uniform_log_likelihood=uniform)
