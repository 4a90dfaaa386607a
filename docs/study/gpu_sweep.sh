#!/usr/bin/env bash
# Scouting runs for configs/fashion_mnist.py, on one GPU (all runs at once, one process each).
# The GPU only ranks candidates quickly; the config's accuracy and time are then measured in
# one full run on the 2-core CPU (README). float32 convolutions at full precision
# (no TF32) so the dynamics match the CPU's.
#
#   FMNIST_DIR=/usr/share/datasets/fashion-mnist WALL=220 SWEEP=1 bash docs/study/gpu_sweep.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/tmp/gpu_sweep}; mkdir -p "$out"
data=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
export JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
# Round 1 (base_T8_e6 ... T8_e6_lr5e-3), then round 2 (the clip leak): SWEEP=2.
if [[ "${SWEEP:-2}" == 1 ]]; then
declare -A RUNS=(
  [base_T8_e6]="--config.num_epochs=6"
  [T8_e6_aug]="--config.num_epochs=6 --config.augment=crop_flip"
  [T8_e10]="--config.num_epochs=10"
  [T4_e12]="--config.time_steps=4 --config.eval_time_steps=4 --config.num_epochs=12"
  [T8_B64_lr3e-3_e8]="--config.batch_size=64 --config.learning_rate=3e-3 --config.num_epochs=8"
  [fs.5_T4_B64_e5]="--config.fs=0.5 --config.time_steps=4 --config.eval_time_steps=4 --config.batch_size=64 --config.num_epochs=5"
  [fs.5_T8_e4]="--config.fs=0.5 --config.num_epochs=4"
  [T8_e6_lr5e-3]="--config.num_epochs=6 --config.learning_rate=5e-3"
)
else
declare -A RUNS=(
  [leak0.1]="--config.num_epochs=6 --config.surrogate=ste+leak:0.1"
  [leak0.3]="--config.num_epochs=6 --config.surrogate=ste+leak:0.3"
  [leak1]="--config.num_epochs=6 --config.surrogate=ste+leak:1"
  [leak0.3_lr1e-3]="--config.num_epochs=6 --config.surrogate=ste+leak:0.3 --config.learning_rate=1e-3"
  [leak1_lr1e-3]="--config.num_epochs=6 --config.surrogate=ste+leak:1 --config.learning_rate=1e-3"
  [leak0.3_xent]="--config.num_epochs=6 --config.surrogate=ste+leak:0.3 --config.loss=xent_rate"
  [leak0.3_wd0]="--config.num_epochs=6 --config.surrogate=ste+leak:0.3 --config.weight_decay=0"
  [leak0.3_e4]="--config.num_epochs=4 --config.surrogate=ste+leak:0.3"
)
fi
for name in "${!RUNS[@]}"; do
  timeout "${WALL:-220}" python train.py --config configs/fashion_mnist.py --workdir "$out/$name" \
    --config.data_dir="$data" --config.eval_every_epochs=1 ${RUNS[$name]} \
    > "$out/$name.log" 2>&1 &
done
wait
for name in "${!RUNS[@]}"; do
  echo "== $name: ${RUNS[$name]}"
  grep '"eval"' "$out/$name/metrics.jsonl" 2>/dev/null | python -c "
import json,sys
for l in sys.stdin:
  r=json.loads(l); print(' step', r['step'], {k: (round(v,4) if isinstance(v,float) else v) for k,v in r.items() if k not in ('step','kind')})"
  tail -n 2 "$out/$name.log"
done
