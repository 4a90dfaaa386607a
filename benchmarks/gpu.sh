#!/usr/bin/env bash
# Issue 16's side-by-side on one GPU, at the paper's setting: fs=4 (25.7 M parameters), 32x32x3,
# training at T=50 (ours: remat=stream, chunks of 10) and evaluation at T=200 (ours: parallel,
# chunks of 10, evaluation's default: T=10 and T=200 then compile the same chunk program, issue
# 16's item 4), batch 128 then 32. Rows, most important first (benchmarks/compare.py runs each
# in its own process):
#   1. a bf16 matmul probe (JAX, 8192^3 products): the GPU's measured rate, the "% of peak" base;
#   2. per batch (128, then 32): training, then evaluation: ours in float32 and bfloat16 (and, at
#      batch 128, the trainer's default: what `auto` resolves to on this GPU, bfloat16 synapses
#      with remat=stream, in chunks of 5 as the CIFAR configs), and the
#      release's structure (benchmarks/torch_baseline.py on cuda) in float32 (PyTorch's defaults:
#      TF32 convolutions) and bfloat16 autocast;
#   3. ours in bfloat16x3 (batch 128, then 32); 4. evaluation compiled at T=10 (compile times).
# Then one markdown table: images/s, speed-ups over the PyTorch rows, model TFLOP/s (FLOPs from
# the layer shapes: 727 GFLOP per trained image at T=50, 3x the forward, recompute not counted)
# and % of the measured matmul rate; and the issue's targets (>= 5x the release's structure,
# >= 50 % of the matmul rate in our bf16 train step) as met / not met.
#
# Duration: at most ~7.5 minutes (--budget 440 s for all children, each cut to what is left and
# to --timeout 150 s; rows left without time are listed as skipped); estimated ~7 minutes on one
# H200 from earlier runs of the JAX rows (~40 s per training row, mostly compiling). NOT yet run
# on a GPU. Each row is printed as JSON and appended to $BITNET_BENCH_JSON's .jsonl as soon as
# it is measured (default /tmp/bitnet_gpu_benchmark.jsonl), so a killed run leaves its rows.
#
#   bash benchmarks/gpu.sh                         # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --iters 5               # extra flags go to benchmarks/compare.py
#   BITNET_BENCH_SMOKE=1 bash benchmarks/gpu.sh    # any machine, tiny sizes, PyTorch on the CPU
#
# Note: our float32 rows are true float32 (matmul_precision=highest, the CPU's spikes); add
# --precision default for XLA's GPU default, TF32 convolutions as PyTorch's float32 rows, which
# is what the README's H200 table of 2026-11-28 measured. $PYTHON picks the interpreter
# (default python3, the one holding PyTorch and JAX on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_device=cuda
if [[ -n "${BITNET_BENCH_SMOKE:-}" ]]; then torch_device=cpu; fi
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
exec "${PYTHON:-python3}" -m benchmarks.compare \
  --fs 4 --batch 128,32 --train_steps 50 --eval_steps 200 --compile_steps 10 \
  --train_remat stream --train_chunk 10 --eval_engine parallel --eval_chunk 10 \
  --default_config --default_chunk 5 \
  --dtypes float32,bfloat16 --late_dtypes bfloat16x3 --synapses dense --iters 3 \
  --torch on --torch_device "$torch_device" --torch_dtypes float32,bfloat16 --torch_iters 2 \
  --matmul_size 8192 --timeout 150 --budget 440 \
  --json "${BITNET_BENCH_JSON:-/tmp/bitnet_gpu_benchmark.json}" "$@"
