"""Gap study (issue 15): what closes the distance between BITnet and its ReLU twin on Fashion-MNIST?

  python docs/gap_study/run_gap.py NAME [NAME ...]     # runs not yet in results/, one process each
  python docs/gap_study/run_gap.py --list              # runs and their overrides

Screening budget, the same for every run and for the twin: `configs/fashion_mnist.py` (fs 0.25,
T = 8, ste, mse_rate, AdamW 2e-3 cosine, batch 32) on the first 12,000 real training images for
2 epochs (750 optimizer steps), evaluated once at the end on all 10,000 test images (last
parameters; nothing is chosen on the test set). Twin runs set `neuron = "relu"` (the seed's
Baseline: the same layers with ReLU and softmax cross-entropy) and are otherwise identical.

A run whose variant is not (yet) a config field patches the library inside its own process
(`PATCHES`), so every run is a fresh process and patches never leak between runs. Results:
docs/gap_study/results/<name>.json (top-1, train curve, CPU time).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RESULTS = os.path.join(ROOT, "docs", "gap_study", "results")
WORKROOT = "/tmp/bitnet_gap"

# The compute settings of the study's runs (the defaults before `auto`, 2026-12-02), pinned so
# that the script reproduces what it measured; the auto study (docs/auto_study/) overrides them.
BASE = {"max_train_examples": 12000, "num_epochs": 2, "eval_every_epochs": 0, "log_every": 50,
        "compute_dtype": "float32", "matmul_precision": "highest", "synapses": "dense",
        "remat": "none"}

# name -> (overrides relative to configs/fashion_mnist.py + BASE, patch name or None)
RUNS = {
    "twin_s0": ({"neuron": "relu", "seed": 0}, None),
    "twin_s1": ({"neuron": "relu", "seed": 1}, None),
    "twin_s2": ({"neuron": "relu", "seed": 2}, None),
    "base_s0": ({"seed": 0}, None),
    "base_s1": ({"seed": 1}, None),
    "inward_s0": ({"seed": 0}, "inward"),
    "inward_s1": ({"seed": 1}, "inward"),
    "b128_s0": ({"seed": 0, "batch_size": 128, "learning_rate": 4e-3}, None),
    "upper_s0": ({"seed": 0}, "upper"),
    "upper_s1": ({"seed": 1}, "upper"),
    "upper_inward_s0": ({"seed": 0}, "upper_inward"),
    # Start from a ReLU twin balanced by data (`config.init_from`, twin.balance). The twin is
    # trained first, in the same process, with the overrides in PRE; its steps count in the
    # budget: "balinit" trains it for 1 step at lr 1e-9 (a balanced *random* init), "hybrid"
    # for the first of the 2 epochs, then the BITnet for the second.
    "balinit_s0": ({"seed": 0}, "pre:balinit"),
    "hybrid_s0": ({"seed": 0, "num_epochs": 1, "learning_rate": 5e-4}, "pre:hybrid"),
    # Cross-entropy on rates at a low temperature (the first study lost 19 points at 10).
    "xent3_s0": ({"seed": 0, "loss": "xent_rate", "logit_scale": 3.0}, None),
    # Time-step curriculum: the first epoch at T = 4 (about half the compute), the second at 8,
    # in the same workdir. The first call's schedule is cut at 375 steps (`max_train_steps`, so
    # its cosine reaches 0 there); the second resumes at step 375 of the 2-epoch schedule, i.e. a
    # warm restart at half the peak learning rate.
    "curric_s0": ({"seed": 0}, "curriculum"),
    # The data-limited regime, where a twin can overfit: 3,000 images for 16 epochs (1,488 steps).
    "small_twin_s0": ({"neuron": "relu", "seed": 0, "max_train_examples": 3000,
                       "num_epochs": 16}, None),
    "small_twin_s1": ({"neuron": "relu", "seed": 1, "max_train_examples": 3000,
                       "num_epochs": 16}, None),
    "small_base_s0": ({"seed": 0, "max_train_examples": 3000, "num_epochs": 16}, None),
    "small_base_s1": ({"seed": 1, "max_train_examples": 3000, "num_epochs": 16}, None),
    # More so: 1,000 images for 48 epochs (1,488 steps).
    "tiny_twin_s0": ({"neuron": "relu", "seed": 0, "max_train_examples": 1000,
                      "num_epochs": 48}, None),
    "tiny_twin_s1": ({"neuron": "relu", "seed": 1, "max_train_examples": 1000,
                      "num_epochs": 48}, None),
    "tiny_base_s0": ({"seed": 0, "max_train_examples": 1000, "num_epochs": 48}, None),
}


def _patch_clip_gradient(passes):
  """Replaces the `ste` neuron's backward: outside the clip window [0, 1] the gradient g passes
  where `passes(side, g)` (side: +1 above the window, -1 below it); inside, it always passes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bitnet_jax import neuron  # pylint: disable=import-outside-toplevel

  def build(surrogate):
    assert surrogate.name == "ste" and not surrogate.leak, surrogate

    @jax.custom_vjp
    def fire(state, pred):
      spike, new_state, _ = neuron._forward(state, pred)  # pylint: disable=protected-access
      return spike, new_state

    def fwd(state, pred):
      spike, new_state, _ = neuron._forward(state, pred)  # pylint: disable=protected-access
      side = (pred > 1).astype(jnp.int8) - (pred < 0).astype(jnp.int8)
      return (spike, new_state), (side,)

    def bwd(residual, cotangents):
      (side,), (g, _) = residual, cotangents
      return g, jnp.where((side == 0) | passes(side, g), g, 0).astype(g.dtype)

    fire.defvjp(fwd, bwd)
    return fire

  neuron._bddi_fn = build  # pylint: disable=protected-access


# Outside the window, the gradient g passes (gradient descent moves pred by -g):
PATCHES = {
    # inward: only where it pulls pred back inside (above: g > 0 lowers it; below: g < 0).
    "inward": lambda: _patch_clip_gradient(lambda side, g: ((side > 0) & (g > 0))
                                           | ((side < 0) & (g < 0))),
    # upper: ReLU's rule, 1[pred >= 0]: above the window always, below never.
    "upper": lambda: _patch_clip_gradient(lambda side, g: side > 0),
    # upper_inward: above the window, only gradients that lower pred.
    "upper_inward": lambda: _patch_clip_gradient(lambda side, g: (side > 0) & (g > 0)),
}

PRE = {
    "balinit": {"neuron": "relu", "max_train_steps": 1, "learning_rate": 1e-9},
    "hybrid": {"neuron": "relu", "num_epochs": 1},
}


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run(name: str, runs: dict = RUNS, results: str = RESULTS) -> dict:
  """Trains run `name` of `runs` in this process; writes its summary to `results`/<name>.json."""
  sys.path.insert(0, ROOT)
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  overrides, patch = runs[name]
  if patch in PATCHES:
    PATCHES[patch]()
  from bitnet_jax import trainer  # pylint: disable=import-outside-toplevel

  def make_config(overrides):
    config = fashion_mnist.get_config()
    for key, value in {**BASE, **overrides}.items():
      config[key] = value
    return config

  config = make_config(overrides)
  workdir = os.path.join(WORKROOT, name)
  shutil.rmtree(workdir, ignore_errors=True)
  t0, c0 = time.perf_counter(), _cpu_seconds()
  if patch and patch.startswith("pre:"):
    pre = {"seed": overrides.get("seed", 0), **PRE[patch[4:]]}
    twin_dir = workdir + "_twin"
    shutil.rmtree(twin_dir, ignore_errors=True)
    trainer.train_and_evaluate(make_config(pre), twin_dir)
    config.init_from = twin_dir
  if patch == "curriculum":
    first = make_config({**overrides, "time_steps": 4, "eval_time_steps": 4,
                         "max_train_steps": 375})
    trainer.train_and_evaluate(first, workdir)
  result = trainer.train_and_evaluate(config, workdir)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if r["kind"] == "train"]
  summary = {
      "name": name, "overrides": overrides, "patch": patch, "base": BASE,
      "test_top1": result["top1"], "test_n": result["n"], "tie_rate": result.get("tie_rate"),
      "train_acc_end": sum(r["accuracy"] for r in train[-3:]) / len(train[-3:]),
      "train_curve": [{k: r.get(k) for k in ("step", "loss", "accuracy")} for r in train],
      "wall_s": wall, "cpu_s": cpu, "load_avg_end": os.getloadavg(),
      "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"== {name}: top-1 {100 * result['top1']:.2f}% | train acc (last 150 steps) "
        f"{100 * summary['train_acc_end']:.1f}% | wall {wall:.0f}s cpu {cpu:.0f}s", flush=True)
  return summary


def main(argv, runs: dict = RUNS, results: str = RESULTS, script: str = __file__):
  """Runs the named runs of `runs` (all when none is named) not yet in `results`, each in a
  fresh process of `script` (which calls this with --child NAME)."""
  if "--list" in argv:
    for name, (overrides, patch) in runs.items():
      print(f"{name:12s} {overrides} {patch or ''}")
    return
  if "--child" in argv:
    run(argv[argv.index("--child") + 1], runs, results)
    return
  for name in [a for a in argv if not a.startswith("-")] or list(runs):
    if name not in runs:
      raise SystemExit(f"unknown run {name!r}; --list shows them")
    if os.path.exists(os.path.join(results, f"{name}.json")):
      print(f"== {name}: done, skipped", flush=True)
      continue
    subprocess.run([sys.executable, script, "--child", name], check=True)


if __name__ == "__main__":
  main(sys.argv[1:])
