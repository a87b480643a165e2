"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/pipeline.py --config C --out URI``

The whole Q-BERT4Rec pipeline (fusion -> RQ-VAE -> pretrain -> finetune -> evaluation), each stage a Ray Train job.
Flags and exit codes: see ``ray_jobs/_common.py``.
"""

from _common import ALL_STAGES, guarded_main  # noqa: F401

if __name__ == "__main__":
    guarded_main(ALL_STAGES, 'The whole Q-BERT4Rec pipeline (fusion -> RQ-VAE -> pretrain -> finetune -> evaluation), each stage a Ray Train job.')
