"""BITnet6 (fs=4) on Tiny-ImageNet-200 (64x64, an extra maxpool after the first layer).

  python train.py --config configs/tiny_imagenet.py --config.data_dir=/path/to/tiny-imagenet-200

Trained with 50 time steps, evaluated with 200. Expected top-1: 59.10 % at T=200 (the seed's
evaluation of the release's weights); our recipe is not yet verified at this size. Sized for one
modern GPU/TPU (31.9 M parameters). Tiny-ImageNet is not in TFDS: extract the standard archive
and point data_dir at it (see README).
Its ReLU twin (the seed's Baseline; no number in the seed) trains with
  python -m bitnet_jax.cli.twin --config configs/tiny_imagenet.py
Neither has been run at this size here (no GPU). On Fashion-MNIST this recipe trails its twin by
2.0 points at a fixed budget and none of seven variants did better (docs/gap_study.md).
"""

from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.dataset = "tiny_imagenet"
  c.data_dir = ""       # required: the extracted tiny-imagenet-200/ folder
  c.eval_time_steps = 200
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_epochs = 100
  return c
