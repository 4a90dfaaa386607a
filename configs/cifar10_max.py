"""BITnet6 Max (fs=5) on CIFAR-10: 50 time steps in training and evaluation.

  python train.py --config configs/cifar10_max.py --workdir workdirs/cifar10_max

Expected top-1: 94.62 % (the seed's evaluation of the release's weights, T=50); our recipe is
not yet verified at this size. Sized for one modern GPU/TPU (40.1 M parameters).
"""

from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.fs = 5.0
  return c
