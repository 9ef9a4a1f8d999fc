#!/usr/bin/env bash
# The GPU figures of docs/results.md ("Speed"), each comparison in one run on one GPU (SD 1.5-size random
# weights, bf16 training at 512 px, fp16 sampling): training at batch 16 and 32 against the diffusers-style and
# hand-tuned diffusers loops, then sampling latency (eager, fast and compiled sides, batch 1 and 8).
#   bash bench/gpu.sh                      # writes bench/results/gpu_*.json
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
python bench/train_throughput.py --preset sd15 --batch-size 16 --steps 30 --warmup 10 --out "$out/gpu_train_b16.json"
python bench/train_throughput.py --preset sd15 --batch-size 32 --steps 30 --warmup 10 \
    --sides ours,diffusers-tuned --out "$out/gpu_train_b32.json"
python bench/sample_latency.py --preset sd15 --out "$out/gpu_sample.json"
