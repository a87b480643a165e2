"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/pretrain.py --config C --out URI``

Stage 3a: multi-mask pretraining as a Ray Train job (reads semantic_ids.parquet from --out).
Flags and exit codes: see ``ray_jobs/_common.py``.
"""

from _common import ALL_STAGES, guarded_main  # noqa: F401

if __name__ == "__main__":
    guarded_main(("pretrain",), 'Stage 3a: multi-mask pretraining as a Ray Train job (reads semantic_ids.parquet from --out).')
