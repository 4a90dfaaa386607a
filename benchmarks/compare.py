"""Side by side on one machine: bitnet-jax against the PyTorch baseline (torch_baseline.py).

Both sides run the same network with the same weights on the same batch: this script writes the
weights once (an .npz in the release's layout, `interop.to_torch_state_dict`) and runs
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

On a GPU, `benchmarks/gpu.sh` runs it at the paper's setting with the PyTorch rows on the GPU too
(`--torch_device cuda --torch_dtypes float32,bfloat16`), several batch sizes (`--batch 128,32`),
a whole-run time budget (`--budget`) and a bf16 matmul probe (`--matmul_size`) whose rate is the
"% of peak" of the "model TFLOP/s" column: FLOPs counted from the layer shapes (`model_flops`).
Each row is printed and appended to the .jsonl beside --json as soon as it is measured, so a run
that is killed still leaves its rows; a failed or timed-out child becomes a row with its error.

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
  from bitnet_jax import data  # pylint: disable=import-outside-toplevel

  model = bitnet_jax.create_model(fs=fs, num_classes=classes, seed=seed)
  module = model.module
  params = jax.tree_util.tree_map(lambda a: np.asarray(a) * gain, model.params)
  images = data.normalize(images_u8, CIFAR_MEAN, CIFAR_STD)
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
# Model FLOPs, counted from the layer shapes.

TRAIN_PASSES = 3  # a train step: forward + backward (input and weight gradients, 2x forward)


def forward_flops(plan, in_channels: int = 3) -> int:
  """FLOPs of one time step's forward pass for one image: 2 x the MACs of every synapse.

  Args:
    plan: `module.plan()`, the six layers with their per-image output shapes: a 3x3 conv from
      (H, W, C_in) to (H, W, C_out) is H*W*C_out*C_in*9 MACs; the final linear from the
      flattened (pooled) last conv output (D,) to (classes,) is D*classes MACs.
    in_channels: channels of the image, the input of the first conv.

  Biases, neurons and max-pools are not counted (elementwise, under 0.1 % of the total).
  """
  flops, cin, flat = 0, in_channels, 0
  for spec in plan:
    if len(spec.shape) == 3:  # conv: (H, W, C_out)
      h, w, cout = spec.shape
      flops += 2 * h * w * cout * cin * 9
      cin = cout
      flat = (h // 2) * (w // 2) * cout if spec.pool else h * w * cout
    else:  # linear: (classes,)
      flops += 2 * flat * spec.shape[0]
  return flops


def flops_per_image(step_flops: float, steps: int, mode: str) -> float:
  """Model FLOPs per image of a train step (3x the forward) or an evaluation over `steps` steps.

  Counted as the model defines them: every layer at every step (also the first layer, whose input
  does not change; the release recomputes it, our engines may not), and the forward pass once
  (the recomputation of `remat` is not counted). fs=4, T=50, 32x32x3, 10 classes: 2.4233e9 MACs
  per step, so 727.0 GFLOP per trained image, the issue's "about 725"; the first layer (0.3 % of
  the MACs) has no input gradient to compute, so a train step really needs 0.1 % less.
  """
  return step_flops * steps * (TRAIN_PASSES if mode == "train" else 1)


def model_flops(fs: float, img_size: int = 32, classes: int = 10, steps: int = 50,
                mode: str = "train", variant: str = "BITnet6") -> float:
  """Model FLOPs per image of BITnet at this size (see `flops_per_image`); imports JAX."""
  from bitnet_jax import models  # pylint: disable=import-outside-toplevel
  plan = models.create_module(variant, fs=fs, num_classes=classes, img_size=img_size).plan()
  return flops_per_image(forward_flops(plan), steps, mode)


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


def _ints(text: str) -> list[int]:
  """'128,32' -> [128, 32]."""
  return [int(t) for t in text.split(",") if t]


def batch_path(batch_dir: str, batch: int) -> str:
  """Where the weights child writes the batch of `batch` images for the others."""
  return os.path.join(batch_dir, f"batch_{batch}.npz")


def child_weights(args) -> dict:
  """Writes one batch per --batch, the calibrated weights (release layout, calibrated on the
  first batch's first 8 images) and returns the model's forward FLOPs per time step and image."""
  from bitnet_jax import interop  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  calibration_images = None
  for batch in _ints(args.batch):
    images, labels = make_batch(batch, args.classes, args.seed)
    np.savez(batch_path(args.batch_dir, batch), images=images, labels=labels)
    calibration_images = images[:8] if calibration_images is None else calibration_images
  params, sparsity = calibrate(args.fs, args.classes, calibration_images, gain=args.gain,
                               steps=args.steps, seed=args.seed)
  np.savez(args.weights, **interop.to_torch_state_dict(params))
  return {"sparsity": [float(s) for s in sparsity], "seconds": time.perf_counter() - t0,
          "forward_flops": model_flops(args.fs, classes=args.classes, steps=1, mode="eval")}


def _load(args):
  from bitnet_jax import interop, models  # pylint: disable=import-outside-toplevel
  with np.load(args.weights) as f:
    params = interop.to_flax_params(dict(f), fs=args.fs, num_classes=args.classes)
  with np.load(batch_path(args.batch_dir, int(args.batch))) as f:
    images, labels = f["images"], f["labels"]
  module = models.BITnet6(fs=args.fs, num_classes=args.classes, sparse=args.synapse == "sparse",
                          precision=args.precision, **models.compute_dtype(args.dtype))
  return module, params, images, labels


def child_train(args) -> dict:
  """The real train step (`train_step.make_train_step`), SGD with momentum like the baseline."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bitnet_jax import data, run_config, sharding, train_step  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  _, params, images, labels = _load(args)
  config = default.get_config()
  config.update(fs=args.fs, time_steps=args.steps, batch_size=len(images), engine=args.engine,
                remat=args.remat, chunk=args.chunk, compute_dtype=args.dtype,
                synapses=args.synapse, matmul_precision=args.precision, optimizer="sgd",
                learning_rate=0.01, momentum=0.9, weight_decay=0.0, grad_clip=0.0,
                schedule="constant", warmup_epochs=0.0)
  info = data.DatasetInfo(name="synthetic", num_classes=args.classes,
                          image_shape=images.shape[1:], num_train=len(images), num_test=1,
                          mean=CIFAR_MEAN, std=CIFAR_STD)
  module = run_config.make_module(config, info)
  tx = run_config.optimizer(config, 1, 1000)
  mesh = sharding.data_mesh()
  step = run_config.train_step(config, module, tx, info, mesh)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
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
  from bitnet_jax import data  # pylint: disable=import-outside-toplevel

  module, params, images, _ = _load(args)
  params = jax.device_put(params)
  images = data.normalize(jax.device_put(images), CIFAR_MEAN, CIFAR_STD)

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


def child_matmul(args) -> dict:
  """The device's bf16 matmul rate: jitted (n, n) @ (n, n) products, n = --matmul_size, in 5
  rounds of --iters products each (queued, then waited for); the rate is the median round's."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  n = args.matmul_size
  key_a, key_b = jax.random.split(jax.random.PRNGKey(args.seed))
  a = jax.random.normal(key_a, (n, n), jnp.bfloat16)  # (n, n)
  b = jax.random.normal(key_b, (n, n), jnp.bfloat16)  # (n, n)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))  # compile and warm up
  rates = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(args.iters):
      out = matmul(a, b)
    out.block_until_ready()
    rates.append(2 * n**3 * args.iters / (time.perf_counter() - t0) / 1e12)
  return {"tflops": statistics.median(rates), "rounds_tflops": rates, "n": n,
          "iters": args.iters, "device": str(jax.devices()[0].platform),
          "device_kind": jax.devices()[0].device_kind}


# ------------------------------------------------------------------------------------------
# Parent: run everything, print the table.

MATMUL_ITERS = 50  # products per round of the matmul probe (8192: ~70 ms a round on an H200)


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


def _measure(spec: dict, argv: list[str], timeout: float) -> dict:
  """Runs one child: its JSON updated with `spec`; for a child that failed, timed out or was not
  started for lack of time (`timeout` < 1 s), `spec` with "error" or "skipped"."""
  if timeout < 1:
    return dict(spec, skipped="out of --budget")
  try:
    result = _run_child(argv, timeout)
  except subprocess.TimeoutExpired:
    result = {"error": f"timed out after {timeout:.0f} s"}
  except RuntimeError as e:
    print(e, file=sys.stderr, flush=True)
    result = {"error": str(e).strip().splitlines()[-1][-300:]}
  result.update(spec)
  return result


def _jax(kind, args, files, batch, steps, engine, remat, chunk, dtype, iters,
         synapses="dense", precision=None, label="") -> tuple[dict, list[str]]:
  """(spec, argv) of one JAX row: `spec` names the row, `argv` runs its child."""
  chunk = chunk if engine == "parallel" else 0
  precision = precision or args.precision
  argv = ["-m", "benchmarks.compare", "--child", kind, "--weights", files[0], "--batch_dir",
          files[1], "--batch", str(batch), "--fs", str(args.fs), "--classes", str(args.classes),
          "--steps", str(steps), "--engine", engine, "--remat", remat, "--chunk", str(chunk),
          "--dtype", dtype, "--synapse", synapses, "--iters", str(iters), "--precision",
          precision]
  config = (f"{engine}, remat={remat}, chunk={chunk}" if kind == "train" else
            f"{engine}, chunk={chunk}" if engine == "parallel" else engine)
  spec = dict(framework="jax", mode=kind, steps=steps, batch=batch, dtype=dtype,
              synapses=synapses, precision=precision,
              config=f"{label}{config}, {synapses} synapses")
  return spec, argv


def _auto() -> dict:
  """What the trainer's defaults (`auto`, bitnet_jax/defaults.py) resolve to on this machine
  (configs/default.py's engine and surrogate: parallel, ste)."""
  from bitnet_jax import defaults  # pylint: disable=import-outside-toplevel
  return defaults.resolve({}).values


def _torch(mode, args, files, batch, steps, dtype) -> tuple[dict, list[str]]:
  """(spec, argv) of one PyTorch row (torch_baseline.py on --torch_device)."""
  argv = [os.path.join("benchmarks", "torch_baseline.py"), "--mode", mode, "--fs", str(args.fs),
          "--steps", str(steps), "--batch", str(batch), "--classes", str(args.classes),
          "--iters", str(args.torch_iters), "--warmup", "1", "--weights", files[0], "--seed",
          str(args.seed), "--dtype", dtype, "--device", args.torch_device]
  how = "autograd through all steps" if mode == "train" else "inference_mode"
  spec = dict(framework="pytorch", mode=mode, steps=steps, batch=batch, dtype=dtype,
              config=f"release structure, {how}, {args.torch_device}")
  return spec, argv


def _variants(dtypes: str, synapses: str) -> list[tuple[str, str]]:
  """(dtype, synapses) of the JAX rows: sparse synapses compute in float32 only."""
  return [(d, s) for s in synapses.split(",") if s for d in dtypes.split(",")
          if d and (s == "dense" or d == "float32")]


def plan_rows(args, files) -> list[tuple[dict, list[str]]]:
  """Every row's (spec, argv), most important first: the --dtypes with their PyTorch rows, then
  the --late_dtypes (JAX only); within each, batch by batch (--batch order), training at each T
  then evaluation, JAX rows before PyTorch rows."""
  rows = []
  batches, train_steps = _ints(args.batch), _ints(args.train_steps)
  torch_dtypes = [d for d in args.torch_dtypes.split(",") if d] if args.torch == "on" else []
  for late, dtypes in enumerate((args.dtypes, args.late_dtypes)):
    variants = _variants(dtypes, args.synapses)
    torch_rows = torch_dtypes if not late else []
    for batch in batches:
      for steps in train_steps:
        for dtype, synapses in variants:
          rows.append(_jax("train", args, files, batch, steps, "parallel", args.train_remat,
                           args.train_chunk, dtype, args.iters, synapses))
        if args.default_config and not late and (batch, steps) == (batches[0], train_steps[0]):
          auto = _auto()
          rows.append(_jax("train", args, files, batch, steps, "parallel", auto["remat"],
                           args.default_chunk, auto["compute_dtype"], args.iters,
                           auto["synapses"], precision=auto["matmul_precision"],
                           label="trainer default (auto): "))
        rows += [_torch("train", args, files, batch, steps, d) for d in torch_rows]
      for dtype, synapses in variants:
        engine, chunk = ((args.sparse_eval_engine, args.sparse_eval_chunk) if synapses == "sparse"
                         else (args.eval_engine, args.eval_chunk))
        rows.append(_jax("eval", args, files, batch, args.eval_steps, engine, "none", chunk, dtype,
                         args.iters, synapses))
      rows += [_torch("eval", args, files, batch, args.eval_steps, d) for d in torch_rows]
  return rows


def _add_rates(row: dict, step_flops: float, peak: float | None) -> None:
  """Adds the row's model TFLOP/s (`flops_per_image` x images/s) and its share of `peak`."""
  if row.get("images_per_s"):
    row["model_tflops"] = (flops_per_image(step_flops, row["steps"], row["mode"]) *
                           row["images_per_s"] / 1e12)
    row["peak_fraction"] = row["model_tflops"] / peak if peak else None


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _dtype_label(r: dict) -> str:
  """The dtype as computed: PyTorch's bf16 is autocast, its float32 convs TF32 where cuDNN may."""
  if r["framework"] == "pytorch":
    if r["dtype"] != "float32":
      return f"{r['dtype']} autocast"
    return "float32 (TF32 convs)" if r.get("cudnn_allow_tf32") else "float32"
  if r["dtype"] == "float32" and r.get("precision", "highest") != "highest":
    return f"float32 (precision={r['precision']})"
  return r["dtype"]


def _torch_rows(rows: list[dict], r: dict) -> list[dict]:
  """The measured PyTorch rows of r's mode, T and batch."""
  return [b for b in rows if b["framework"] == "pytorch" and b.get("images_per_s") and
          (b["mode"], b["steps"], b["batch"]) == (r["mode"], r["steps"], r["batch"])]


def _speedups(rows: list[dict], r: dict) -> tuple[float | None, float | None]:
  """A JAX row's speed-up over the PyTorch row of the same dtype (bfloat16 against bfloat16
  autocast, every other dtype against float32) and over the fastest PyTorch row."""
  base = _torch_rows(rows, r) if r["framework"] == "jax" and r.get("images_per_s") else []
  if not base:
    return None, None
  same = [b for b in base if b["dtype"] == ("bfloat16" if r["dtype"] == "bfloat16" else "float32")]
  fastest = max(b["images_per_s"] for b in base)
  return (r["images_per_s"] / same[0]["images_per_s"] if same else None,
          r["images_per_s"] / fastest)


def table(rows: list[dict]) -> str:
  lines = ["| mode | T | batch | framework | configuration | dtype | images/s | speed-up vs torch "
           "same dtype | vs fastest torch | model TFLOP/s | % of peak | compile s | device memory "
           "GiB | peak RSS MiB | load before/after |",
           "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    same, fastest = _speedups(rows, r)
    speed = ("failed" if r.get("error") else "skipped" if r.get("skipped") else
             f"{r['images_per_s']:.2f}")
    memory = r.get("xla_memory_gib", r.get("cuda_max_memory_gib"))
    fraction = r.get("peak_fraction")
    load = f"{r['load'][0]:.1f} / {r['load'][1]:.1f}" if r.get("load") else "-"
    lines.append(
        f"| {r['mode']} | {r['steps']} | {r['batch']} | {r['framework']} | {r['config']} | "
        f"{_dtype_label(r)} | {speed} | {_fmt(same, '.2f')}{'x' if same else ''} | "
        f"{_fmt(fastest, '.2f')}{'x' if fastest else ''} | {_fmt(r.get('model_tflops'), '.4g')} "
        f"| {_fmt(None if fraction is None else 100 * fraction, '.1f')} | "
        f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(memory, '.2f')} | "
        f"{_fmt(r.get('peak_rss_mib'), '.0f')} | {load} |")
  return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
  """Issue 16's GPU targets as measured: per mode, T and batch, the fastest JAX row over the
  fastest PyTorch row (target >= 5x); and each bfloat16 JAX train row's share of the matmul rate
  (target >= 50 %)."""
  ok = [r for r in rows if r.get("images_per_s")]
  lines = []
  for key in dict.fromkeys((r["mode"], r["steps"], r["batch"]) for r in ok):
    same = [r for r in ok if (r["mode"], r["steps"], r["batch"]) == key]
    best = {f: max((r for r in same if r["framework"] == f), key=lambda r: r["images_per_s"],
                   default=None) for f in ("jax", "pytorch")}
    if best["jax"] and best["pytorch"]:
      ratio = best["jax"]["images_per_s"] / best["pytorch"]["images_per_s"]
      lines.append(f"{key[0]} T={key[1]} batch {key[2]}: fastest jax ({best['jax']['dtype']}) / "
                   f"fastest pytorch ({_dtype_label(best['pytorch'])}) = {ratio:.2f}x "
                   f"(target >= 5x: {'met' if ratio >= 5 else 'not met'})")
  for r in ok:
    if (r["framework"], r["mode"], r["dtype"]) == ("jax", "train", "bfloat16") and \
        r.get("peak_fraction") is not None:
      lines.append(f"train T={r['steps']} batch {r['batch']}: jax bfloat16 at "
                   f"{100 * r['peak_fraction']:.1f} % of the matmul rate (target >= 50 %: "
                   f"{'met' if r['peak_fraction'] >= 0.5 else 'not met'})")
  return lines


def report(args, rows, calib, step_flops, peak, matmul, short) -> None:
  """Prints the table and what goes under it."""
  print()
  print(f"fs={args.fs}, batch {args.batch}, {args.classes} classes, 32x32x3; JAX matmul "
        f"precision {args.precision}; PyTorch on {args.torch_device}; one process per row; "
        f"{os.cpu_count()} CPU threads visible; load = 1-minute load average (a value above 0 "
        "while nothing of ours runs is another user)")
  print()
  print(table(rows))
  print()
  train_steps = _ints(args.train_steps)
  print("model FLOPs per image (from the layer shapes; train = 3x forward, recompute not "
        "counted): " + ", ".join(
            [f"train T={t}: {flops_per_image(step_flops, t, 'train') / 1e9:.5g} G"
             for t in train_steps] +
            [f"eval T={args.eval_steps}: "
             f"{flops_per_image(step_flops, args.eval_steps, 'eval') / 1e9:.5g} G"]))
  if matmul is not None:
    measured = (f"{matmul['tflops']:.1f} TFLOP/s ({matmul['n']}^3 bf16 products on "
                f"{matmul['device_kind']})" if matmul.get("tflops") else
                f"failed: {matmul.get('error') or matmul.get('skipped')}")
    print(f"bf16 matmul probe: {measured}")
  print(f"% of peak = model TFLOP/s / {_fmt(peak, '.1f')} TFLOP/s "
        f"({'--peak_tflops' if args.peak_tflops else 'the probe'}); device memory = XLA's "
        "memory analysis (JAX) or torch.cuda.max_memory_allocated (PyTorch on cuda)")
  lines = targets(rows)
  if lines:
    print("targets (issue 16, GPU):\n  " + "\n  ".join(lines))
  evals = [r for r in rows if r["framework"] == "jax" and r["mode"] == "eval" and
           r.get("images_per_s")]
  if evals:
    ev = evals[0]
    if short and short.get("compile_s"):
      print(f"JAX eval compile time (batch {ev['batch']}): T={args.eval_steps}: "
            f"{ev['compile_s']:.2f}s, T={args.compile_steps}: {short['compile_s']:.2f}s "
            f"(ratio {ev['compile_s'] / short['compile_s']:.2f})")
    print(f"weights calibrated to {np.round(calib, 2).tolist()} % zeros per layer; in the timed "
          f"evaluation (batch {ev['batch']}, layers 1..6): {np.round(ev['sparsity'], 2).tolist()}")
    torch_eval = [r for r in _torch_rows(rows, ev) if r["dtype"] == "float32"]
    if torch_eval:
      print(f"spike-count sum over batch {ev['batch']} at T={args.eval_steps}: jax "
            f"{ev['dtype']} {ev['count_sum']:.0f}, pytorch float32 "
            f"{torch_eval[0]['last_count_sum']:.0f}")
  for r in rows:
    if r.get("error") or r.get("skipped"):
      print(f"not measured: {r['mode']} T={r['steps']} batch {r['batch']} {r['framework']} "
            f"{r['dtype']}: {r.get('error') or r.get('skipped')}")


def _smoke_list(text: str, tiny: tuple[int, ...]) -> str:
  """A comma-separated list replaced by as many of the `tiny` values, for --smoke."""
  n = len(_ints(text))
  if n > len(tiny):
    raise SystemExit(f"--smoke takes at most {len(tiny)} values here, got {text!r}")
  return ",".join(str(t) for t in tiny[:n])


def _append(path: str, record: dict) -> None:
  """Appends one JSON line to `path` (no-op without a path)."""
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
  """Runs a child (--child) or the whole comparison; the exit status: 1 if a row failed."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fs", type=float, default=1.0, help="feature scale")
  p.add_argument("--batch", default="32",
                 help="images per batch; comma separated for several (rows of each, in order)")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--train_steps", default="10,50", help="time steps T of the training runs")
  p.add_argument("--eval_steps", type=int, default=200, help="time steps T of the evaluation")
  p.add_argument("--compile_steps", type=int, default=10,
                 help="also compile evaluation at this T (last), to compare compile times; 0: no")
  p.add_argument("--train_remat", default="stream", help="JAX training: remat of `parallel`")
  p.add_argument("--train_chunk", type=int, default=0, help="JAX training: steps per chunk")
  p.add_argument("--default_config", action="store_true",
                 help="also time the trainer's defaults at the first T: what `auto` resolves to "
                      "on this machine (bitnet_jax/defaults.py; on a CPU: float32, sparse "
                      "synapses, remat=stream)")
  p.add_argument("--default_chunk", type=int, default=0,
                 help="the chunk of that row (configs/default.py: 0; the CIFAR configs: 5)")
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
  p.add_argument("--late_dtypes", default="",
                 help="JAX compute dtypes timed after every other row (all batches), comma "
                      "separated, e.g. bfloat16x3 when a --budget may not reach them")
  p.add_argument("--precision", default="highest",
                 help="JAX matmul_precision: highest | high | default (TF32 on Ampere+ GPUs)")
  p.add_argument("--synapses", default="dense,sparse",
                 help="JAX synapses, comma separated: dense (XLA's convolutions) and/or sparse "
                      "(spike_conv's zero-skipping CPU kernel; float32 only)")
  p.add_argument("--iters", type=int, default=3, help="timed JAX iterations (median)")
  p.add_argument("--torch_iters", type=int, default=2, help="timed PyTorch iterations (mean)")
  p.add_argument("--torch", choices=("on", "off"), default="on", help="run the baseline")
  p.add_argument("--torch_device", choices=("cpu", "cuda"), default="cpu",
                 help="where the baseline runs")
  p.add_argument("--torch_dtypes", default="float32",
                 help="the baseline's dtypes, comma separated, a row each: float32 (with "
                      "PyTorch's defaults: TF32 convolutions on cuda) and/or bfloat16 "
                      "(torch.autocast)")
  p.add_argument("--matmul_size", type=int, default=0,
                 help="first measure the device's bf16 matmul rate with JAX on (n, n) products "
                      "(gpu.sh: 8192; 0: no probe)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="the rate of the '% of peak' column (default: the probe's)")
  p.add_argument("--gain", type=float, default=2.0, help="weight scale before calibration")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
  p.add_argument("--budget", type=float, default=0,
                 help="seconds for the whole run (0: no limit): each child's timeout is cut to "
                      "what is left, and rows left without time are skipped")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes (fs=0.125, batch 4 (, 2), T=2 (, 4), eval T=8): checks that it "
                      "runs")
  p.add_argument("--json", default="",
                 help="write the raw results here at the end, and each record as it comes to the "
                      ".jsonl beside it")
  # Child-process arguments (internal).
  p.add_argument("--child", choices=("weights", "train", "eval", "matmul"),
                 help=argparse.SUPPRESS)
  p.add_argument("--weights", help=argparse.SUPPRESS)
  p.add_argument("--batch_dir", help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
  p.add_argument("--engine", default="parallel", help=argparse.SUPPRESS)
  p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--synapse", default="dense", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.child:
    children = {"weights": child_weights, "train": child_train, "eval": child_eval,
                "matmul": child_matmul}
    print(json.dumps(children[args.child](args)), flush=True)
    return 0

  if args.smoke or os.environ.get("BITNET_BENCH_SMOKE"):
    args.fs, args.eval_steps = 0.125, 8
    args.batch = _smoke_list(args.batch, (4, 2))
    args.train_steps = _smoke_list(args.train_steps, (2, 4))
    args.compile_steps = min(args.compile_steps, 2)
    args.iters, args.torch_iters, args.eval_chunk, args.sparse_eval_chunk = 1, 1, 4, 4
    args.train_chunk = min(args.train_chunk, 2)  # T=4 then runs two chunks
    args.matmul_size = min(args.matmul_size, 256)
  deadline = time.monotonic() + (args.budget if args.budget > 0 else float("inf"))

  def time_left():
    return min(args.timeout, deadline - time.monotonic())

  partial = os.path.splitext(args.json)[0] + ".jsonl" if args.json else ""
  if partial:
    open(partial, "w").close()

  def record(kind, rec):
    print(json.dumps(rec), flush=True)
    _append(partial, dict(rec, record=kind))

  with tempfile.TemporaryDirectory() as tmp:
    # This process imports neither JAX nor PyTorch: it stays small, so that it does not show in
    # its children's peak memory.
    files = (os.path.join(tmp, "weights.npz"), tmp)
    matmul = None
    if args.matmul_size > 0:
      matmul = _measure({"mode": "matmul"}, [
          "-m", "benchmarks.compare", "--child", "matmul", "--matmul_size",
          str(args.matmul_size), "--iters", str(MATMUL_ITERS), "--seed", str(args.seed)],
          time_left())
      record("matmul", matmul)
    peak = args.peak_tflops or (matmul or {}).get("tflops")
    weights = _run_child(
        ["-m", "benchmarks.compare", "--child", "weights", "--weights", files[0], "--batch_dir",
         files[1], "--fs", str(args.fs), "--classes", str(args.classes), "--batch", args.batch,
         "--steps", str(min(50, args.eval_steps)), "--gain", str(args.gain), "--seed",
         str(args.seed)], time_left())
    record("weights", weights)
    calib, step_flops = weights["sparsity"], weights["forward_flops"]
    print(f"weights: fs={args.fs}, calibrated to {np.round(calib, 2).tolist()} % zeros per "
          f"layer; model: {step_flops / 1e9:.4f} GFLOP per image and time step (forward)",
          flush=True)

    rows = []
    for spec, child_argv in plan_rows(args, files):
      row = _measure(spec, child_argv, time_left())
      _add_rates(row, step_flops, peak)
      rows.append(row)
      record("row", row)
    short = None
    if args.compile_steps > 0:
      spec, child_argv = _jax("eval", args, files, _ints(args.batch)[0], args.compile_steps,
                              args.eval_engine, "none", min(args.eval_chunk, args.compile_steps),
                              "float32", 1)
      short = _measure(spec, child_argv, time_left())
      record("compile_short", short)

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "calibration": list(calib), "forward_flops": step_flops,
                 "matmul": matmul, "peak_tflops": peak, "rows": rows, "compile_short": short},
                f, indent=1)
  report(args, rows, calib, step_flops, peak, matmul, short)
  return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
