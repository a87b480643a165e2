"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/fusion.py --config C --out URI``

Stage 1: dynamic cross-modal fusion as a Ray Train job.
Flags and exit codes: see ``ray_jobs/_common.py``.
"""

from _common import ALL_STAGES, guarded_main  # noqa: F401

if __name__ == "__main__":
    guarded_main(("fusion",), 'Stage 1: dynamic cross-modal fusion as a Ray Train job.')
