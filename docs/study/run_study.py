"""Fashion-MNIST study (issue 6, part 1): one factor at a time around a baseline, fixed budget.

  python docs/study/run_study.py                 # every run of RUNS not yet in results/
  python docs/study/run_study.py base tri        # only these runs
  python docs/study/run_study.py --list          # the runs and their config diffs

Each run trains `configs/quickstart.py` + BASE + its own overrides on the first 12,000 real
Fashion-MNIST training images for 2 epochs (750 optimizer steps of batch 32) and evaluates the
last parameters once, on all 10,000 test images, at T_eval = T_train. The run's workdir (orbax
checkpoints) goes to /tmp/bitnet_study/<name> and is kept there for the eval.py sweeps; only
docs/study/results/<name>.json (config diff, metrics, train curve, timing) is kept in the repo.
Runs are sequential (one process, one at a time) and a run whose JSON exists is skipped.

Timing: `images_per_s` is the median over the 50-step log windows after the first (the first
includes compilation); `wall_s` is the whole run (init, compile, train, checkpoints, final eval);
`cpu_s` is this process's user+system CPU time over the run. The machine (2 cores) was shared
with other jobs while these ran, so wall times and images/s are inflated and noisy.
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

from configs import quickstart  # pylint: disable=wrong-import-position

RESULTS = os.path.join(ROOT, "docs", "study", "results")
WORKROOT = "/tmp/bitnet_study"

# The baseline: quickstart.py (fs 0.25, T 4/4, ste, mse_rate, AdamW lr 2e-3 cosine, warm-up 0.25
# epoch, batch 32, weight decay 5e-4, clip 1.0, seed 0) on the real Fashion-MNIST files.
BASE = {
    "dataset": "fashion_mnist",
    "data_dir": "/usr/share/datasets/fashion-mnist",
    "max_train_examples": 12000,
    "max_eval_examples": -1,        # all 10,000 test images
    "num_epochs": 2,                # 2 x 375 = 750 optimizer steps
    "eval_every_epochs": 0,         # evaluate once, at the end (no choice on the test set)
    "log_every": 50,
}

# name -> (factor, overrides relative to BASE). T runs also set eval_time_steps = time_steps.
RUNS = {
    "base": ("baseline", {}),
    "base_seed1": ("noise", {"seed": 1}),
    "base_seed2": ("noise", {"seed": 2}),
    "sg_triangle": ("surrogate", {"surrogate": "triangle"}),
    "sg_sigmoid": ("surrogate", {"surrogate": "sigmoid"}),
    "sg_atan": ("surrogate", {"surrogate": "atan"}),
    "loss_xent": ("loss", {"loss": "xent_rate"}),
    "loss_xent_s30": ("loss", {"loss": "xent_rate", "logit_scale": 30.0}),
    "T8": ("time_steps", {"time_steps": 8, "eval_time_steps": 8}),
    "T16": ("time_steps", {"time_steps": 16, "eval_time_steps": 16}),
    "lr1e-3": ("learning_rate", {"learning_rate": 1e-3}),
    "lr3e-3": ("learning_rate", {"learning_rate": 3e-3}),
    "sgd_lr0.1": ("optimizer", {"optimizer": "sgd", "learning_rate": 0.1}),
}


def make_config(overrides: dict):
  config = quickstart.get_config()
  for key, value in {**BASE, **overrides}.items():
    if key not in config:
      raise KeyError(f"unknown config field {key!r}")
    config[key] = value
  return config


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run(name: str) -> dict:
  from bitnet_jax import trainer  # pylint: disable=import-outside-toplevel
  factor, overrides = RUNS[name]
  config = make_config(overrides)
  workdir = os.path.join(WORKROOT, name)
  shutil.rmtree(workdir, ignore_errors=True)  # never resume a stale run
  t0, c0 = time.perf_counter(), _cpu_seconds()
  result = trainer.train_and_evaluate(config, workdir)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if r["kind"] == "train"]
  speeds = [r["images_per_s"] for r in train[1:]]
  last = train[-1]
  summary = {
      "name": name, "factor": factor, "overrides": overrides, "base": BASE,
      "config": config.to_dict(),
      "test_top1": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"],
      "test_n": result["n"], "eval_time_steps": result["time_steps"],
      "tie_rate": result["tie_rate"], "sparsity": result["sparsity"],
      "train_loss_end": last["loss"], "train_acc_end": last["accuracy"],
      "train_output_rate_end": last["output_rate"], "steps": last["step"],
      "train_curve": [{k: r[k] for k in ("step", "loss", "accuracy", "output_rate")}
                      for r in train],
      "images_per_s": statistics.median(speeds) if speeds else None,
      "wall_s": wall, "cpu_s": cpu, "load_avg_end": os.getloadavg(),
      "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
      "workdir": workdir,
  }
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"== {name}: top-1 {100 * result['top1']:.2f}% | train loss {last['loss']:.4f} | "
        f"{summary['images_per_s']:.0f} img/s | wall {wall:.0f}s cpu {cpu:.0f}s", flush=True)
  return summary


def main(argv):
  if "--list" in argv:
    for name, (factor, overrides) in RUNS.items():
      print(f"{name:12s} {factor:14s} {overrides}")
    return
  names = [a for a in argv if not a.startswith("-")] or list(RUNS)
  for name in names:
    if name not in RUNS:
      raise SystemExit(f"unknown run {name!r}; --list shows them")
    if os.path.exists(os.path.join(RESULTS, f"{name}.json")) and "--force" not in argv:
      print(f"== {name}: done (results/{name}.json), skipped", flush=True)
      continue
    run(name)


if __name__ == "__main__":
  main(sys.argv[1:])
