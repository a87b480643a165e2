"""Stage 2: semantic quantization with an RQ-VAE and collision reallocation (paper Sec. 3.4)."""

from qbert.quantize.config import QuantizeConfig, check_capacity
from qbert.quantize.kmeans import kmeans
from qbert.quantize.reallocate import ReallocationInfo, collision_rate, reallocate_collisions
from qbert.quantize.rqvae import RQVAE, ResidualQuantizer, VectorQuantizer
from qbert.quantize.semantic_ids import (parse_sid, read_semantic_ids, semantic_id_table, sid_strings,
                                         write_semantic_ids)
from qbert.quantize.train import QuantizeResult, perplexity, train_rqvae, utilisation, validate_embeddings

__all__ = [
    "QuantizeConfig", "QuantizeResult", "RQVAE", "ReallocationInfo", "ResidualQuantizer", "VectorQuantizer",
    "check_capacity", "collision_rate", "kmeans", "parse_sid", "perplexity", "read_semantic_ids",
    "reallocate_collisions", "semantic_id_table", "sid_strings", "train_rqvae", "utilisation",
    "validate_embeddings", "write_semantic_ids",
]
