#!/usr/bin/env bash
# Everything a GPU machine should run for the kernels and training speed (issue 15), in one call, in under
# 9 minutes on one H100/H200:
#   1. the GPU tests: tests/kernels/test_gpu.py, test_select.py, test_norms.py and the attention block-shape and
#      atomic-dq tests, compiled (TRITON_INTERPRET=0)
#   2. python benchmarks/kernels.py --quick        (attention TFLOP/s, norm GB/s and per-call cost, vs torch)
#   3. python benchmarks/mfu.py --compile          (1.3B training: megaengine vs plain PyTorch, eager and compiled)
#   4. python benchmarks/fp8.py --skip-end-to-end  (FP8 against bf16 per layer at the 1.3B and 7B shapes, each
#      recipe; on Hopper/Ada only). The 200-iteration end-to-end FP8 run takes ~10 minutes on its own:
#      bash benchmarks/gpu_fp8.sh
# Each step has its own time limit (seconds; override with TESTS_S, KERNELS_S, MFU_S); a step that runs out is
# reported as such and the next one still runs. Writes benchmarks/results/gpu-<device>-<UTC date>.md with every
# step's output, and prints a short table last.
#
#   bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TESTS_S=${TESTS_S:-110}
KERNELS_S=${KERNELS_S:-190}
MFU_S=${MFU_S:-170}
FP8_S=${FP8_S:-60}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0

device=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$device" ]; then
    echo "gpu_check.sh: no CUDA device; nothing to run here (the CPU tests cover the rest)." >&2
    exit 2
fi
slug=$(echo "$device" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
stamp=$(date -u +%Y-%m-%d-%H%M)
mkdir -p benchmarks/results
report="benchmarks/results/gpu-$slug-$stamp.md"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rows=()
run_step() {  # name, limit seconds, log file, command...
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    local status="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit} s"; elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
    echo "$status"$'\t'"$took"
}

summary() {  # pick the lines that matter out of a log
    grep -E "$2" "$1" | tail -n "${3:-3}" | sed -E 's/^- //' | tr '\n' ' ' | cut -c1-400
}

echo "gpu_check: $device -> $report"
IFS=$'\t' read -r st tt < <(run_step tests "$TESTS_S" "$work/tests.log" \
    "$PY" -m pytest -q -x tests/kernels/test_gpu.py tests/kernels/test_select.py tests/kernels/test_norms.py \
    tests/kernels/test_attention.py -k "not test_matches_float64_reference or atomic")
rows+=("| GPU tests | $st | $tt | $(summary "$work/tests.log" '(passed|failed|error)' 1) |")
IFS=$'\t' read -r sk tk < <(run_step kernels "$KERNELS_S" "$work/kernels.log" \
    "$PY" benchmarks/kernels.py --quick --out "$work/kernels.md")
rows+=("| kernels.py --quick | $sk | $tk | $(summary "$work/kernels.log" '^- ' 4) |")
IFS=$'\t' read -r sm tm < <(run_step mfu "$MFU_S" "$work/mfu.log" \
    "$PY" benchmarks/mfu.py --compile --iters 8 --warmup 3 --out "$work/mfu.md")
rows+=("| mfu.py --compile | $sm | $tm | $(summary "$work/mfu.log" '(best megaengine run|plain\+compile:)' 2) |")
IFS=$'\t' read -r sf tf < <(run_step fp8 "$FP8_S" "$work/fp8.log" \
    "$PY" benchmarks/fp8.py --skip-end-to-end --out "$work/fp8.md")
rows+=("| fp8.py --skip-end-to-end | $sf | $tf | $(summary "$work/fp8.log" '(target|x bf16)' 2) |")

{
    echo "# GPU check on $device"
    echo
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). $($PY -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")' 2>&1). Produced by \`bash benchmarks/gpu_check.sh\`."
    echo
    echo "| step | status | seconds | result |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    for part in tests kernels mfu fp8; do
        echo
        echo "## $part"
        echo
        if [ -f "$work/$part.md" ]; then cat "$work/$part.md"; echo; fi
        echo '```'
        tail -n 60 "$work/$part.log"
        echo '```'
    done
} >"$report"

echo
echo "| step | status | seconds | result |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo "wrote $report"
