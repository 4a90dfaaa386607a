"""Shared test setup: CPU only, seeded tiny models."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bitnet_jax  # noqa: E402
from tests.helpers import firing_params  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
  """fs=0.25, 10 classes, 32x32 RGB, parameters that make every layer spike."""
  model = bitnet_jax.create_model(fs=0.25, num_classes=10, seed=0)
  return model.replace(params=firing_params(model.params))


@pytest.fixture(scope="session")
def images():
  """(4, 32, 32, 3) normalised-looking images."""
  return np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
