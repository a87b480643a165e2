"""The pipeline's typed configuration: one section per stage, loadable from YAML, paper defaults."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

from pydantic import Field, field_validator, model_validator

from qbert.config import Config
from qbert.data.split import ColdStartConfig
from qbert.data.synthetic import SyntheticConfig
from qbert.fusion.config import FusionConfig
from qbert.quantize.config import QuantizeConfig
from qbert.seqrec.stage import FinetuneConfig, PretrainConfig, SeqRecConfig
from qbert.train.loop import Callback

Modality = Literal["text", "image", "id"]
METRIC_KEYS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
CallbacksFactory = Callable[[str], Iterable[Callback]]




class DataSection(Config):
    """Where the target dataset comes from and which modality inputs feed stage 1."""

    source: str = "synthetic"  # "synthetic", "synthetic:k=v,...", or a path read_source understands
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)  # used when source == "synthetic"
    options: dict[str, Any] = Field(default_factory=dict)  # reader options (e.g. with_codes: true)
    max_len: int = Field(50, ge=2)  # history length (the [MASK] takes one slot at inference)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)  # withhold "new" items from training
    modalities: list[Modality] | None = None  # None: fusion.modalities; else it overrides fusion.modalities
    features: dict[str, str | list[str]] = Field(default_factory=lambda: {"text": "text", "image": "image"})
    # modality -> feature column name without "feat_" (e.g. {"text": "lemb_codes"} on Instruments),
    # or a list of columns: each is L2-normalised, then they are concatenated into one vector, so
    # two views of one modality (real title embeddings and the LLaMA code file) weigh equally

    def columns(self, modality: str) -> list[str]:
        col = self.features[modality]
        return [col] if isinstance(col, str) else list(col)

    @field_validator("features")
    @classmethod
    def _columns(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for m, col in v.items():
            if not isinstance(col, str) and (not col or len(set(col)) != len(col)):
                raise ValueError(f"data.features.{m} must be a column name or a non-empty list of distinct "
                                 f"column names, got {col!r}")
        return v


class EvalSection(Config):
    exclude_history: bool = False  # the protocol that selects on valid; RecBole's full sort keeps history items
    batch_size: int = Field(1024, ge=1)
    test: bool = True  # False: never score test (search runs choose on valid and keep it off)


class StageResources(Config):
    """What one stage asks of a Ray cluster: Ray Train workers and each worker's GPUs and CPUs."""

    workers: int = Field(1, ge=1)
    # > 0: CUDA and nccl; 0: CPU and gloo; "auto": one GPU per worker when the cluster has GPUs, else CPU
    gpus_per_worker: float | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v < 0:
            raise ValueError(f"gpus_per_worker must be >= 0 or 'auto', got {v}")
        return v

    @property
    def use_gpu(self) -> bool | str:
        """``ScalingConfig.use_gpu`` (``"auto"`` is resolved against the cluster when the stage starts)."""
        return "auto" if self.gpus_per_worker == "auto" else self.gpus_per_worker > 0

    def ray_resources(self) -> dict[str, float]:
        """``ScalingConfig.resources_per_worker`` (with ``"auto"``, Ray adds one GPU when it uses GPUs)."""
        gpus = self.gpus_per_worker
        return {"CPU": self.cpus_per_worker, **({"GPU": float(gpus)} if gpus != "auto" and gpus > 0 else {})}


class ResourcesSection(Config):
    """Per-stage resources on Ray (``qbert pipeline --ray``, ``ray_jobs/*``, the chart's RayJobs).
    They never change results (N workers compute what one does), so a run resumes or is reused
    under other resources. Feature extraction (stage 0) has its own config: its ``pipeline``
    section sets Ray Data actors and GPUs per actor."""

    fusion: StageResources = Field(default_factory=StageResources)
    quantize: StageResources = Field(default_factory=StageResources)
    pretrain: StageResources = Field(default_factory=StageResources)
    finetune: StageResources = Field(default_factory=StageResources)


class ReuseSection(Config):
    """Take the first stages' outputs from a finished run instead of training them again.

    For sweeps over later-stage settings (Fig. 5's fine-tuning mask probability needs neither a
    new fusion, nor new semantic IDs, nor a new pretraining): the run copies those stages'
    artifacts from ``from_run`` after checking that every setting they depend on is the same.
    """

    from_run: str | None = None  # a run directory of an earlier `qbert pipeline`
    stages: list[Literal["fusion", "quantize", "pretrain"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _prefix(self) -> "ReuseSection":
        from qbert.pipeline.stages import STAGES

        if self.stages and self.stages != list(STAGES[: len(self.stages)]):
            raise ValueError(f"reuse.stages must be the first stages in order {list(STAGES[:3])}, got {self.stages}")
        if self.stages and not self.from_run:
            raise ValueError("reuse.stages is set but reuse.from_run names no run directory")
        return self


class PipelineConfig(Config):
    """Everything one Q-BERT4Rec run needs. The top-level ``seed``/``device`` apply to every stage."""

    data: DataSection = Field(default_factory=DataSection)
    pretrain_sources: list[str] = Field(default_factory=list)  # extra domains; empty = target's training part
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    model: SeqRecConfig = Field(default_factory=SeqRecConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalSection = Field(default_factory=EvalSection)
    reuse: ReuseSection = Field(default_factory=ReuseSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    seed: int = 42
    device: str = "auto"
    progress: bool = False
    plots: bool = True

    @model_validator(mode="after")
    def _sync(self) -> "PipelineConfig":
        # data.modalities (when set) is the one switch: stage 1 and stage 3 both follow it
        if self.data.modalities is not None and self.fusion.modalities != self.data.modalities:
            fusion = FusionConfig.from_dict({**self.fusion.to_dict(), "modalities": list(self.data.modalities)})
            object.__setattr__(self, "fusion", fusion)
        for m in self.fusion.feature_modalities:
            if m not in self.data.features:
                raise ValueError(f"modality '{m}' is enabled but data.features names no column for it")
        if self.finetune.label_smoothing and self.model.head == "levels" and self.model.item_id != "input_and_head":
            raise ValueError(f"finetune.label_smoothing ({self.finetune.label_smoothing}) smooths an item softmax: "
                             "it needs model.head 'catalogue' or model.item_id 'input_and_head'")
        if self.finetune.pseudo_new and (self.model.head != "catalogue" or self.model.item_id == "input_and_head"
                                         or self.model.prefix_lengths == []
                                         or self.quantize.levels < 3 and self.model.prefix_lengths is None):
            raise ValueError(f"finetune.pseudo_new ({self.finetune.pseudo_new}) drops items' own prefix rows from "
                             "the catalogue head: it needs model.head 'catalogue' trained as the item softmax "
                             "(model.item_id not 'input_and_head') and prefix tables (model.prefix_lengths not [], "
                             "quantize.levels >= 3 when unset)")
        softmax = self.model.head == "catalogue" or self.model.item_id == "input_and_head"
        for name, stage in (("pretrain", self.pretrain), ("finetune", self.finetune)):
            if stage.negatives == "sampled" and not softmax:
                raise ValueError(f"{name}.negatives 'sampled' samples an item softmax: it needs model.head "
                                 "'catalogue' or model.item_id 'input_and_head'")
        reads_content = (self.model.content_dim or self.model.new_item_content or self.model.new_item_neighbours
                         or self.model.new_items == "mixture")
        if reads_content and not self.fusion.feature_modalities:
            raise ValueError("model.content_dim, model.new_item_content, model.new_item_neighbours and model.new_items "
                             "'mixture' read the items' content: enable a text or image modality (data.modalities)")
        if self.finetune.select_code_weight and self.model.item_id != "input_and_head":
            raise ValueError("finetune.select_code_weight chooses the hybrid's ranking weight: it needs "
                             f"model.item_id 'input_and_head' (got {self.model.item_id!r})")
        object.__setattr__(self, "fusion", self.fusion.model_copy(update={"seed": self.seed, "device": self.device}))
        object.__setattr__(self, "quantize", self.quantize.model_copy(update={"seed": self.seed, "device": self.device}))
        return self


# The hybrid baseline (docs/method.md): item-ID embedding and softmax next to the semantic IDs,
# ranked with the per-level semantic-ID term; what a benchmark adds to a config of the paper's model.
HYBRID_OVERRIDES = {"model.item_id": "input_and_head", "model.head": "levels"}


def quickstart_config() -> PipelineConfig:
    """The embedded default of ``qbert pipeline`` (= ``configs/synthetic.yaml``; a test keeps them
    equal): synthetic data, sized for a few minutes on 2 CPU cores. Built in, so an installed
    package without the repository's ``configs/`` still runs the quick start."""
    return PipelineConfig.from_dict({
        "data": {"source": "synthetic", "max_len": 20, "modalities": ["text", "image", "id"],
                 "synthetic": {"seed": 0, "num_users": 1000, "num_items": 400, "num_clusters": 20}},
        "fusion": {"dim": 64, "epochs": 20, "batch_size": 256},
        "quantize": {"levels": 3, "codebook_size": 32, "hidden": [128, 64], "code_dim": 16, "epochs": 60,
                     "batch_size": 256},
        "model": {"hidden": 64, "layers": 2, "heads": 2, "dropout": 0.1, "prefix_buckets": 1024},
        "pretrain": {"strategy": "multi", "epochs": 10, "batch_size": 128, "lr": 1e-3},
        "finetune": {"epochs": 40, "batch_size": 64, "lr": 1e-3, "patience": 5},
        "eval": {"exclude_history": False},
        "seed": 42, "device": "auto",
    }, source="quickstart_config")


