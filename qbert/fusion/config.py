"""Stage 1 configuration: dynamic cross-modal semantic injection (paper Sec. 3.3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qbert.config import Config

Modality = Literal["text", "image", "id"]
FEATURE_MODALITIES = ("text", "image")  # modalities that come with feature arrays; "id" is learned


class FusionConfig(Config):
    """Hyper-parameters of the fusion stage; defaults are the paper's where it gives one."""

    modalities: list[Modality] = Field(default_factory=lambda: ["text", "image", "id"])
    dim: int = Field(64, gt=0)  # shared latent width of q_i, projected features and h_i
    layers: int = Field(5, ge=1)  # maximum depth of the dynamic cross-modal transformer
    heads: int = Field(4, ge=1)
    ffn_mult: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    variant: Literal["dynamic", "fixed"] = "dynamic"  # fixed = all layers always ("traditional fusion")
    gate_hidden: int = Field(32, gt=0)
    gate_threshold: float = Field(0.5, gt=0.0, lt=1.0)  # continue past layer l iff gate > threshold
    gate_bias_init: float = 0.0  # initial continue-logit; 0 -> p(continue)=0.5 at start
    # training form of the gates: "expected_loss" = sum_l p_l * loss(h_l) (PonderNet-like, each exit
    # layer is trained to be usable on its own); "mixture" = loss(sum_l p_l h_l) (ACT-like)
    halting: Literal["expected_loss", "mixture"] = "expected_loss"
    ponder_weight: float = Field(0.01, ge=0.0)  # weight of the expected-depth cost (dynamic only)
    tau: float = Field(0.1, gt=0.0)  # Eq. (3) similarity-alignment temperature
    learnable_tau: bool = False
    contrastive_tau: float = Field(0.07, gt=0.0)  # InfoNCE temperature of Eq. (5)
    lambda_id: float = Field(0.1, ge=0.0)  # weight of ||h_i - sg(q_i)||^2 in Eq. (5)
    id_init_std: float = Field(1.0, gt=0.0)  # scale of the random q_i relative to LayerNorm outputs
    epochs: int = Field(20, ge=0)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    seed: int = 42
    device: str = "auto"
    infer_batch_size: int = Field(4096, ge=1)

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one modality of text, image, id must be enabled")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate modality in {v}")
        return v

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "FusionConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self

    @property
    def feature_modalities(self) -> list[str]:
        """Enabled modalities that need feature arrays (order: text, image)."""
        return [m for m in FEATURE_MODALITIES if m in self.modalities]

    @property
    def use_id(self) -> bool:
        return "id" in self.modalities
