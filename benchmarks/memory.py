"""Training memory against the number of time steps T, per time engine, and against PyTorch.

Part 1 (compile only, nothing runs): XLA's memory analysis of the real train step
(`train_step.make_train_step`, AdamW, the paper's setting fs=4, batch 32, float32) for T in
{10, 50, 100, 200}: temp + argument + output bytes of the compiled step. The step donates its
state, so its outputs reuse its arguments' buffers; the "peak" column counts them twice, as
asked, and "live" subtracts the aliased bytes (what the process actually needs).

Part 2 (runs one training step per process): peak resident memory (VmHWM) of a whole process at a
small size (fs=0.25, batch 32) for a few T, for PyTorch (benchmarks/torch_baseline.py: autograd
through every step) and for our train step, and the growth per time step (least-squares slope).

Every measurement runs in its own process; this one imports neither JAX nor PyTorch, so it does
not show in its children's peak memory.

Command (from the repository root; about 10 minutes on 2 CPU cores):

    python -m benchmarks.memory
    python -m benchmarks.memory --fs 1 --steps 10,50 --skip_rss      # another size, part 1 only
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, engine, remat, chunk): chunk 0 = all steps in one chunk.
CONFIGS = [("scan, none", "scan", "none", 0), ("scan, step", "scan", "step", 0),
           ("parallel, none", "parallel", "none", 0),
           ("parallel, chunk (10)", "parallel", "chunk", 10),
           ("parallel, stream (10)", "parallel", "stream", 10),
           ("parallel, stream (5)", "parallel", "stream", 5)]


def _peak_rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("no VmHWM in /proc/self/status")


def _config_and_info(args):
  """The default config at this run's size, and a synthetic 10-class 32x32 RGB dataset."""
  from bitnet_jax import data  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.update(fs=args.fs, time_steps=args.t, batch_size=args.batch, engine=args.engine,
                remat=args.remat, chunk=args.chunk)
  info = data.DatasetInfo(name="synthetic", num_classes=10, image_shape=(32, 32, 3),
                          num_train=1000, num_test=100, mean=(0.5,) * 3, std=(0.25,) * 3)
  return config, info


def child_compile(args) -> dict:
  from bitnet_jax import run_config  # pylint: disable=import-outside-toplevel
  m = run_config.compile_train_step(*_config_and_info(args)).memory_analysis()
  gib = lambda b: b / 2**30
  peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
  return {"temp": gib(m.temp_size_in_bytes), "argument": gib(m.argument_size_in_bytes),
          "output": gib(m.output_size_in_bytes), "alias": gib(m.alias_size_in_bytes),
          "peak": gib(peak), "live": gib(peak - m.alias_size_in_bytes)}


def child_rss(args) -> dict:
  """One real training step (random init scaled to fire, random uint8 images)."""
  import jax  # pylint: disable=import-outside-toplevel
  from bitnet_jax import run_config  # pylint: disable=import-outside-toplevel
  step, init = run_config.standalone_train_step(*_config_and_info(args))
  state = jax.jit(init)(jax.random.PRNGKey(0))
  state = state.replace(params=jax.tree_util.tree_map(lambda a: 2 * a, state.params))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, (args.batch,), dtype=np.int32)}
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return {"peak_rss_mib": _peak_rss_mib()}


def _child(argv, timeout=1800) -> dict:
  out = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)))
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _ours(kind, fs, t, batch, engine, remat, chunk) -> dict:
  return _child(["-m", "benchmarks.memory", "--child", kind, "--fs", str(fs), "--t", str(t),
                 "--batch", str(batch), "--engine", engine, "--remat", remat, "--chunk",
                 str(chunk)])


def _slope(xs, ys) -> float:
  return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def compile_table(fs, batch, steps) -> str:
  ref = steps.index(50) if 50 in steps else 0  # the growth column: T_max against T=50
  head = ("| configuration | " + " | ".join(f"T={t} peak (live)" for t in steps) +
          f" | peak T={steps[-1]} / T={steps[ref]} | MiB per step |")
  lines = [head, "|---|" + "---:|" * (len(steps) + 2)]
  for label, engine, remat, chunk in CONFIGS:
    res = [_ours("compile", fs, t, batch, engine, remat, chunk) for t in steps]
    cells = [f"{r['peak']:.2f} ({r['live']:.2f})" for r in res]
    ratio = res[-1]["peak"] / res[ref]["peak"]
    per_step = _slope(steps, [r["peak"] * 1024 for r in res])
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}x | {per_step:.1f} |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


def rss_table(fs, batch, steps) -> str:
  rows = []
  torch_rss = []
  for t in steps:
    out = _child([os.path.join("benchmarks", "torch_baseline.py"), "--mode", "train", "--fs",
                  str(fs), "--steps", str(t), "--batch", str(batch), "--iters", "1",
                  "--warmup", "1"])
    torch_rss.append(out["peak_rss_mib"])
  rows.append(("pytorch baseline (autograd through all steps)", torch_rss))
  for label, engine, remat, chunk in [("jax parallel, none", "parallel", "none", 0),
                                      ("jax parallel, stream (5)", "parallel", "stream", 5)]:
    rows.append((label, [_ours("rss", fs, t, batch, engine, remat, chunk)["peak_rss_mib"]
                         for t in steps]))
  lines = ["| process | " + " | ".join(f"T={t}" for t in steps) + " | MiB per step |",
           "|---|" + "---:|" * (len(steps) + 1)]
  for label, values in rows:
    lines.append(f"| {label} | " + " | ".join(f"{v:.0f}" for v in values) +
                 f" | {_slope(steps, values):.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fs", type=float, default=4.0, help="feature scale of part 1")
  p.add_argument("--batch", type=int, default=32, help="images per batch (both parts)")
  p.add_argument("--steps", default="10,50,100,200", help="time steps T of part 1")
  p.add_argument("--rss_fs", type=float, default=0.25, help="feature scale of part 2")
  p.add_argument("--rss_steps", default="5,10,20", help="time steps T of part 2")
  p.add_argument("--skip_rss", action="store_true", help="part 1 only")
  p.add_argument("--child", choices=("compile", "rss"), help=argparse.SUPPRESS)
  p.add_argument("--t", type=int, help=argparse.SUPPRESS)
  p.add_argument("--engine", help=argparse.SUPPRESS)
  p.add_argument("--remat", help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps((child_compile if args.child == "compile" else child_rss)(args)))
    return

  steps = [int(t) for t in args.steps.split(",")]
  print(f"Part 1: XLA memory analysis of the train step (GiB), fs={args.fs}, batch "
        f"{args.batch}, float32, AdamW; peak = temp + argument + output, live = peak - aliased "
        "(donated) bytes\n", flush=True)
  part1 = compile_table(args.fs, args.batch, steps)
  print("\n" + part1)
  if not args.skip_rss:
    rss_steps = [int(t) for t in args.rss_steps.split(",")]
    print(f"\nPart 2: peak RSS of one process (MiB), one training step, fs={args.rss_fs}, batch "
          f"{args.batch}, float32\n", flush=True)
    print(rss_table(args.rss_fs, args.batch, rss_steps))


if __name__ == "__main__":
  main()
