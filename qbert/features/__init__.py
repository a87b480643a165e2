"""Stage 0: item text and image features (transformers / open_clip encoders, no Ray here).

The Ray Data pipeline that spreads this over an actor pool is
:mod:`qbert.platform.feature_pipeline`; :func:`extract_local` runs the same code in-process.
"""

from qbert.features.config import (FeatureConfig, ImageEncoderConfig, PipelineConfig, TemplateConfig,
                                   TextEncoderConfig)
from qbert.features.extract import (FeatureError, extract_local, load_features, merge_features, merge_into)
from qbert.features.templates import assemble_texts

__all__ = ["FeatureConfig", "TextEncoderConfig", "ImageEncoderConfig", "TemplateConfig", "PipelineConfig",
           "FeatureError", "extract_local", "load_features", "merge_features", "merge_into", "assemble_texts"]
