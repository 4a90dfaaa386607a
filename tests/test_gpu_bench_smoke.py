"""The GPU side-by-side benchmark's pieces (benchmarks/compare.py, gpu.sh), checked on the CPU:
the model-FLOP count, a failing or slow child becoming a row instead of ending the run, and a
tiny run with both frameworks whose rows reach the .jsonl as they are measured."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import compare, torch_baseline
from bitnet_jax import models

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_flops_at_the_papers_setting():
  """fs=4, T=50, 32x32x3: about 725 GFLOP per trained image (the issue's figure)."""
  train = compare.model_flops(4, img_size=32, classes=10, steps=50, mode="train")
  assert train == pytest.approx(725e9, rel=0.03)
  assert train == 3 * 50 * 2 * 2_423_324_672  # MACs per step, summed by hand over the 6 layers
  assert compare.model_flops(4, steps=200, mode="eval") == pytest.approx(train / 3 * 4)


@pytest.mark.parametrize("variant,img_size", [("BITnet6", 32), ("BITnet6_v101", 32),
                                              ("BITnet6", 64)])
def test_forward_flops_match_the_torch_layers(variant, img_size):
  """`forward_flops` of our plan equals 2 x the MACs of torch_baseline's Conv2d/Linear layers,
  counted from the shapes they really produce on one image at one step."""
  fs, classes = 0.25, 7
  model = torch_baseline.build_model(fs, classes, img_size, variant)
  macs = []

  def hook(layer, inputs, output):
    if isinstance(layer, torch.nn.Conv2d):
      kh, kw = layer.kernel_size
      macs.append(output.numel() * layer.in_channels * kh * kw)  # batch 1
    else:
      macs.append(layer.in_features * layer.out_features)

  for layer in model.modules():
    if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
      layer.register_forward_hook(hook)
  images, _ = torch_baseline.synthetic_batch(1, classes, img_size)
  with torch.no_grad():
    model(images, 1)
  plan = models.create_module(variant, fs=fs, num_classes=classes, img_size=img_size).plan()
  assert len(macs) == 6
  assert compare.forward_flops(plan) == 2 * sum(macs)


def test_failed_timed_out_and_skipped_children_become_rows():
  spec = {"framework": "jax", "mode": "train", "steps": 2, "batch": 4, "dtype": "float32",
          "config": "x"}
  failed = compare._measure(spec, ["-c", "raise SystemExit('out of memory')"], 60)
  assert failed["error"] == "out of memory" and failed["mode"] == "train"
  slow = compare._measure(spec, ["-c", "import time; time.sleep(30)"], 1)
  assert slow["error"] == "timed out after 1 s"
  assert compare._measure(spec, ["-c", "pass"], 0.5)["skipped"] == "out of --budget"
  text = compare.table([failed, slow])
  assert text.count("| failed |") == 2


def test_targets_compare_the_fastest_rows():
  rows = [dict(framework="jax", mode="train", steps=50, batch=128, dtype="bfloat16",
               images_per_s=500.0, peak_fraction=0.55),
          dict(framework="jax", mode="train", steps=50, batch=128, dtype="float32",
               images_per_s=200.0, peak_fraction=0.2),
          dict(framework="pytorch", mode="train", steps=50, batch=128, dtype="bfloat16",
               images_per_s=90.0),
          dict(framework="pytorch", mode="train", steps=50, batch=128, dtype="float32",
               images_per_s=50.0)]
  lines = compare.targets(rows)
  assert lines[0].endswith("= 5.56x (target >= 5x: met)")
  assert lines[1].endswith("at 55.0 % of the matmul rate (target >= 50 %: met)")
  assert compare._speedups(rows, rows[1]) == (4.0, 200.0 / 90.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_torch_baseline_says_when_there_is_no_cuda():
  with pytest.raises(SystemExit):
    torch_baseline.main(["--device", "cuda"])


def test_tiny_run_writes_rows_of_both_frameworks_as_it_goes(tmp_path):
  """compare.py as gpu.sh calls it (PyTorch in two dtypes, a matmul probe), at a tiny size."""
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.compare", "--smoke", "--batch", "4", "--train_steps",
       "2", "--dtypes", "float32", "--synapses", "dense", "--torch_dtypes", "float32,bfloat16",
       "--compile_steps", "0", "--matmul_size", "64", "--budget", "300", "--json", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert [r["record"] for r in records[:2]] == ["matmul", "weights"]
  assert records[0]["tflops"] > 0 and records[1]["forward_flops"] > 0
  rows = [r for r in records if r["record"] == "row"]
  assert sorted((r["framework"], r["mode"], r["dtype"]) for r in rows) == [
      ("jax", "eval", "float32"), ("jax", "train", "float32"),
      ("pytorch", "eval", "bfloat16"), ("pytorch", "eval", "float32"),
      ("pytorch", "train", "bfloat16"), ("pytorch", "train", "float32")]
  assert all(r["images_per_s"] > 0 and r["model_tflops"] > 0 and r["peak_fraction"] > 0
             for r in rows)
  assert len(json.loads(out.read_text())["rows"]) == len(rows)
  assert "| train | 2 | 4 | pytorch | release structure, autograd through all steps, cpu | " \
         "bfloat16 autocast |" in proc.stdout
