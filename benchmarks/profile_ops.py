"""Where a step's time goes: per-op totals of one compiled train or eval step, from a JAX trace.

The step is that of `benchmarks/compare.py` (the same calibrated weights and synthetic batch:
fs=1, batch 32 by default): `--mode train` the real train step (`train_step.make_train_step`, SGD),
`--mode eval` the spike counts of `bitnet_jax.run`. It is compiled, run once, timed over
--iters runs (median), then run once more under `jax.profiler.trace`; the trace's complete
events are summed by name (XLA:CPU thunks: fusions, convolutions, custom calls) and the largest
are printed, with each custom call's target and result shape.

    python -m benchmarks.profile_ops --mode train --steps 10 --synapses sparse --remat stream
    python -m benchmarks.profile_ops --mode eval --steps 200 --synapses sparse --chunk 10

Calibrating the weights takes a few minutes on 2 cores; --weights caches them in an .npz
(written on the first run, read afterwards). Timings here are for finding what to work on;
the speed-ups the README reports come from benchmarks/compare.py.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import compare
from bitnet_jax import data, models, run_config, sharding
from bitnet_jax import train_step as train_step_lib
import bitnet_jax
from configs import default


def load_weights(path: str, fs: float, classes: int, images) -> dict:
  """compare.calibrate's weights, cached in `path` (an .npz of "layer/name" arrays)."""
  if path and os.path.exists(path):
    params = {}
    with np.load(path) as f:
      for key, value in f.items():
        layer, name = key.split("/")
        params.setdefault(layer, {})[name] = value
    return params
  params, _ = compare.calibrate(fs, classes, images, gain=2.0, steps=50)
  if path:
    np.savez(path, **{f"{layer}/{name}": np.asarray(value)
                      for layer, d in params.items() for name, value in d.items()})
  return params


def train_step(args, params, images, labels):
  """(run, state, compiled): run(state) -> the state after one real train step on the batch."""
  config = default.get_config()
  config.update(fs=args.fs, time_steps=args.steps, batch_size=len(images), engine="parallel",
                remat=args.remat, chunk=args.chunk, synapses=args.synapses, optimizer="sgd",
                learning_rate=0.01, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
                schedule="constant", warmup_epochs=0.0)
  info = data.DatasetInfo(name="synthetic", num_classes=args.classes,
                          image_shape=images.shape[1:], num_train=len(images), num_test=1,
                          mean=compare.CIFAR_MEAN, std=compare.CIFAR_STD)
  config, _ = run_config.resolve(config)  # compute_dtype, matmul_precision: this platform's auto
  module = run_config.make_module(config, info)
  tx = run_config.optimizer(config, 1, 1000)
  step = run_config.train_step(config, module, tx, info, sharding.data_mesh())
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = train_step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  compiled = step.lower(state, batch).compile()
  return (lambda s: compiled(s, batch)[0]), state, compiled


def eval_step(args, params, images):
  """(run, params, compiled): run(params) computes the batch's spike counts, returns params."""
  module = models.BITnet6(fs=args.fs, num_classes=args.classes,
                          sparse=args.synapses == "sparse")
  x = data.normalize(images, compare.CIFAR_MEAN, compare.CIFAR_STD)
  f = jax.jit(lambda p: bitnet_jax.run(module, p, x, args.steps, engine="parallel",
                                       chunk=args.chunk).out_spikes.sum(0))
  compiled = f.lower(params).compile()

  def run(p):
    jax.block_until_ready(compiled(p))
    return p
  return run, params, compiled


def op_totals(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Milliseconds and counts per event name in the trace written to `trace_dir`."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  ms, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      ms[e["name"]] += e.get("dur", 0) / 1e3
      count[e["name"]] += 1
  return ms, count


def custom_calls(compiled) -> dict:
  """Instruction name -> "target result-shape" for the custom calls of a compiled program."""
  out = {}
  for line in compiled.as_text().splitlines():
    m = re.search(r"(\S+) = (.*?) custom-call\(.*custom_call_target=\"(\w+)\"", line)
    if m:
      out[m.group(1).lstrip("%")] = f"{m.group(3)} {m.group(2)}"
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--steps", type=int, default=10, help="time steps T")
  p.add_argument("--synapses", choices=("dense", "sparse"), default="sparse")
  p.add_argument("--remat", default="stream", help="train: the parallel engine's remat")
  p.add_argument("--chunk", type=int, default=0, help="steps per chunk (eval: try 10)")
  p.add_argument("--fs", type=float, default=1.0)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--iters", type=int, default=5, help="timed runs (median)")
  p.add_argument("--top", type=int, default=25, help="ops to print")
  p.add_argument("--weights", default="", help="cache of the calibrated weights (.npz)")
  args = p.parse_args(argv)

  images, labels = compare.make_batch(args.batch, args.classes, 0)
  params = load_weights(args.weights, args.fs, args.classes, images)
  if args.mode == "train":
    run, state, compiled = train_step(args, params, images, labels)
  else:
    run, state, compiled = eval_step(args, params, images)
  state = jax.block_until_ready(run(state))  # warm-up
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    state = jax.block_until_ready(run(state))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  print(f"{args.mode}, T={args.steps}, {args.synapses} synapses"
        f"{', remat=' + args.remat if args.mode == 'train' else ''}, chunk={args.chunk}: "
        f"median {median * 1e3:.0f} ms per step ({args.batch / median:.2f} images/s) over "
        f"{[round(t * 1e3) for t in times]} ms")
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state = jax.block_until_ready(run(state))
    ms, count = op_totals(trace_dir)
  names = custom_calls(compiled)
  print(f"\n| ms (one traced step) | calls | op |\n|---:|---:|---|")
  skip = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")
  for name, total in [kv for kv in ms.most_common() if not kv[0].startswith(skip)][:args.top]:
    print(f"| {total:.1f} | {count[name]} | {name} {names.get(name, '')} |")


if __name__ == "__main__":
  main()
