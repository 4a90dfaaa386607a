"""bitnet_jax.plots: the training-curve PNG from a workdir's metrics.jsonl, and its errors; the
command `python -m bitnet_jax.cli.plots`."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_jax import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(tmp_path, rows):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(tmp_path)


def test_training_plot_from_metrics(tmp_path):
  rows = [{"step": s, "kind": "train", "accuracy": 0.1 + s / 1000, "loss": 1 / s,
           "output_rate": 0.1, "images_per_s": 90.0} for s in range(100, 600, 100)]
  rows.append({"step": 500, "kind": "eval", "n": 1000, "time_steps": 8, "top1": 0.61,
               "top5": 0.9, "loss": 0.02, "tie_rate": 0.01, "epoch": 1.0})
  workdir = _workdir(tmp_path, rows)
  plots.plot_training(plots.read_metrics(workdir), str(tmp_path / "training.png"), "test")
  assert (tmp_path / "training.png").stat().st_size > 1000
  assert len(plots.read_metrics(workdir)) == 6


def test_training_plot_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl in .*expected a training workdir"):
    plots.read_metrics(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="no training rows"):
    plots.plot_training([{"step": 1, "kind": "eval"}], str(tmp_path / "x.png"))


@pytest.mark.slow
def test_plots_command(tmp_path):
  workdir = _workdir(tmp_path, [{"step": s, "kind": "train", "accuracy": 0.5, "loss": 1 / s}
                                for s in (10, 20)])
  out = subprocess.run([sys.executable, "-m", "bitnet_jax.cli.plots", workdir, "--title", "t"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == os.path.join(workdir, "training.png")
  missing = subprocess.run([sys.executable, "-m", "bitnet_jax.cli.plots", str(tmp_path / "no")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert missing.stderr.startswith("error: no metrics.jsonl in "), missing.stderr
