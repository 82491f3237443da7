#!/usr/bin/env bash
# Memory on one GPU, measured against the planner (python -m megaengine.plan), in under 8 minutes:
#  1. configs/gpt-1.3b.json at micro batch 8 (seq 2048, bf16) without recomputation, with selective and
#     with full recomputation: tokens/s, MFU and max_memory_allocated next to the planner's prediction
#     (its total less the --overhead-gib allowance, which max_memory_allocated does not see).
#  2. the largest LLaMA-style model of a descending list that trains on this GPU with ZeRO-2 + optimizer
#     offload + full recomputation: sizes the planner says do not fit the GPU, or whose offloaded optimizer
#     state and fp32 build copy do not fit the host's available memory, are skipped, not tried.
# Results (device, date, figures) go to benchmarks/results/gpu-memory-<date>.md.
#
#     bash benchmarks/gpu_memory.sh            # PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-benchmarks/results/gpu-memory-$(date +%F).md}
WORK=$(mktemp -d)
GIB=$($PY -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)")
COMMON=(--log-interval 1 --eval-iters 0 --sample-tokens 0)

# run NAME TIMEOUT FLAGS...: train, and ask the planner about the same flags
run() {
  local name=$1 limit=$2; shift 2
  $PY -m megaengine.plan "$@" --world-size 1 --gpu-memory "$GIB" --json > "$WORK/$name.plan.json"
  timeout "$limit" torchrun --standalone --nproc_per_node 1 pretrain_gpt.py "$@" "${COMMON[@]}" \
    --metrics-file "$WORK/$name.jsonl" > "$WORK/$name.log" 2>&1
  echo "$name: exit $? ($(tail -n 1 "$WORK/$name.log"))"
}

GPT13=(--config configs/gpt-1.3b.json --micro-batch-size 8 --global-batch-size 16 --train-iters 8 --bf16)
run gpt1.3b-none 150 "${GPT13[@]}"
run gpt1.3b-selective 150 "${GPT13[@]}" --recompute-activations
run gpt1.3b-full 150 "${GPT13[@]}" --recompute-granularity full --recompute-method uniform --recompute-num-layers 1

# LLaMA-style shapes, largest first: (name, layers, hidden, heads, ffn)
OFFLOAD=(--config configs/llama-7b.json --zero-config configs/zero/zero2-offload.json --micro-batch-size 1
         --global-batch-size 1 --train-iters 3 --recompute-granularity full --recompute-method uniform
         --recompute-num-layers 1 --num-query-groups 8)
for shape in "llama-34b 48 8192 64 22016" "llama-13b 40 5120 40 13824" "llama-7b 32 4096 32 11008" \
             "llama-3b 26 3200 32 8640"; do
  read -r name layers hidden heads ffn <<< "$shape"
  flags=("${OFFLOAD[@]}" --num-layers "$layers" --hidden-size "$hidden" --num-attention-heads "$heads"
         --ffn-hidden-size "$ffn")
  verdict=$($PY - "$GIB" "${flags[@]}" <<'EOF'
import json, subprocess, sys
gib, flags = float(sys.argv[1]), sys.argv[2:]
plan = json.loads(subprocess.run([sys.executable, "-m", "megaengine.plan", *flags, "--world-size", "1",
                                  "--gpu-memory", str(gib), "--json"], capture_output=True, text=True).stdout)
params = plan["param_bytes"] / 2  # bf16
available = int(next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable")).split()[1]) * 1024
host = plan["optimizer_bytes"] + 4 * params  # offloaded state + the fp32 copy the build makes
print("run" if plan["fits"] and host < 0.85 * available else
      f"skip: GPU {plan['total_bytes'] / 2**30:.0f} GiB of {gib:.0f}, host {host / 2**30:.0f} GiB of "
      f"{available / 2**30:.0f} available")
EOF
)
  echo "$name: $verdict"
  echo "$name $verdict" >> "$WORK/offload.txt"
  if [ "$verdict" = "run" ]; then
    run "offload-$name" 240 "${flags[@]}"
    grep -q '"loss"' "$WORK/offload-$name.jsonl" 2>/dev/null && break
  fi
done

$PY - "$WORK" "$OUT" <<'EOF'
import datetime, glob, json, os, subprocess, sys
import torch
work, out = sys.argv[1], sys.argv[2]
name = torch.cuda.get_device_name()
rows = ["| run | tokens/s | MFU | max_memory_allocated GiB | planner GiB (less overhead) | measured / planner |",
        "|---|---|---|---|---|---|"]
for path in sorted(glob.glob(os.path.join(work, "*.plan.json"))):
    run = os.path.basename(path)[:-len(".plan.json")]
    plan = json.load(open(path))
    predicted = (plan["total_bytes"] - plan["overhead_bytes"]) / 2**30
    metrics = os.path.join(work, run + ".jsonl")
    records = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
    records = [r for r in records if "loss" in r]
    if not records:
        rows.append(f"| {run} | failed (see log) | | | {predicted:.2f} | |")
        continue
    steady = records[len(records) // 2:]  # after warm-up
    tps = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfu = sorted(r["mfu"] or 0 for r in steady)[len(steady) // 2]
    mem = max(r["memory_gib"] for r in records)
    rows.append(f"| {run} | {tps:,.0f} | {mfu:.1%} | {mem:.2f} | {predicted:.2f} | {mem / predicted:.3f} |")
skips = open(os.path.join(work, "offload.txt")).read() if os.path.exists(os.path.join(work, "offload.txt")) else ""
text = (f"# Memory on one GPU against the planner\n\n{name}, {datetime.date.today()}, torch {torch.__version__}. "
        "`bash benchmarks/gpu_memory.sh`. Median tokens/s and MFU over the second half of the iterations; "
        "memory is torch.cuda.max_memory_allocated over the run.\n\n" + "\n".join(rows) +
        "\n\nLLaMA-style sizes tried with ZeRO-2 + optimizer offload + full recomputation (largest first):\n\n```\n"
        + skips + "```\n")
os.makedirs(os.path.dirname(out), exist_ok=True)
open(out, "w").write(text)
print(text)
EOF
echo "logs in $WORK"
