"""Per layer: the zero-skipping spike convolution against XLA's dense one, on real spikes.

The weights are `compare.py`'s (default init scaled, biases calibrated to the seed's per-layer
sparsity); the network runs for --step time steps on the benchmark batch, and each conv layer's
input spikes at the last step are the operands. Prints a markdown table: input density, and the
best of 5 x 10 timed calls of `spike_conv.conv` and of `lax.conv_general_dilated` (both jitted,
no bias), per layer and in total; and the reuse across time that `spike_conv.layer` exploits: of
the (position, channel) inputs active at some step of the --block steps up to --step, at how many
of those steps each is active on average (a kernel row the layer loads once per block per tap).

    python -m benchmarks.sparse_layers            # fs=1, batch 32, step 40: about 2 minutes
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import compare
from bitnet_jax import data
from bitnet_jax import models
from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv


def layer_inputs(module, params, images, steps: int, block: int = 1) -> dict:
  """{layer name: (block, B, H, W, C) input spikes of that conv layer at the last `block` time
  steps up to `steps`}."""
  synapse = jax.jit(lambda name, x: module.apply({"params": params}, name, x,
                                                 method=module.synapse), static_argnums=0)
  states = [jnp.zeros((len(images),) + spec.shape) for spec in module.plan()]
  pred0, inputs = synapse("begin", images), {}
  for _ in range(steps):
    x = None
    for i, spec in enumerate(module.plan()):
      if spec.name not in ("begin", "mlp1"):
        inputs.setdefault(spec.name, []).append(x)
        del inputs[spec.name][:-block]
      spike, states[i] = neuron.bddi(states[i], pred0 if i == 0 else synapse(spec.name, x))
      x = neuron.maxpool(spike) if spec.pool else spike
  return {name: jnp.stack(xs) for name, xs in inputs.items()}


def best_ms(f, *args, reps: int = 5, calls: int = 10) -> float:
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(f(*args))
    best = min(best, (time.perf_counter() - t0) / calls)
  return 1e3 * best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fs", type=float, default=1.0)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--step", type=int, default=40, help="time step whose spikes are the inputs")
  p.add_argument("--block", type=int, default=8,
                 help="steps of the kernel's block (csrc/spike_conv.cc, kStepBlock) for the reuse")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  spike_conv.check_available()

  images_u8, _ = compare.make_batch(args.batch, 10, args.seed)
  params, _ = compare.calibrate(args.fs, 10, images_u8[:8], gain=2.0, steps=50, seed=args.seed)
  module = models.BITnet6(fs=args.fs, num_classes=10)
  images = data.normalize(images_u8, compare.CIFAR_MEAN, compare.CIFAR_STD)
  history = layer_inputs(module, params, images, args.step, args.block)
  inputs = {name: xs[-1] for name, xs in history.items()}

  sparse, dense = jax.jit(spike_conv.conv), jax.jit(spike_conv._dense)  # pylint: disable=protected-access
  print(f"fs={args.fs}, batch {args.batch}, input spikes at step {args.step}, float32, "
        f"{jax.device_count()} device(s) ({jax.devices()[0].device_kind})\n")
  print("| layer | input (B, H, W, C) | input density | sparse ms | dense ms | speed-up |")
  print("|---|---|---:|---:|---:|---:|")
  total = np.zeros(2)
  for name, x in inputs.items():
    kernel = jnp.asarray(params[name]["kernel"])
    ms = np.array([best_ms(sparse, x, kernel), best_ms(dense, x, kernel)])
    total += ms
    print(f"| {name} | {tuple(x.shape)} | {100 * float(x.mean()):.1f} % | {ms[0]:.2f} | "
          f"{ms[1]:.2f} | {ms[1] / ms[0]:.1f}x |")
  print(f"| all four | | | {total[0]:.2f} | {total[1]:.2f} | {total[1] / total[0]:.1f}x |")
  print(f"\nreuse across time, steps {args.step - args.block + 1}-{args.step}: active steps per "
        "active (position, channel)\n")
  print("| layer | input density | active (position, channel) per position | steps each |")
  print("|---|---:|---:|---:|")
  for name, xs in history.items():
    active = np.asarray(xs) > 0                               # (block, B, H, W, C)
    union = active.any(0)
    print(f"| {name} | {100 * active.mean():.1f} % | {union.sum(-1).mean():.1f} of "
          f"{active.shape[-1]} | {active.sum() / union.sum():.2f} |")


if __name__ == "__main__":
  main()
