"""Stage 2 configuration: RQ-VAE semantic quantization (paper Sec. 3.4, Eqs. 6-9)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from qbert.config import Config, ConfigError

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class QuantizeConfig(Config):
    """Paper defaults: K=4 levels x 256 codes x dim 32, beta=0.25, lr 1e-3, batch 1024."""

    levels: int = Field(4, ge=1, le=len(LEVEL_LETTERS))
    codebook_size: int | list[int] = 256  # one size for every level, or one per level
    code_dim: int = Field(32, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [256, 128])  # encoder MLP widths (decoder mirrors)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(0.25, ge=0.0)  # commitment weight of Eq. (9)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(1024, ge=1)
    epochs: int = Field(100, ge=0)
    kmeans_init: bool = True
    kmeans_iters: int = Field(25, ge=1)
    kmeans_seeding: Literal["kmeans++", "random"] = "kmeans++"
    reseed_dead_codes: bool = True  # re-seed codes unused in an epoch from random residuals
    reallocate: bool = True  # Sec. 3.4 collision reallocation after training
    seed: int = 42
    device: str = "auto"
    infer_batch_size: int = Field(8192, ge=1)

    @field_validator("codebook_size")
    @classmethod
    def _positive(cls, v: int | list[int]) -> int | list[int]:
        sizes = v if isinstance(v, list) else [v]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"codebook sizes must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _sizes_match_levels(self) -> "QuantizeConfig":
        if isinstance(self.codebook_size, list) and len(self.codebook_size) != self.levels:
            raise ValueError(f"codebook_size lists {len(self.codebook_size)} sizes but levels={self.levels}")
        return self

    @property
    def sizes(self) -> list[int]:
        s = self.codebook_size
        return list(s) if isinstance(s, list) else [s] * self.levels


def check_capacity(sizes: list[int], num_items: int) -> None:
    """Unique semantic IDs need prod(codebook sizes) >= #items; fail before any training."""
    capacity = math.prod(sizes)
    if capacity < num_items:
        raise ConfigError(
            f"invalid config: codebook_size={sizes} over levels={len(sizes)} gives only {capacity} distinct "
            f"semantic IDs but there are {num_items} items; increase 'levels' or 'codebook_size'")
