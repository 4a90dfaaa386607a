"""Quickstart: a small BITnet on synthetic data, on a 2-core CPU, no network.

  python train.py --config configs/quickstart.py

Expected: (filled in from a measured run)
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "synthetic"
  c.fs = 0.25
  c.time_steps = 8
  c.eval_time_steps = 8
  c.batch_size = 32
  c.num_epochs = 2
  c.learning_rate = 2e-3
  c.log_every = 8
  return c
