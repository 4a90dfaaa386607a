"""Compile time of the evaluation step against T: padded chunks keep it flat.

Compiles the real evaluation step (`evaluate.make_eval_step`, the parallel engine) at several T
and prints a markdown table of seconds (trace + lower + XLA compile; nothing runs), per synapse
kind and chunk setting, with the ratio of the longest T to the shortest. Each compile runs in
its own process, so no cache of an earlier compile helps a later one.

    python -m benchmarks.compile_time                    # fs=1, batch 32, T=10,50,200: ~3 min
    python -m benchmarks.compile_time --chunks 10,25,0   # also chunks of 25, and one chunk of T

With `--chunks 10` (the evaluation default, `engines.EVAL_CHUNK`) every T > 10 compiles the same
10-step chunk in a loop, and T=10 that chunk without the loop; `0` (one chunk of all T steps,
the old default) compiles convolutions over T * batch images, a different program for each T.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> dict:
  """Compiles the eval step once for (synapses, T, chunk); returns the seconds it took."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bitnet_jax import evaluate, models  # pylint: disable=import-outside-toplevel

  module = models.create_module("BITnet6", fs=args.fs, num_classes=10,
                                sparse=args.synapse == "sparse")
  batch = {"image": np.zeros((args.batch, 32, 32, 3), np.uint8),
           "label": np.zeros((args.batch,), np.int32), "mask": np.ones((args.batch,), bool)}
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          np.zeros((1, 32, 32, 3), np.float32))["params"]
  step = evaluate.make_eval_step(module, time_steps=args.steps, mean=(0.5,) * 3, std=(0.25,) * 3,
                                 chunk=args.chunk)
  t0 = time.perf_counter()
  lowered = step.lower(params, batch)
  lower_s = time.perf_counter() - t0
  lowered.compile()
  total_s = time.perf_counter() - t0
  return {"compile_s": total_s, "lower_s": lower_s, "device": jax.devices()[0].platform}


def _run_child(args, synapses: str, steps: int, chunk: int) -> dict:
  argv = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--synapse", synapses,
          "--steps", str(steps), "--chunk", str(chunk), "--fs", str(args.fs), "--batch",
          str(args.batch)]
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                       check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _sparse_available() -> bool:
  out = subprocess.run([sys.executable, "-c", "from bitnet_jax.kernels import spike_conv; "
                        "print(spike_conv.available()[0])"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
  return out.stdout.strip() == "True"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fs", type=float, default=1.0, help="feature scale")
  p.add_argument("--batch", type=int, default=32, help="images per batch")
  p.add_argument("--steps_list", default="10,50,200", help="time steps T to compile at")
  p.add_argument("--chunks", default="10", help="eval chunk settings, comma separated (0 = one "
                 "chunk of all T steps)")
  p.add_argument("--synapses", default="dense,sparse", help="dense and/or sparse (CPU only)")
  p.add_argument("--repeats", type=int, default=1, help="compiles per cell (median)")
  p.add_argument("--timeout", type=float, default=900, help="seconds per child process")
  p.add_argument("--json", default="", help="also write the raw results here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--synapse", default="dense", help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, default=10, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(child(args)), flush=True)
    return None

  steps_list = [int(t) for t in args.steps_list.split(",")]
  chunks = [int(c) for c in args.chunks.split(",")]
  synapses = [s for s in args.synapses.split(",") if s]
  if "sparse" in synapses and not _sparse_available():
    print("sparse synapses unavailable here (spike_conv.available()): dense only")
    synapses.remove("sparse")
  rows = []
  for synapse in synapses:
    for chunk in chunks:
      seconds = {}
      for steps in steps_list:
        runs = [_run_child(args, synapse, steps, chunk) for _ in range(args.repeats)]
        seconds[steps] = statistics.median(r["compile_s"] for r in runs)
        print(json.dumps({"synapses": synapse, "chunk": chunk, "steps": steps, "runs": runs}),
              flush=True)
      rows.append({"synapses": synapse, "chunk": chunk, "seconds": seconds,
                   "device": runs[0]["device"]})

  lo, hi = steps_list[0], steps_list[-1]
  print(f"\nfs={args.fs}, batch {args.batch}, device {rows[0]['device']}, {os.cpu_count()} CPU "
        f"threads visible; seconds to trace, lower and compile the eval step, one process each"
        f" (median of {args.repeats})\n")
  print("| synapses | eval chunk | " + " | ".join(f"T={t} s" for t in steps_list) +
        f" | T={hi} / T={lo} |")
  print("|---|---:|" + "---:|" * (len(steps_list) + 1))
  for r in rows:
    s = r["seconds"]
    print(f"| {r['synapses']} | {r['chunk'] or 'one chunk of T'} | " +
          " | ".join(f"{s[t]:.2f}" for t in steps_list) + f" | {s[hi] / s[lo]:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
