"""Stage 1: dynamic cross-modal semantic injection (paper Sec. 3.3, Eqs. 3-5)."""

from qbert.fusion.config import FusionConfig
from qbert.fusion.losses import fusion_loss, id_anchor, info_nce
from qbert.fusion.modules import (DynamicCrossModalTransformer, FusionModel, FusionOutput, halting_distribution,
                                  similarity_align)
from qbert.fusion.train import (FusionResult, fusion_embeddings_table, infer_fusion, read_fusion_embeddings,
                                train_fusion, validate_features, write_fusion_embeddings)

__all__ = [
    "DynamicCrossModalTransformer", "FusionConfig", "FusionModel", "FusionOutput", "FusionResult",
    "fusion_embeddings_table", "fusion_loss", "halting_distribution", "id_anchor", "infer_fusion", "info_nce",
    "read_fusion_embeddings", "similarity_align", "train_fusion", "validate_features", "write_fusion_embeddings",
]
