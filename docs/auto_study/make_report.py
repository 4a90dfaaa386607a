"""Prints the auto study's table (Markdown) from docs/auto_study/results/*.json.

  python docs/auto_study/make_report.py

One row per setting: test top-1 of each seed, the mean and the spread (max - min over seeds), the
difference of means to `f32` (float32 at `highest`), the same difference seed by seed (the seed
fixes the initialisation and the data order, so the pairs share them), and CPU minutes per run.
"""

import glob
import json
import os
import statistics

from run_auto import RESULTS, SETTINGS


def main():
  runs = {}
  for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    runs.setdefault(r["name"].rsplit("_s", 1)[0], []).append(r)
  reference = statistics.mean(r["test_top1"] for r in runs.get("f32", [{"test_top1": 0}]))
  by_seed = {r["overrides"]["seed"]: 100 * r["test_top1"] for r in runs.get("f32", [])}
  print("| setting | seeds: test top-1 % | mean % | spread (max - min) | mean - f32 | "
        "per seed - f32 | CPU min / run |")
  print("|---|---|---:|---:|---:|---|---:|")
  for name, values in SETTINGS.items():
    group = sorted(runs.get(name, []), key=lambda r: r["overrides"]["seed"])
    if not group:
      continue
    top1 = [100 * r["test_top1"] for r in group]
    seeds = ", ".join(f"s{r['overrides']['seed']} {t:.2f}" for r, t in zip(group, top1))
    label = ", ".join(f"{k}={v}" for k, v in values.items())
    cpu = statistics.mean(r["cpu_s"] for r in group) / 60
    paired = ", ".join(f"{t - by_seed[r['overrides']['seed']]:+.2f}" for r, t in zip(group, top1)
                       if r["overrides"]["seed"] in by_seed)
    print(f"| `{name}`: {label} | {seeds} | {statistics.mean(top1):.2f} | "
          f"{max(top1) - min(top1):.2f} | {statistics.mean(top1) - 100 * reference:+.2f} | "
          f"{paired} | {cpu:.1f} |")


if __name__ == "__main__":
  main()
