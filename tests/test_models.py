"""Architecture: pinned parameter counts, layer plan, public API, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import models


def _param_count(module):
  """Counts parameters from shapes only (no compute), so the full models are cheap to check."""
  x = jnp.zeros((1, module.img_size, module.img_size, module.in_channels))
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("fs,classes,expected", [
    (4, 10, 25_701_130), (4, 100, 28_650_340),   # seed: 25.70 M / 28.65 M
    (5, 10, 40_052_170), (5, 100, 43_738_660),   # seed: 40.1 M / 43.7 M
])
def test_seed_parameter_counts(fs, classes, expected):
  assert _param_count(models.BITnet6(fs=fs, num_classes=classes)) == expected


def test_tiny_imagenet_and_v101_counts():
  # 64x64 adds a pool, not parameters; v101 moves a pool: the counts are unchanged.
  # fs=4, 200 classes: the 10-class count with mlp1 widened, 25_701_130 + 190 * (32_768 + 1).
  assert _param_count(models.BITnet6(fs=4, num_classes=200, img_size=64)) == 31_927_240
  assert _param_count(models.BITnet6_v101(fs=4, num_classes=10)) == 25_701_130


def test_count_params_matches_shapes():
  model = bitnet_jax.create_model(fs=0.125, num_classes=10)
  assert bitnet_jax.count_params(model) == _param_count(model.module)
  assert model.params["begin"]["kernel"].shape == (3, 3, 3, 8)
  assert model.params["mlp1"]["kernel"].shape == (4 * 4 * 64, 10)


def test_plan_pools_and_shapes():
  plan = models.BITnet6(fs=1, num_classes=10).plan()
  assert [(s.name, s.pool, s.shape) for s in plan] == [
      ("begin", False, (32, 32, 64)), ("layer1", True, (32, 32, 64)),
      ("layer2", True, (16, 16, 128)), ("layer3", False, (8, 8, 256)),
      ("layer4", True, (8, 8, 512)), ("mlp1", False, (10,))]
  v101 = models.BITnet6_v101(fs=1, num_classes=10).plan()
  assert [s.pool for s in v101] == [False, True, False, True, True, False]
  assert v101[3].shape == (16, 16, 256)
  big = models.BITnet6(fs=1, num_classes=200, img_size=64).plan()
  assert big[0].pool and big[1].shape == (32, 32, 64)


def test_fractional_fs_channels():
  assert models.channels(0.3) == (19, 38, 76, 153)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fs=0), "fs must be a number > 0"),
    (dict(fs=-1), "fs must be a number > 0"),
    (dict(fs=0.01), "fs must be >= 1/64"),
    (dict(fs=1, img_size=48), "img_size must be one of"),
    (dict(fs=1, in_channels=2), "in_channels must be 1 or 3"),
    (dict(fs=1, surrogate="relu"), "unknown surrogate"),
    (dict(fs=1, num_classes=0), "num_classes must be an int"),
])
def test_bad_architecture(kwargs, match):
  kwargs.setdefault("num_classes", 10)
  with pytest.raises(ValueError, match=match):
    bitnet_jax.create_model(**kwargs)


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'BITnet7'"):
    bitnet_jax.create_model("BITnet7", fs=1, num_classes=10)


def test_bad_run_inputs(tiny_model, images):
  with pytest.raises(ValueError, match=r"images must be NHWC of shape \(B, 32, 32, 3\)"):
    bitnet_jax.spike_counts(tiny_model, images[0], 4)
  with pytest.raises(ValueError, match=r"got shape \(4, 32, 32, 1\)"):
    bitnet_jax.spike_counts(tiny_model, images[..., :1], 4)
  for steps in (0, -3, 2.5):
    with pytest.raises(ValueError, match="steps .* must be an int >= 1"):
      bitnet_jax.spike_counts(tiny_model, images, steps)
  with pytest.raises(ValueError, match="unknown engine 'loop'"):
    bitnet_jax.spike_counts(tiny_model, images, 4, engine="loop")
  with pytest.raises(ValueError, match="remat='chunk' is not valid for engine 'scan'"):
    bitnet_jax.run(tiny_model.module, tiny_model.params, images, 4, engine="scan", remat="chunk")
  with pytest.raises(ValueError, match="chunk .* must be an int >= 0"):
    bitnet_jax.run(tiny_model.module, tiny_model.params, images, 4, chunk=-1)


def test_spike_counts_api(tiny_model, images):
  """The class scores are the last layer's spikes summed over T, in chunks of 10 by default: they
  equal one chunk of T, and the first 5 steps of a longer run (spikes never depend on later
  steps)."""
  counts = bitnet_jax.spike_counts(tiny_model, images, 5)
  assert counts.shape == (4, 10) and counts.dtype == jnp.float32
  assert float(counts.sum()) > 0 and np.all(np.asarray(counts) == np.round(counts))
  one_chunk = bitnet_jax.run(tiny_model.module, tiny_model.params, jnp.asarray(images), 5, chunk=0)
  np.testing.assert_array_equal(counts, one_chunk.out_spikes.sum(0))
  longer = bitnet_jax.run(tiny_model.module, tiny_model.params, jnp.asarray(images), 12, chunk=0)
  np.testing.assert_array_equal(counts, longer.out_spikes[:5].sum(0))
