"""Prints the gap study's tables (Markdown) from docs/gap_study/results/*.json.

  python docs/gap_study/make_report.py

Every BITnet run is set beside the ReLU twin's seeds at the same budget (training images and
epochs; "hybrid" counts its twin epoch and its BITnet epoch).
"""

import glob
import json
import os
import statistics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def budget(r) -> tuple[int, int]:
  """(training images, epochs) of a run."""
  o = r["overrides"]
  epochs = 2 if r.get("patch") == "pre:hybrid" else o.get("num_epochs", r["base"]["num_epochs"])
  return o.get("max_train_examples", r["base"]["max_train_examples"]), epochs


def main():
  runs = []
  for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  order = {r["name"]: i for i, r in enumerate(runs)}
  for key in sorted({budget(r) for r in runs}, key=lambda k: -k[0]):
    group = [r for r in runs if budget(r) == key]
    twins = [r["test_top1"] for r in group if r["overrides"].get("neuron") == "relu"]
    twin = statistics.mean(twins) if twins else None
    print(f"\n### {key[0]:,} training images, {key[1]} epochs\n")
    if twins:
      print(f"ReLU twin, {len(twins)} seeds: " + ", ".join(f"{100 * t:.2f}" for t in twins)
            + f" % (mean {100 * twin:.2f} %)\n")
    print("| run | change | test top-1 | train acc (last 150 steps) | vs twin mean | CPU min |")
    print("|---|---|---:|---:|---:|---:|")
    for r in sorted(group, key=lambda r: (r["overrides"].get("neuron") != "relu",
                                          order[r["name"]])):
      drop = ("seed", "neuron", "max_train_examples", "num_epochs")
      change = ", ".join(f"{k}={v}" for k, v in r["overrides"].items() if k not in drop)
      change = ", ".join(filter(None, [r.get("patch"), change])) or "(baseline)"
      if r["overrides"].get("neuron") == "relu":
        change = "ReLU twin"
      vs = "" if twin is None else f"{100 * (r['test_top1'] - twin):+.2f}"
      print(f"| {r['name']} | {change}; seed {r['overrides'].get('seed', 0)} | "
            f"{100 * r['test_top1']:.2f} % | {100 * r['train_acc_end']:.1f} % | {vs} | "
            f"{r['cpu_s'] / 60:.1f} |")


if __name__ == "__main__":
  main()
