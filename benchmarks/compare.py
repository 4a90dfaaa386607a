"""Side by side on one machine: bitnet-jax against the PyTorch baseline (torch_baseline.py).

Both sides run the same network with the same weights on the same batch: this script writes the
weights once (an .npz in the release's layout, `release.to_torch_state_dict`) and runs
every configuration in its own process, so that compile caches, thread pools and peak RSS do not
leak from one measurement into the next. It prints one markdown table (and --json writes the raw
numbers).

Weights. Speed and memory of a spiking network depend on how often it fires, and a freshly
initialised BITnet is nearly silent. The weights here are PyTorch's default init scaled by
`--gain`, then each layer's bias is shifted (layer by layer, by bisection, on 8 of the images
over min(50, eval T) steps) until the layer's share of zero outputs matches the seed's trained
CIFAR-10 BITnet6 (90.35, 92.38, 96.48, 94.11, 98.56, 90.78 % zeros for layers 1..6). The
sparsity measured in the timed evaluation (all images, eval T) is printed under the table.

Command (from the repository root; about 12 minutes on 2 idle CPU cores):

    python -m benchmarks.compare --default_config  # fs=1, batch 32: train T=10, 50; eval T=200
    python -m benchmarks.compare --smoke           # tiny sizes, about a minute: the script runs

JAX rows come in two synapse kinds (`--synapses dense,sparse`): XLA's convolutions, and the
zero-skipping CPU kernel of `bitnet_jax/spike_conv.py` (float32 only; evaluated with
`--sparse_eval_engine`, default `parallel`).

Timings are the median of --iters timed iterations after one warm-up (JAX: after compiling);
the PyTorch script reports the mean of its --torch_iters iterations after one warm-up.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("begin", "layer1", "layer2", "layer3", "layer4", "mlp1")
SEED_SPARSITY = (90.35, 92.38, 96.48, 94.11, 98.56, 90.78)  # % zeros, CIFAR-10 BITnet6 (seed)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------------
# Inputs shared by both sides.


def make_batch(batch: int, classes: int, seed: int):
  """The PyTorch script's synthetic batch, as uint8 NHWC images and int32 labels."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import torch_baseline  # pylint: disable=import-outside-toplevel
  images, labels = torch_baseline.synthetic_batch(batch, classes, 32, seed=seed)
  mean = np.asarray(CIFAR_MEAN, np.float64)[:, None, None]
  std = np.asarray(CIFAR_STD, np.float64)[:, None, None]
  raw = np.rint((images.numpy().astype(np.float64) * std + mean) * 255.0)  # the integers drawn
  return raw.astype(np.uint8).transpose(0, 2, 3, 1), labels.numpy().astype(np.int32)


def calibrate(fs: float, classes: int, images_u8, *, gain: float, steps: int,
              target=SEED_SPARSITY, seed: int = 0):
  """Default-init weights scaled by `gain`, each layer's bias shifted to `target` % zeros.

  Returns:
    (params, sparsity): our parameters and the per-layer % of zero outputs they give on
    `images_u8` over `steps` time steps.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import bitnet_jax  # pylint: disable=import-outside-toplevel
  from bitnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel

  model = bitnet_jax.create_model(fs=fs, num_classes=classes, seed=seed)
  module = model.module
  params = jax.tree_util.tree_map(lambda a: np.asarray(a) * gain, model.params)
  images = input_pipeline.normalize(images_u8, CIFAR_MEAN, CIFAR_STD)
  neurons = np.array([np.prod(s.shape) for s in module.plan()], np.float64)
  fired = jax.jit(lambda p: bitnet_jax.run(module, p, images, steps).layer_spikes.sum(0))

  def sparsity(p):
    return 100.0 * (1.0 - np.asarray(fired(p), np.float64) / (len(images) * steps * neurons))

  for i, name in enumerate(LAYERS):
    base = params[name]["bias"].copy()
    lo, hi = -3.0, 3.0  # bias shift; a lower bias means more zeros
    for _ in range(10):
      mid = 0.5 * (lo + hi)
      params[name]["bias"] = base + mid
      if sparsity(params)[i] < target[i]:
        hi = mid
      else:
        lo = mid
    params[name]["bias"] = (base + 0.5 * (lo + hi)).astype(np.float32)
  return params, sparsity(params)


# ------------------------------------------------------------------------------------------
# Child processes: one measurement each, printed as one JSON line.


def _peak_rss_mib() -> float:
  """Peak resident memory of this process. VmHWM belongs to the process's own address space;
  ru_maxrss would also count the parent's size at fork (Linux carries it across exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _memory_gib(compiled) -> float | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**30


def child_weights(args) -> dict:
  """Writes the batch and the calibrated weights (release layout) for the other children."""
  from bitnet_jax import release  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  images, labels = make_batch(args.batch, args.classes, args.seed)
  np.savez(args.batch_file, images=images, labels=labels)
  params, sparsity = calibrate(args.fs, args.classes, images[:8], gain=args.gain,
                               steps=args.steps, seed=args.seed)
  np.savez(args.weights, **release.to_torch_state_dict(params))
  return {"sparsity": [float(s) for s in sparsity], "seconds": time.perf_counter() - t0}


def _load(args):
  from bitnet_jax import models, release  # pylint: disable=import-outside-toplevel
  with np.load(args.weights) as f:
    params = release.to_flax_params(dict(f), fs=args.fs, num_classes=args.classes)
  with np.load(args.batch_file) as f:
    images, labels = f["images"], f["labels"]
  module = models.BITnet6(fs=args.fs, num_classes=args.classes, sparse=args.synapse == "sparse",
                          precision=args.precision, **models.compute_dtype(args.dtype))
  return module, params, images, labels


def child_train(args) -> dict:
  """The real train step (`trainer.make_train_step`), SGD with momentum like the baseline."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bitnet_jax import build, datasets, input_pipeline, trainer  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  _, params, images, labels = _load(args)
  config = default.get_config()
  config.update(fs=args.fs, time_steps=args.steps, batch_size=len(images), engine=args.engine,
                remat=args.remat, chunk=args.chunk, compute_dtype=args.dtype,
                synapses=args.synapse, matmul_precision=args.precision, optimizer="sgd",
                learning_rate=0.01, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
                schedule="constant", warmup_epochs=0.0)
  info = datasets.DatasetInfo(name="synthetic", num_classes=args.classes,
                              image_shape=images.shape[1:], num_train=len(images), num_test=1,
                              mean=CIFAR_MEAN, std=CIFAR_STD)
  module = build.make_module(config, info)
  tx = trainer.make_optimizer(config, 1, 1000)
  mesh = input_pipeline.data_mesh()
  step = trainer.make_train_step(module, config, tx, info, mesh)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"images_per_s": len(images) / median, "seconds_per_iter": median, "times": times,
          "compile_s": compile_s, "xla_memory_gib": _memory_gib(compiled),
          "peak_rss_mib": _peak_rss_mib(), "loss": float(metrics["loss"]),
          "device": str(jax.devices()[0].platform)}


def child_eval(args) -> dict:
  """Spike counts of `bitnet_jax.run` (what `spike_counts` computes), jitted."""
  import jax  # pylint: disable=import-outside-toplevel
  import bitnet_jax  # pylint: disable=import-outside-toplevel
  from bitnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel

  module, params, images, _ = _load(args)
  params = jax.device_put(params)
  images = input_pipeline.normalize(jax.device_put(images), CIFAR_MEAN, CIFAR_STD)

  @jax.jit
  def counts(params, images):
    trace = bitnet_jax.run(module, params, images, args.steps, engine=args.engine,
                           chunk=args.chunk)
    return trace.out_spikes.sum(0), trace.layer_spikes.sum(0)

  t0 = time.perf_counter()
  compiled = counts.lower(params, images).compile()
  compile_s = time.perf_counter() - t0
  out, fired = jax.block_until_ready(compiled(params, images))  # warm-up
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    out, fired = jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  neurons = np.array([np.prod(s.shape) for s in module.plan()], np.float64)
  sparsity = 100.0 * (1.0 - np.asarray(fired, np.float64) / (len(images) * args.steps * neurons))
  return {"images_per_s": len(images) / median, "seconds_per_iter": median, "times": times,
          "compile_s": compile_s, "xla_memory_gib": _memory_gib(compiled),
          "peak_rss_mib": _peak_rss_mib(), "count_sum": float(np.asarray(out).sum()),
          "sparsity": [float(s) for s in sparsity], "device": str(jax.devices()[0].platform)}


# ------------------------------------------------------------------------------------------
# Parent: run everything, print the table.


def _run_child(argv: list[str], timeout: float) -> dict:
  load = os.getloadavg()[0]
  out = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)))
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # The 1-minute load average before and after: on a shared machine other processes compete
  # for the cores, and PyTorch's OpenMP threads lose far more to that than XLA's pool does.
  result["load"] = (load, os.getloadavg()[0])
  return result


def _jax(kind, args, files, steps, engine, remat, chunk, dtype, iters,
         synapses="dense") -> dict:
  chunk = chunk if engine == "parallel" else 0
  argv = ["-m", "benchmarks.compare", "--child", kind, "--weights", files[0], "--batch_file",
          files[1], "--fs", str(args.fs), "--classes", str(args.classes), "--steps", str(steps),
          "--engine", engine, "--remat", remat, "--chunk", str(chunk), "--dtype", dtype,
          "--synapse", synapses, "--iters", str(iters), "--precision", args.precision]
  result = _run_child(argv, args.timeout)
  config = (f"{engine}, remat={remat}, chunk={chunk}" if kind == "train" else
            f"{engine}, chunk={chunk}" if engine == "parallel" else engine)
  result.update(framework="jax", mode=kind, steps=steps, dtype=dtype, synapses=synapses,
                precision=args.precision, config=f"{config}, {synapses} synapses")
  return result


def _torch(mode, args, files, steps, iters) -> dict:
  argv = [os.path.join("benchmarks", "torch_baseline.py"), "--mode", mode, "--fs", str(args.fs),
          "--steps", str(steps), "--batch", str(args.batch), "--classes", str(args.classes),
          "--iters", str(iters), "--warmup", "1", "--weights", files[0], "--seed",
          str(args.seed), "--dtype", "float32"]
  result = _run_child(argv, args.timeout)
  result.update(framework="pytorch", config="release structure, autograd through all steps"
                if mode == "train" else "release structure, inference_mode")
  return result


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
  lines = ["| mode | T | framework | configuration | dtype | images/s | speed-up vs torch | "
           "compile s | XLA memory GiB | peak RSS MiB | load before/after |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    base = [b for b in rows if b["framework"] == "pytorch" and b["mode"] == r["mode"] and
            b["steps"] == r["steps"]]
    speedup = (r["images_per_s"] / base[0]["images_per_s"]
               if base and r["framework"] == "jax" else None)
    lines.append(
        f"| {r['mode']} | {r['steps']} | {r['framework']} | {r['config']} | {r['dtype']} | "
        f"{r['images_per_s']:.2f} | {_fmt(speedup, '.2f')}{'x' if speedup else ''} | "
        f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(r.get('xla_memory_gib'), '.2f')} | "
        f"{r['peak_rss_mib']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fs", type=float, default=1.0, help="feature scale")
  p.add_argument("--batch", type=int, default=32, help="images per batch")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--train_steps", default="10,50", help="time steps T of the training runs")
  p.add_argument("--eval_steps", type=int, default=200, help="time steps T of the evaluation")
  p.add_argument("--compile_steps", type=int, default=10,
                 help="also compile evaluation at this T, to compare compile times")
  p.add_argument("--train_remat", default="stream", help="JAX training: remat of `parallel`")
  p.add_argument("--train_chunk", type=int, default=0, help="JAX training: steps per chunk")
  p.add_argument("--default_config", action="store_true",
                 help="also time the trainer's defaults (parallel, remat=none) at the first T, "
                      "for each kind of --synapses")
  p.add_argument("--eval_engine", default="scan",
                 help="JAX evaluation engine (on CPU `scan` is ~10%% faster than `parallel`)")
  p.add_argument("--sparse_eval_engine", default="parallel",
                 help="JAX evaluation engine with sparse synapses (parallel: ~5%% faster here)")
  p.add_argument("--sparse_eval_chunk", type=int, default=10,
                 help="JAX evaluation with sparse synapses, parallel engine: steps per chunk "
                      "(10: evaluation's default, engines.EVAL_CHUNK)")
  p.add_argument("--eval_chunk", type=int, default=10,
                 help="JAX evaluation, parallel engine: steps per chunk")
  p.add_argument("--dtypes", default="float32", help="JAX compute dtypes, comma separated")
  p.add_argument("--precision", default="highest",
                 help="JAX matmul_precision: highest | high | default (TF32 on Ampere+ GPUs)")
  p.add_argument("--synapses", default="dense,sparse",
                 help="JAX synapses, comma separated: dense (XLA's convolutions) and/or sparse "
                      "(spike_conv's zero-skipping CPU kernel; float32 only)")
  p.add_argument("--iters", type=int, default=3, help="timed JAX iterations (median)")
  p.add_argument("--torch_iters", type=int, default=2, help="timed PyTorch iterations (mean)")
  p.add_argument("--torch", choices=("on", "off"), default="on", help="run the baseline")
  p.add_argument("--gain", type=float, default=2.0, help="weight scale before calibration")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes (fs=0.125, batch 4, T=2/4, eval T=8): checks that it runs")
  p.add_argument("--json", default="", help="also write the raw results here")
  # Child-process arguments (internal).
  p.add_argument("--child", choices=("weights", "train", "eval"), help=argparse.SUPPRESS)
  p.add_argument("--weights", help=argparse.SUPPRESS)
  p.add_argument("--batch_file", help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
  p.add_argument("--engine", default="parallel", help=argparse.SUPPRESS)
  p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--synapse", default="dense", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.child:
    result = {"weights": child_weights, "train": child_train, "eval": child_eval}[args.child](args)
    print(json.dumps(result), flush=True)
    return result

  if args.smoke or os.environ.get("BITNET_BENCH_SMOKE"):
    args.fs, args.batch, args.train_steps, args.eval_steps = 0.125, 4, "2,4", 8
    args.compile_steps, args.iters, args.torch_iters, args.eval_chunk = 2, 1, 1, 4
    args.sparse_eval_chunk = 4
    args.train_chunk = min(args.train_chunk, 2)  # T=4 then runs two chunks
  train_steps = [int(t) for t in args.train_steps.split(",") if t]
  # (dtype, synapses) of the JAX rows: sparse synapses compute in float32 only.
  variants = [(d, s) for s in args.synapses.split(",") if s for d in args.dtypes.split(",")
              if d and (s == "dense" or d == "float32")]

  with tempfile.TemporaryDirectory() as tmp:
    # This process imports neither JAX nor PyTorch: it stays small, so that it does not show in
    # its children's peak memory.
    files = (os.path.join(tmp, "weights.npz"), os.path.join(tmp, "batch.npz"))
    calib = _run_child(
        ["-m", "benchmarks.compare", "--child", "weights", "--weights", files[0], "--batch_file",
         files[1], "--fs", str(args.fs), "--classes", str(args.classes), "--batch",
         str(args.batch), "--steps", str(min(50, args.eval_steps)), "--gain",
         str(args.gain), "--seed", str(args.seed)], args.timeout)
    calib = calib["sparsity"]
    print(f"weights: fs={args.fs}, calibrated to {np.round(calib, 2).tolist()} % zeros per "
          "layer", flush=True)

    rows = []
    def add(row):
      rows.append(row)
      print(json.dumps(row), flush=True)

    for steps in train_steps:
      for dtype, synapses in variants:
        add(_jax("train", args, files, steps, "parallel", args.train_remat, args.train_chunk,
                 dtype, args.iters, synapses))
      if args.default_config and steps == train_steps[0]:
        for synapses in dict.fromkeys(s for _, s in variants):
          add(_jax("train", args, files, steps, "parallel", "none", 0, "float32", args.iters,
                   synapses))
      if args.torch == "on":
        add(_torch("train", args, files, steps, args.torch_iters))
    for dtype, synapses in variants:
      engine, chunk = ((args.sparse_eval_engine, args.sparse_eval_chunk) if synapses == "sparse"
                       else (args.eval_engine, args.eval_chunk))
      add(_jax("eval", args, files, args.eval_steps, engine, "none", chunk, dtype, args.iters,
               synapses))
    short = _jax("eval", args, files, args.compile_steps, args.eval_engine, "none",
                 min(args.eval_chunk, args.compile_steps), "float32", 1)
    if args.torch == "on":
      add(_torch("eval", args, files, args.eval_steps, args.torch_iters))

  print()
  print(f"fs={args.fs}, batch {args.batch}, {args.classes} classes, 32x32x3; "
        f"one process per row; {os.cpu_count()} CPU threads visible; load = 1-minute load "
        "average (a value above 0 while nothing of ours runs is another user)")
  print()
  print(table(rows))
  ev = [r for r in rows if r["framework"] == "jax" and r["mode"] == "eval"][0]
  print()
  print(f"JAX eval compile time: T={args.eval_steps}: {ev['compile_s']:.2f}s, "
        f"T={args.compile_steps}: {short['compile_s']:.2f}s "
        f"(ratio {ev['compile_s'] / short['compile_s']:.2f})")
  print("per-layer % zeros in the timed evaluation (layers 1..6): "
        f"{np.round(ev['sparsity'], 2).tolist()}")
  torch_eval = [r for r in rows if r["framework"] == "pytorch" and r["mode"] == "eval"]
  if torch_eval:
    print(f"spike-count sum over the batch at T={args.eval_steps}: jax {ev['count_sum']:.0f}, "
          f"pytorch {torch_eval[0]['last_count_sum']:.0f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "calibration": list(calib), "rows": rows,
                 "compile_short": short}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
