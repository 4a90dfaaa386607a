"""Where does the clip window block the gradient? A diagnostic of trained study runs.

  python docs/study/diagnose_window.py base loss_xent [--n 1000]

bddi's backward passes gradient to a layer's synaptic output `pred` only inside the clip window
0 <= pred <= 1 (neuron.py). For each run (its last checkpoint in /tmp/bitnet_study/<name>) this
steps the network for the run's T on the first n test images, with the same per-step loop as the
release, and reports per layer the share of (neuron, image, step) with pred > 1 ("saturated":
fires every step, no gradient) and pred < 0 ("silent": no gradient), and for the output layer
how many classes fire at every step (count = T) per image, and which output classes never fire
on any of the n images ("dead" classes: pred < 0 everywhere, so they get no gradient), with the
per-class recall of the count argmax. Writes diagnostics/window_<name>.json.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import run_study  # pylint: disable=wrong-import-position
from bitnet_jax import checkpointing, data, models, neuron, run_config  # pylint: disable=wrong-import-position


def diagnose(name: str, n: int) -> dict:
  _, overrides = run_study.RUNS[name]
  config = run_study.make_config(overrides)
  config.max_eval_examples = n
  config.eval_batch_size = 100
  config.update(compute_dtype="float32", matmul_precision="highest", synapses="dense",
                remat="none")  # the study's settings (before `auto`)
  config, _ = run_config.resolve(config)
  info = run_config.dataset_info(config)
  module = run_config.make_module(config, info)
  params, _ = checkpointing.load_params(os.path.join(run_study.WORKROOT, name), "latest")
  steps = config.time_steps

  @jax.jit
  def stats(images):
    x0 = data.normalize(images, info.mean, info.std)
    plan = module.plan()
    states = [jnp.zeros((x0.shape[0],) + s.shape) for s in plan]
    above = [0.0] * len(plan)
    below = [0.0] * len(plan)
    counts = 0.0
    for _ in range(steps):
      x = x0
      for i, spec in enumerate(plan):
        pred = module.apply({"params": params}, spec.name, x, method=module.synapse)
        above[i] += jnp.mean(pred > 1)
        below[i] += jnp.mean(pred < 0)
        spike, states[i] = neuron.bddi(states[i], pred)
        x = neuron.maxpool(spike) if spec.pool else spike
      counts = counts + x
    return (jnp.stack(above) / steps, jnp.stack(below) / steps,
            jnp.sum(counts == steps, -1), counts)  # (6,), (6,), (B,) classes always on, (B, K)

  above, below, always_on, counts, labels = [], [], [], [], []
  for batch in run_config.eval_iter(config, info):
    k = int(batch["mask"].sum())
    a, b, on, c = stats(batch["image"])
    above.append(np.asarray(a) * k)
    below.append(np.asarray(b) * k)
    always_on.append(np.asarray(on)[:k])
    counts.append(np.asarray(c)[:k])
    labels.append(batch["label"][:k])
  always_on = np.concatenate(always_on)
  counts, labels = np.concatenate(counts), np.concatenate(labels)
  pred = counts.argmax(-1)
  recall = [float(np.mean(pred[labels == k] == k)) for k in range(counts.shape[-1])]
  out = {
      "name": name, "n": n, "time_steps": steps,
      "pct_pred_above_1": [float(v) for v in 100 * np.sum(above, 0) / n],
      "pct_pred_below_0": [float(v) for v in 100 * np.sum(below, 0) / n],
      "output_classes_always_on_mean": float(always_on.mean()),
      "pct_images_with_2plus_classes_always_on": float(100 * np.mean(always_on >= 2)),
      "never_firing_classes": [int(k) for k in np.flatnonzero(counts.max(0) == 0)],
      "recall_per_class": recall,
  }
  with open(os.path.join(HERE, "diagnostics", f"window_{name}.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def main(argv):
  n = 1000
  if "--n" in argv:
    n = int(argv[argv.index("--n") + 1])
    argv = [a for a in argv if a not in ("--n", str(n))]
  print("| run | T | % pred > 1 (saturated), layers 1-6 | % pred < 0 (silent), layers 1-6 | "
        "classes always on / image | images with >= 2 always on | output classes never firing |")
  print("|---|---:|---|---|---:|---:|---|")
  for name in argv:
    r = diagnose(name, n)
    fmt = lambda v: " / ".join(f"{x:.1f}" for x in v)
    print(f"| {name} | {r['time_steps']} | {fmt(r['pct_pred_above_1'])} | "
          f"{fmt(r['pct_pred_below_0'])} | {r['output_classes_always_on_mean']:.2f} | "
          f"{r['pct_images_with_2plus_classes_always_on']:.1f} % | "
          f"{r['never_firing_classes'] or 'none'} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
