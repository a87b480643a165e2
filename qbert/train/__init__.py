"""The one training loop every stage uses (fusion, RQ-VAE, pretraining, fine-tuning, baselines)."""

from qbert.train.loop import Batches, Callback, FitResult, LoopConfig, fit, unwrap

__all__ = ["Batches", "Callback", "FitResult", "LoopConfig", "fit", "unwrap"]
