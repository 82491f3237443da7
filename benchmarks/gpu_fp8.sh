#!/usr/bin/env bash
# FP8 on one Hopper or Ada GPU (issue 16), in one run: the per-layer table (bf16 against each FP8 recipe at the
# GPT-1.3B and LLaMA-7B layer shapes), configs/gpt-1.3b.json end to end in bf16 and FP8 (tokens/s and the loss
# over 200 iterations), and the error table at 4096. Writes benchmarks/results/fp8-<device>.md and
# fp8-numerics-<device>.md. About 10 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(python -c 'import re, torch; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
python benchmarks/fp8.py --tokens 8192 "$@"
python benchmarks/fp8.py --numerics --size 4096 --out "benchmarks/results/fp8-numerics-$device.md"
