"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/quantize.py --config C --out URI``

Stage 2: RQ-VAE semantic IDs as a Ray Train job (reads fused_embeddings.parquet from --out).
Flags and exit codes: see ``ray_jobs/_common.py``.
"""

from _common import ALL_STAGES, guarded_main  # noqa: F401

if __name__ == "__main__":
    guarded_main(("quantize",), 'Stage 2: RQ-VAE semantic IDs as a Ray Train job (reads fused_embeddings.parquet from --out).')
