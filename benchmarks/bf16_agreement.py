"""How closely bfloat16 compute reproduces float32's spikes, on a trained model and real images.

    python -m benchmarks.bf16_agreement                      # workdirs/fashion_mnist, 500 images
    python -m benchmarks.bf16_agreement --workdir DIR --config configs/X.py --n 1000 --steps 8,200

Runs the model of a training workdir (its latest checkpoint) on the first --n test images with
each compute dtype of `models.COMPUTE_DTYPES`, and with float64 (the exact value that every
float32 program only approximates), and prints, per dtype and T, the share of the (image, class)
spike counts equal to float32's, the share within one count, the share of images whose
predicted class (argmax of counts, first index on ties) is float32's, and the same against
float64 -- which shows how far float32 itself is from exact. Needs `jax_enable_x64` (set here).
"""

import argparse
import os
import runpy
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bitnet_jax import checkpointing, data, engines, models, run_config  # noqa: E402


def counts_fn(module, steps):
  return jax.jit(lambda p, x: engines.run(module, p, x, steps).out_spikes.sum(0))  # (B, K)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="workdirs/fashion_mnist")
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--n", type=int, default=500, help="test images")
  p.add_argument("--steps", default="8,50", help="time steps T, comma separated")
  p.add_argument("--batch", type=int, default=250)
  args = p.parse_args(argv)

  config = runpy.run_path(args.config)["get_config"]()
  config.update(compute_dtype="float32", matmul_precision="highest", synapses="dense")  # the base
  config, _ = run_config.resolve(config)
  info = run_config.dataset_info(config)
  base = run_config.make_module(config, info)
  params, meta = checkpointing.load_params(args.workdir, "latest")
  checkpointing.check_architecture(meta["arch"], checkpointing.architecture(base), meta["source"])
  images_u8, _ = run_config.source(config, "test").read(np.arange(args.n))
  images = np.asarray(data.normalize(images_u8, info.mean, info.std))

  def run(name_or_dtype, steps):
    if name_or_dtype == "float64":
      module, cast = base.clone(dtype=jnp.float64, kernel_parts=1), jnp.float64
    else:
      module, cast = base.clone(**models.compute_dtype(name_or_dtype)), jnp.float32
    f = counts_fn(module, steps)
    p_ = jax.tree_util.tree_map(lambda a: jnp.asarray(a, cast), params)
    out = [np.asarray(f(p_, jnp.asarray(images[i:i + args.batch], cast)))
           for i in range(0, args.n, args.batch)]
    return np.concatenate(out)

  print(f"model: {args.workdir} ({meta['source']}), {info.name}, fs={config.fs}; "
        f"{args.n} test images; jax {jax.__version__} on {jax.devices()[0].platform}")
  print("\n| T | compute | counts = float32 | within 1 count | class = float32 "
        "| counts = float64 | class = float64 |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for steps in [int(s) for s in args.steps.split(",")]:
    ref64 = run("float64", steps)
    ref = run("float32", steps)
    for name in models.COMPUTE_DTYPES:
      got = ref if name == "float32" else run(name, steps)
      print(f"| {steps} | {name} | {100 * np.mean(got == ref):.2f} % "
            f"| {100 * np.mean(np.abs(got - ref) <= 1):.2f} % "
            f"| {100 * np.mean(got.argmax(1) == ref.argmax(1)):.2f} % "
            f"| {100 * np.mean(got == ref64):.2f} % "
            f"| {100 * np.mean(got.argmax(1) == ref64.argmax(1)):.2f} % |", flush=True)


if __name__ == "__main__":
  main()
