"""End to end: stage 1 (fusion) -> stage 2 (RQ-VAE semantic IDs) -> stage 3 (pretrain, finetune)
-> full-ranking evaluation, every artifact under one run directory.

Each stage is a function of ``(cfg, data, out_dir, callbacks)`` that reads its inputs from and
writes its outputs to ``out_dir``, so a platform adapter (Ray Train worker, Tune trial) can run
one stage alone. ``run_pipeline`` (the one driver) runs them through an executor -- in this process
(:class:`LocalExecutor`) or on Ray Train workers (:class:`qbert.platform.ray_train.RayExecutor`) --
and adds the run summary and plots. The stages themselves are listed once, in :data:`REGISTRY`.

Run directory::

    config.yaml               the exact PipelineConfig
    fused_embeddings.parquet  item_id, embedding (stage 1; over every domain's items)
    fusion_report.json        activated-layer distribution, modality-vs-fused MSE
    rqvae.pt                  RQ-VAE weights and codebooks (stage 2)
    semantic_ids.parquet      item_id, code_0..code_{K-1}, sid[, domain]
    quantize_report.json      collisions before/after reallocation, utilisation, perplexity
    pretrain.pt               encoder after pretraining (absent for strategy "none")
    model.pt                  fine-tuned model (best valid epoch)
    checkpoints/<stage>/      last.pt of each stage (resume)
    metrics.json              test/valid HR@1/5/10, NDCG@5/10 (both ranking protocols) + per-stage reports
    test_ranks.parquet        user, target, 0-based test rank with history kept / excluded
    summary.json              git commit, data fingerprints, machine, timings, config
    plots/*.png               activated layers, codebook utilisation

Multi-domain: with ``pretrain_sources`` the target and the sources are assembled into one
item space (target first, so its item ids are unchanged); fusion and the RQ-VAE run over all
items, so every domain's semantic IDs come from one shared code vocabulary. Pretraining then
uses the sources' whole sequences plus (``pretrain.include_target``) the target's training
part; fine-tuning and evaluation use the target alone with its own rows of the table.
"""

from qbert.pipeline.config import (HYBRID_OVERRIDES, METRIC_KEYS, DataSection, EvalSection, Modality, PipelineConfig,
                                   ReuseSection, quickstart_config)
from qbert.pipeline.data import PipelineData, check_inputs, load_data, load_source, pretraining_rows, stage_features
from qbert.pipeline.reports import finish_run, write_plots
from qbert.pipeline.runs import (LocalExecutor, check_reuse, config_differences, evaluate_run, load_run_model,
                                 reuse_stage, run_pipeline)
from qbert.pipeline.stages import (MODEL_STAGE, PROTOCOL_KEYS, REGISTRY, STAGES, Stage, read_codes, run_finetune_stage,
                                   run_fusion_stage, run_pretrain_stage, run_quantize_stage, write_ranks)

__all__ = ["DataSection", "EvalSection", "HYBRID_OVERRIDES", "LocalExecutor", "METRIC_KEYS", "MODEL_STAGE", "Modality", "PROTOCOL_KEYS",
           "PipelineConfig", "PipelineData", "REGISTRY", "ReuseSection", "STAGES", "Stage", "check_inputs",
           "check_reuse", "config_differences", "evaluate_run", "finish_run", "load_data", "load_run_model",
           "load_source", "pretraining_rows", "quickstart_config", "read_codes", "reuse_stage",
           "run_finetune_stage", "run_fusion_stage", "run_pipeline", "run_pretrain_stage", "run_quantize_stage",
           "stage_features", "write_plots", "write_ranks"]
