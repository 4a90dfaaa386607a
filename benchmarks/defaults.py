"""The trainer's defaults (`auto`) against the same config with `--config.synapses=dense`: images
per second of the real train step, per config, in alternating rounds.

  python -m benchmarks.defaults                                   # quickstart and fashion_mnist
  python -m benchmarks.defaults --configs configs/quickstart.py --rounds 3 --steps 40
  python -m benchmarks.defaults --smoke                           # tiny: checks that it runs

For each config, both steps are built exactly as `train.py` builds them (`run_config.resolve`,
so `auto` resolves for this machine; the second with `synapses="dense"` set explicitly, every
other field the same, so on a CPU both use remat=stream), compiled, and warmed up. Then `--rounds`
rounds alternate the two, each timing `--steps` steps on batches of the config's real training
data (read before timing); the table gives the median images/s of each and the ratio of the
medians. Issue 21's target: the default at least 1.5x the dense synapses on the 2-core CPU.
Run it on a quiet machine: another process on the 2 cores changes both sides.
"""

import argparse
import os
import runpy
import statistics
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bitnet_jax import run_config  # noqa: E402  pylint: disable=wrong-import-position
from bitnet_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position
from bitnet_jax import train_step  # noqa: E402  pylint: disable=wrong-import-position


def _step(config, info):
  """(jitted step, fresh state, resolution) of `config` as the trainer builds them."""
  config, resolution = run_config.resolve(config)
  module = run_config.make_module(config, info)
  tx = run_config.optimizer(config, 100, 1000)
  mesh = sharding.data_mesh()
  step = run_config.train_step(config, module, tx, info, mesh)
  state = jax.jit(lambda rng: train_step.init_state(module, tx, rng))(jax.random.PRNGKey(0))
  return step, state, resolution


def _time(step, state, batches, steps: int):
  """(images/s over `steps` steps, the state after them)."""
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  return steps * batches[0]["label"].shape[0] / (time.perf_counter() - t0), state


def measure(path: str, rounds: int, steps: int, warmup: int, overrides: dict) -> dict:
  config = runpy.run_path(path)["get_config"]()
  config.update(overrides)
  info = run_config.dataset_info(config)
  it = run_config.train_iter(config, info)
  mesh = sharding.data_mesh()
  batches = [sharding.shard_batch(next(it), mesh) for _ in range(min(steps, 20))]
  dense = config.copy_and_resolve_references()
  dense.synapses = "dense"
  runs = {"default (auto)": _step(config, info), "--config.synapses=dense": _step(dense, info)}
  speeds = {name: [] for name in runs}
  states = {}
  for name, (step, state, _) in runs.items():  # compile and warm up
    _, states[name] = _time(step, state, batches, warmup)
  for _ in range(rounds):
    for name, (step, _, _) in runs.items():
      speed, states[name] = _time(step, states[name], batches, steps)
      speeds[name].append(speed)
  return {"config": os.path.relpath(path, ROOT), "speeds": speeds,
          "resolution": {name: r[2].describe() for name, r in runs.items()}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="configs/quickstart.py,configs/fashion_mnist.py")
  p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per setting")
  p.add_argument("--steps", type=int, default=40, help="train steps per timed round")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  p.add_argument("--smoke", action="store_true", help="a tiny synthetic config, 2 steps")
  args = p.parse_args(argv)
  overrides, configs = {}, args.configs.split(",")
  if args.smoke:
    overrides = dict(dataset="synthetic", fs=0.125, time_steps=2, batch_size=8,
                     synthetic_num_train=64)
    configs, args.rounds, args.steps, args.warmup = ["configs/quickstart.py"], 1, 2, 1
  load = os.getloadavg()[0]
  print(f"{os.cpu_count()} CPU threads, load {load:.1f} before; {args.rounds} rounds of "
        f"{args.steps} steps, alternating", flush=True)
  print("| config | setting | compute | images/s per round | median | default / dense |")
  print("|---|---|---|---|---:|---:|")
  for path in configs:
    result = measure(os.path.join(ROOT, path), args.rounds, args.steps, args.warmup, overrides)
    medians = {name: statistics.median(v) for name, v in result["speeds"].items()}
    ratio = medians["default (auto)"] / medians["--config.synapses=dense"]
    for name, values in result["speeds"].items():
      print(f"| {result['config']} | {name} | {result['resolution'][name]} | "
            f"{', '.join(f'{v:.1f}' for v in values)} | {medians[name]:.1f} | "
            f"{f'{ratio:.2f}x' if name.startswith('default') else ''} |", flush=True)
  print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
