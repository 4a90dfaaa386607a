"""PNG plots: a training run's curves, and accuracy against inference steps.

  python -m bitnet_jax.cli.plots workdirs/fashion_mnist        # writes WORKDIR/training.png
  python -m bitnet_jax.cli.plots WORKDIR --out curve.png --title "Fashion-MNIST, fs 0.25, T=8"
"""

import json
import os


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (as the trainer writes them)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}: expected a training workdir")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training(rows: list[dict], path: str, title: str = ""):
  """Saves a PNG: training loss (left) and training / test top-1 (right) against the step."""
  train = [r for r in rows if r["kind"] == "train"]
  test = [r for r in rows if r["kind"] == "eval"]
  if not train:
    raise ValueError("no training rows in the metrics: nothing to plot")
  plt = _pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = [r["step"] for r in train]
  ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8)
  ax_loss.set_xlabel("optimizer step")
  ax_loss.set_ylabel("training loss (window mean)")
  ax_loss.grid(alpha=0.3)
  ax_acc.plot(steps, [100 * r["accuracy"] for r in train], lw=0.8, label="training batches")
  if test:
    ax_acc.plot([r["step"] for r in test], [100 * r["top1"] for r in test], "o-",
                label=f"test top-1 ({test[-1]['n']} images, T={test[-1]['time_steps']})")
    last = test[-1]
    ax_acc.annotate(f"{100 * last['top1']:.2f} %", (last["step"], 100 * last["top1"]),
                    textcoords="offset points", xytext=(-40, 8))
  ax_acc.set_xlabel("optimizer step")
  ax_acc.set_ylabel("top-1 (%)")
  ax_acc.grid(alpha=0.3)
  ax_acc.legend(loc="lower right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_sweep(result: dict, path: str, title: str = ""):
  """Saves a PNG of top-1 accuracy against the number of time steps."""
  plt = _pyplot()
  steps, acc = zip(*sorted(result["sweep_top1"].items()))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(steps, [100 * a for a in acc], "o-")
  ax.set_xlabel("time steps at inference")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(title or f"{result['dataset']} ({result['n']} test images)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
