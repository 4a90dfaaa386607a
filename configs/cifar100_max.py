"""BITnet6 Max (fs=5) on CIFAR-100: trained with 50 time steps, evaluated with 210.

  python train.py --config configs/cifar100_max.py --workdir workdirs/cifar100_max

Expected top-1: 77.15 % at T=210 (the seed's evaluation of the release's weights); our recipe is
not yet verified at this size. Sized for one modern GPU/TPU (43.7 M parameters).
"""

from configs import cifar100


def get_config():
  c = cifar100.get_config()
  c.fs = 5.0
  c.eval_time_steps = 210
  return c
