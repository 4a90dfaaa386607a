"""Quickstart: a small BITnet on real images (a 6,000-image Fashion-MNIST subset shipped in
data/), on a 2-core CPU with no network and nothing to download.

  python train.py --config configs/quickstart.py

Expected: (filled in from a measured run)
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.data_dir = "data/fashion_mnist_subset"  # 6,000 train / 1,000 test images, IDX format
  c.fs = 0.25                     # channels 16, 32, 64, 128
  c.time_steps = 4
  c.eval_time_steps = 8
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_epochs = 4
  c.learning_rate = 2e-3
  c.warmup_epochs = 0.25
  c.log_every = 20
  return c
