#!/usr/bin/env bash
# The paper's setting on one GPU, in well under 5 minutes: fs=4 (25.7 M parameters), CIFAR-sized
# batches of 128; training at T=50 (remat=stream, chunks of 10 steps) and evaluation at T=200
# (chunks of 25 steps), float32, bfloat16 and bfloat16x3 compute; plus evaluation compiled at
# T=10 to compare compile times. Prints the same markdown table as benchmarks/compare.py (JAX rows only: the
# PyTorch baseline runs on CPU, add --torch on to include it anyway).
#
#   bash benchmarks/gpu.sh                         # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --iters 5               # extra flags go to benchmarks/compare.py
#   BITNET_BENCH_SMOKE=1 bash benchmarks/gpu.sh    # any machine, tiny sizes: checks that it runs
#
# Note: float32 rows are true float32 (matmul_precision=highest, the default: the CPU's spikes);
# add --precision default for XLA's GPU default, TF32 convolutions (10-bit mantissa inputs),
# which is what the README's H200 table of 2026-11-28 measured.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print('devices:', jax.devices())"
exec python -m benchmarks.compare \
  --fs 4 --batch 128 --train_steps 50 --eval_steps 200 --compile_steps 10 \
  --train_remat stream --train_chunk 10 --eval_engine parallel --eval_chunk 25 \
  --dtypes float32,bfloat16,bfloat16x3 --synapses dense --iters 3 --torch off --timeout 280 \
  --json "${BITNET_BENCH_JSON:-/tmp/bitnet_gpu_benchmark.json}" "$@"
