"""Fitting the mixture rule for new items (``model.new_items: mixture``) on valid, by likelihood.

The rule (:meth:`QBert4Rec.mixture_scores`) says: the next item is new with probability pi, and a
new item j then has probability softmax_j(tau * cos(c_j, history)) among the new items the user
has not had. Both are fitted by maximising the log-likelihood of the valid targets, so nothing is
chosen by a ranking metric:

- pi: the share of valid users whose target is an untrained item (the maximum-likelihood estimate
  of a Bernoulli share, whatever tau is);
- tau: the maximiser of the mean log softmax of the valid new targets, a concave function of tau
  (log-sum-exp is convex), found by golden-section search on log tau.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MixtureFit", "fit_mixture"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixtureFit:
    share: float  # pi
    temperature: float  # tau
    users: int  # valid users
    new_targets: int  # of them, with an untrained target
    fitted_targets: int  # of those, the ones tau was fitted on (target not already in the history)
    log_likelihood: float  # mean log softmax of those targets at tau

    def overrides(self) -> dict[str, float]:
        return {"model.new_items": "mixture", "model.new_item_share": self.share,
                "model.new_item_temperature": self.temperature}


def fit_mixture(model, split, which: str = "valid", batch_size: int = 1024, bounds: tuple[float, float] = (1e-2, 1e3),
                steps: int = 60) -> MixtureFit:
    """pi and tau of the mixture rule from ``split``'s ``which`` targets (valid: never test).

    ``model`` needs its record of trained items and the items' content (``set_item_content``).
    """
    if model.num_items != split.num_items:
        raise ValueError(f"the model's catalogue has {model.num_items} items, the split {split.num_items}")
    trained = model.trained_items.cpu().numpy()
    targets = np.asarray(split.targets(which))
    is_new = ~trained[targets]
    if not is_new.any():
        raise ValueError(f"no {which} target is an untrained item: the mixture rule has nothing to fit")
    new = torch.nonzero(~model.trained_items)[:, 0]
    column = np.full(len(trained), -1)
    column[new.cpu().numpy()] = np.arange(new.numel())
    # item + 1 tokens, the last max_len - 1 items: what the model reads before its [MASK]
    history = torch.as_tensor(split.history(which, 0, 1, max_len=model.max_len - 1))[torch.as_tensor(is_new)]
    want = torch.as_tensor(column[targets[is_new]])
    cos, keep = [], []
    with torch.no_grad():
        for lo in range(0, len(history), batch_size):
            tokens = history[lo: lo + batch_size].to(model.codes.device)
            c, seen = model.new_item_cosines(tokens, new)
            t = want[lo: lo + batch_size].to(c.device)
            ok = ~seen.gather(1, t[:, None])[:, 0]  # a target already in the history is not fitted
            cos.append(c.masked_fill(seen, float("-inf"))[ok].cpu())
            keep.append(t[ok].cpu())
    cos_all, target = torch.cat(cos).double(), torch.cat(keep)
    if not len(target):
        raise ValueError(f"every new {which} target is already in its history: tau has nothing to fit")
    on_target = cos_all.gather(1, target[:, None])[:, 0]

    def loglik(log_tau: float) -> float:
        tau = math.exp(log_tau)
        return float((tau * on_target - torch.logsumexp(tau * cos_all, dim=1)).mean())

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loglik(a), loglik(b)
    for _ in range(steps):  # golden section: the log-likelihood is concave in tau, so unimodal in log tau
        if fa < fb:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loglik(b)
        else:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loglik(a)
    log_tau = (lo + hi) / 2
    if min(log_tau - math.log(bounds[0]), math.log(bounds[1]) - log_tau) < 1e-3:
        log.warning("the mixture's temperature %.4g sits at the bound of its search %s", math.exp(log_tau), bounds)
    return MixtureFit(share=float(is_new.mean()), temperature=math.exp(log_tau), users=int(len(targets)),
                      new_targets=int(is_new.sum()), fitted_targets=int(len(target)), log_likelihood=loglik(log_tau))
