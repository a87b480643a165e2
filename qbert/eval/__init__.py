"""Full-ranking evaluation shared by every model."""

from qbert.eval.metrics import METRIC_NAMES, metrics_from_ranks, target_ranks
from qbert.eval.evaluator import evaluate_ranking

__all__ = ["METRIC_NAMES", "metrics_from_ranks", "target_ranks", "evaluate_ranking"]
