"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/finetune.py --config C --out URI``

Stage 3b: fine-tuning + evaluation as a Ray Train job (reads semantic_ids.parquet, pretrain.pt from --out).
Flags and exit codes: see ``ray_jobs/_common.py``.
"""

from _common import ALL_STAGES, guarded_main  # noqa: F401

if __name__ == "__main__":
    guarded_main(("finetune",), 'Stage 3b: fine-tuning + evaluation as a Ray Train job (reads semantic_ids.parquet, pretrain.pt from --out).')
