"""The evidence for `auto` (issue 21): does each platform's `auto` setting train as well as float32
at `highest`?

  python docs/auto_study/run_auto.py [NAME ...]     # runs not yet in results/, one process each
  python docs/auto_study/run_auto.py --list         # runs and their overrides
  python docs/auto_study/make_report.py             # the table, with the seed spread

The gap study's budget and runner (docs/gap_study/run_gap.py): `configs/fashion_mnist.py` (fs 0.25,
T = 8, ste, mse_rate, AdamW 2e-3 cosine, batch 32) on the first 12,000 real training images for
2 epochs (750 optimizer steps), evaluated once at the end on all 10,000 test images. Each setting
is trained with the same seeds:

- `f32`: float32 at `highest`, dense synapses, remat=none: the defaults before `auto`, the
  reference;
- `cpu`: what `auto` resolves to on a CPU: float32, sparse synapses, remat=stream (exact: only
  the summation order differs, so this is a check);
- `gpu`: what `auto` resolves to on a GPU or TPU: bfloat16 synapses, remat=stream. XLA:CPU runs
  bfloat16 convolutions (inputs and outputs rounded to bfloat16, float32 accumulation), so its
  rounding is the GPU's, up to summation order.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gap_study"))
import run_gap  # noqa: E402  pylint: disable=wrong-import-position

RESULTS = os.path.join(HERE, "results")
SETTINGS = {
    "f32": {"compute_dtype": "float32", "matmul_precision": "highest", "synapses": "dense",
            "remat": "none"},
    "cpu": {"compute_dtype": "float32", "matmul_precision": "highest", "synapses": "sparse",
            "remat": "stream"},
    "gpu": {"compute_dtype": "bfloat16", "matmul_precision": "default", "synapses": "dense",
            "remat": "stream"},
}
SEEDS = (0, 1, 2)
RUNS = {f"{name}_s{seed}": ({**values, "seed": seed}, None)
        for seed in SEEDS for name, values in SETTINGS.items()}


if __name__ == "__main__":
  run_gap.main(sys.argv[1:], RUNS, RESULTS, __file__)
