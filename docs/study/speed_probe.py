"""Training speed of candidate full-Fashion-MNIST configs (for configs/fashion_mnist.py's estimate).

  python docs/study/speed_probe.py           # writes docs/study/diagnostics/speed_probe.json
  python docs/study/speed_probe.py --steps 60 --log_every 15 --out speed_probe_2.json \
      fs0.25_T8 fs0.25_T8_B64 fs0.25_T4 fs0.5_T4_B64      # the full-data scouting's probe

Trains each candidate for 80 optimizer steps (batch 32) on the full training split and reports
the median images/s over the 20-step log windows after the first (which includes compilation),
plus the whole probe's wall and CPU seconds (init, compilation, 80 steps, a 100-image eval). The machine was shared
with other jobs while this ran (its load average is recorded): wall-clock speeds are lower bounds
of an unshared 2-core machine's.
"""

import json
import os
import resource
import shutil
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

from configs import fashion_mnist  # pylint: disable=wrong-import-position

CANDIDATES = {
    "fs0.25_T8": {"fs": 0.25, "time_steps": 8},
    "fs0.5_T8": {"fs": 0.5, "time_steps": 8},
    "fs0.25_T8_B64": {"fs": 0.25, "time_steps": 8, "batch_size": 64},
    "fs0.25_T4": {"fs": 0.25, "time_steps": 4},
    "fs0.5_T4_B64": {"fs": 0.5, "time_steps": 4, "batch_size": 64},
}


def cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main():
  import argparse  # pylint: disable=import-outside-toplevel
  from bitnet_jax import trainer  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser()
  p.add_argument("names", nargs="*", default=["fs0.25_T8", "fs0.5_T8"], choices=CANDIDATES)
  p.add_argument("--steps", type=int, default=80)
  p.add_argument("--log_every", type=int, default=20)
  p.add_argument("--out", default="speed_probe.json")
  args = p.parse_args()
  out = {}
  for name in args.names:
    overrides = CANDIDATES[name]
    config = fashion_mnist.get_config()
    config.update(overrides)
    config.update({"max_train_steps": args.steps, "log_every": args.log_every,
                   "max_eval_examples": 100,
                   "eval_time_steps": 1})
    workdir = f"/tmp/bitnet_speed/{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu()
    trainer.train_and_evaluate(config, workdir)
    wall, cpu_s = time.perf_counter() - t0, cpu() - c0
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    speeds = [r["images_per_s"] for r in rows if r["kind"] == "train"][1:]
    out[name] = {"overrides": overrides, "images_per_s_windows": speeds,
                 "images_per_s": statistics.median(speeds), "wall_s": wall, "cpu_s": cpu_s,
                 "load_avg": os.getloadavg()}
    print(name, out[name], flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
  with open(os.path.join(ROOT, "docs", "study", "diagnostics", args.out), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
