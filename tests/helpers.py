"""Helpers shared by the tests: the repository root, the tiny run's flags and config, and
parameters that make a fresh init fire like a trained network."""

import os

import jax

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny run: fs=0.125, T=2, 64 synthetic training images in batches of 8 (8 steps per epoch).
TINY = ["--config.dataset=synthetic", "--config.fs=0.125", "--config.time_steps=2",
        "--config.eval_time_steps=2", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.synthetic_num_train=64", "--config.synthetic_num_test=20",
        "--config.num_epochs=2", "--config.log_every=2", "--config.checkpoint_every=2",
        "--config.warmup_epochs=0.5", "--config.learning_rate=0.005"]


def tiny_config(**overrides):
  """configs/default.py with the `TINY` flags applied, then `overrides`."""
  c = default.get_config()
  for flag in TINY:
    key, value = flag[len("--config."):].split("=")
    c[key] = type(c[key])(value)
  c.update(overrides)
  return c


def firing_params(params, gain=2.0):
  """Scales a fresh init so that every layer fires, like a trained network (sparse, not silent)."""
  return jax.tree_util.tree_map(lambda a: a * gain, params)
