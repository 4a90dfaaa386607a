"""Quickstart: a small BITnet on real images (a 6,000-image Fashion-MNIST subset shipped in
data/), on a 2-core CPU with no network and nothing to download.

  python train.py --config configs/quickstart.py

Expected: top-1 80.3 % on the subset's 1,000 test images (T=4) after 4 epochs (748 optimizer
steps), in 1 min 11 s on an idle 2-core CPU with the defaults (`auto`: sparse synapses,
remat=stream; 2026-12-04). With the dense synapses of 2026-11-28: 80.7 %, and evaluating that
checkpoint at other step counts (python eval.py --config configs/quickstart.py
--workdir workdirs/quickstart --sweep 1,2,4,8,16,32): 45.5, 73.5, 80.7, 80.3, 78.4, 74.6 %:
a model trained with few steps is best at its training step count.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.data_dir = "data/fashion_mnist_subset"  # 6,000 train / 1,000 test images, IDX format
  c.fs = 0.25                     # channels 16, 32, 64, 128
  c.time_steps = 4
  c.eval_time_steps = 4
  c.batch_size = 32
  c.eval_batch_size = 100
  c.num_epochs = 4
  c.learning_rate = 2e-3
  c.warmup_epochs = 0.25
  c.log_every = 20
  return c
