#!/usr/bin/env bash
# GPU check (#21, #22), in under 5 minutes on one CUDA device. For a maintainer with a lent GPU
# (the `device` tool), from the repo root:
#   bash benchmarks/gpu_check.sh
# 1. benchmarks/gpu_check.py: every stage (fusion, quantize, pretrain, finetune) briefly on the GPU
#    in fp32 and with stage 3 in bf16 autocast, against the same runs on the CPU: samples/s, peak
#    GPU memory, first-epoch loss agreement, semantic-ID agreement, valid NDCG@10
#    -> benchmarks/results/gpu_check_cuda.{json,md}
# 2. benchmarks/speed.py: stage 3 at the paper's size on Instruments, fp32 and bf16 (epoch seconds,
#    rows/s, full-ranking ms/user, peak memory) -> benchmarks/results/speed_cuda.{json,md}
#    (needs ../shared/datasets; skipped without it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')"
timeout 170 python benchmarks/gpu_check.py --device cuda || echo "gpu_check.py failed or ran over 170 s (exit $?)"
if [ -d ../shared/datasets/amazon-instruments ]; then
  timeout 120 python benchmarks/speed.py --device cuda --repeats 1 --every 4 --precisions fp32,bf16 "$@" \
    || echo "speed.py failed or ran over 120 s (exit $?)"
else
  echo "skipped benchmarks/speed.py: ../shared/datasets/amazon-instruments is absent"
fi
