#!/usr/bin/env bash
# GPU check of stage 3 (#21, #22): the speed benchmark on one CUDA device with bf16 autocast, in
# well under 5 minutes. For a maintainer with a lent GPU (the `device` tool), from the repo root:
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/speed_cuda.{json,md}
# Reports fine-tuning and pretraining epoch seconds (rows/s), full-ranking ms/user and peak GPU
# memory at the paper's size and the baseline size, fp32 and bf16. Needs ../shared/datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')"
exec timeout 290 python benchmarks/speed.py --device cuda --repeats 1 --every 4 --precisions fp32,bf16 "$@"
