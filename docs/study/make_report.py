"""Tables and plots of the Fashion-MNIST study from docs/study/results/*.json and sweeps/*.json.

  python docs/study/make_report.py      # prints the markdown tables, writes docs/study/*.png

Standard error of a top-1 accuracy p on n test images: sqrt(p (1 - p) / n).
"""

import glob
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run_study  # pylint: disable=wrong-import-position

FACTOR_ORDER = ["baseline", "noise", "surrogate", "loss", "time_steps", "learning_rate",
                "optimizer", "combined"]


def load_runs() -> list[dict]:
  runs = [json.load(open(p)) for p in glob.glob(os.path.join(HERE, "results", "*.json"))]
  runs = [r for r in runs if "factor" in r]  # not the diagnostics / speed probe files
  order = {name: i for i, name in enumerate(run_study.RUNS)}
  return sorted(runs, key=lambda r: (FACTOR_ORDER.index(r["factor"]), order.get(r["name"], 99)))


def se(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n)


def diff_str(overrides: dict) -> str:
  if not overrides:
    return "(baseline)"
  return ", ".join(f"`{k}={v}`" for k, v in overrides.items() if k != "eval_time_steps")


def runs_table(runs: list[dict]) -> str:
  base = next(r for r in runs if r["name"] == "base")
  head = ("| run | factor | config diff vs baseline | test top-1 (10k) ± SE | Δ vs base | "
          "top-5 | train loss (last 50 steps) | train acc (last 50) | out rate | ties | "
          "img/s | wall | CPU |")
  rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  rows = [head, rule]
  for r in runs:
    p, n = r["test_top1"], r["test_n"]
    delta = 100 * (p - base["test_top1"])
    rows.append(
        f"| {r['name']} | {r['factor']} | {diff_str(r['overrides'])} | "
        f"{100 * p:.2f} ± {100 * se(p, n):.2f} % | "
        f"{'—' if r['name'] == 'base' else f'{delta:+.2f}'} | {100 * r['test_top5']:.2f} % | "
        f"{r['train_loss_end']:.4f} | {100 * r['train_acc_end']:.1f} % | "
        f"{r['train_output_rate_end']:.3f} | {100 * r['tie_rate']:.1f} % | "
        f"{r['images_per_s']:.0f} | {r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min |")
  return "\n".join(rows)


def plot_top1(runs: list[dict], path: str, lo: float = 76.0, hi: float = 87.0):
  """Top-1 of every run with 95 % test-sampling CIs; the seed range of the baseline shaded."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  seeds = [100 * r["test_top1"] for r in runs if r["factor"] in ("baseline", "noise")]
  fig, ax = plt.subplots(figsize=(7, 0.38 * len(runs) + 1.4))
  ax.axvspan(min(seeds), max(seeds), color="gray", alpha=0.15,
             label=f"baseline, {len(seeds)} seeds: {min(seeds):.2f}-{max(seeds):.2f} %")
  ys = list(range(len(runs)))[::-1]
  for y, r in zip(ys, runs):
    p, n = r["test_top1"], r["test_n"]
    color = f"C{FACTOR_ORDER.index(r['factor'])}"
    if 100 * p < lo:  # off scale: write the value at the left edge
      ax.annotate(f"<- {100 * p:.2f} %", (lo, y), xytext=(3, -4), textcoords="offset points",
                  color=color)
      continue
    ax.errorbar(100 * p, y, xerr=196 * se(p, n), fmt="o", capsize=3, color=color)
  ax.set_xlim(lo, hi)
  ax.set_yticks(ys)
  ax.set_yticklabels([r["name"] for r in runs])
  ax.set_xlabel("test top-1 on 10,000 images (%); bars: 95 % CI of the test sampling only")
  ax.set_title("Fashion-MNIST, 750 steps of batch 32 (12k images x 2 epochs)")
  ax.grid(alpha=0.3, axis="x")
  ax.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(runs: list[dict], path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  groups = [("surrogate", ["base", "sg_triangle", "sg_sigmoid", "sg_atan"]),
            ("loss", ["base", "loss_xent", "loss_xent_s30"]),
            ("time steps", ["base", "T8", "T16"]),
            ("learning rate", ["base", "lr1e-3", "lr3e-3", "sgd_lr0.1"]),
            ("seed (noise)", ["base", "base_seed1", "base_seed2"])]
  by_name = {r["name"]: r for r in runs}
  fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), sharey=True)
  for ax, (title, names) in zip(axes, groups):
    for name in names:
      if name in by_name:
        curve = by_name[name]["train_curve"]
        ax.plot([c["step"] for c in curve], [100 * c["accuracy"] for c in curve], label=name)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("train top-1 over the last log window (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


SWEEP_ORDER = ["base_trained", "T8_trained", "T16_trained"]  # trained at T = 4, 8, 16
SWEEP_LABELS = {"base_trained": "trained at T=4 (base)", "T8_trained": "trained at T=8 (T8)",
                "T16_trained": "trained at T=16 (T16)"}


def load_sweeps() -> dict:
  names = [os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(HERE, "sweeps", "*.json"))]
  names.sort(key=lambda n: (SWEEP_ORDER.index(n) if n in SWEEP_ORDER else len(SWEEP_ORDER), n))
  return {n: json.load(open(os.path.join(HERE, "sweeps", f"{n}.json"))) for n in names}


def sweep_table(sweeps: dict) -> str:
  if not sweeps:
    return ""
  steps = sorted({int(t) for s in sweeps.values() for t in s["sweep_top1"]})
  head = "| model (trained at T) | test images | " + " | ".join(f"T={t}" for t in steps) + " |"
  rule = "|---|---:|" + "---:|" * len(steps)
  rows = [head, rule]
  for name, s in sweeps.items():
    acc = {int(t): a for t, a in s["sweep_top1"].items()}
    best = max(acc.values())
    cells = []
    for t in steps:
      if t in acc:
        cell = f"{100 * acc[t]:.2f}"
        cells.append(f"**{cell}**" if acc[t] == best else cell)
      else:
        cells.append("")
    rows.append(f"| {SWEEP_LABELS.get(name, name)} | {s['n']} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot_sweeps(sweeps: dict, path: str):
  if not sweeps:
    return
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, s in sweeps.items():
    steps, acc = zip(*sorted((int(t), a) for t, a in s["sweep_top1"].items()))
    n = s["n"]
    ax.errorbar(steps, [100 * a for a in acc], yerr=[100 * se(a, n) for a in acc], fmt="o-",
                capsize=2, label=f"{SWEEP_LABELS.get(name, name)}, {n} images")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("time steps at inference")
  ax.set_ylabel("test top-1 (%), bars ± 1 SE")
  ax.set_title("Accuracy vs inference steps, Fashion-MNIST (750 training steps)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  runs = load_runs()
  print(runs_table(runs))
  plot_top1(runs, os.path.join(HERE, "top1.png"))
  plot_curves(runs, os.path.join(HERE, "train_curves.png"))
  sweeps = load_sweeps()
  if sweeps:
    print()
    print(sweep_table(sweeps))
    plot_sweeps(sweeps, os.path.join(HERE, "sweep_all.png"))


if __name__ == "__main__":
  main()
