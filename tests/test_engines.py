"""Both time engines against the NumPy reference of the release, and against each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax.interop import release
from bitnet_jax import reference
from tests.helpers import firing_params

STEPS = 6
# (engine, chunk, remat): every way of running the time loop.
CONFIGS = [("scan", 0, "none"), ("scan", 0, "step"),
           ("parallel", 0, "none"), ("parallel", 4, "none"), ("parallel", 2, "chunk")]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _loss_and_grad(module, params, images, engine, chunk, remat):
  def loss(params):
    trace = bitnet_jax.run(module, params, images, STEPS, engine=engine, chunk=chunk, remat=remat)
    counts = trace.out_spikes.sum(0)
    # Touch every layer's spikes so that every layer's gradient is exercised.
    return jnp.sum((counts / STEPS - 0.5) ** 2) + 1e-4 * trace.layer_spikes.sum(), trace
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.fixture(scope="module")
def runs(tiny_model, images):
  return {cfg: _loss_and_grad(tiny_model.module, tiny_model.params, images, *cfg)
          for cfg in CONFIGS}


def test_engines_agree_on_spikes(runs):
  (_, base), _ = runs[CONFIGS[0]]
  assert 0 < float(base.out_spikes.mean()) < 1  # the test model's output layer does fire
  for cfg, ((_, trace), _) in runs.items():
    out_flips = np.mean(np.asarray(trace.out_spikes) != np.asarray(base.out_spikes))
    assert out_flips <= 1e-4, cfg
    np.testing.assert_allclose(trace.layer_spikes, base.layer_spikes, rtol=1e-4, err_msg=cfg)


def test_engines_agree_on_ste_gradients(runs):
  _, base = runs[CONFIGS[0]]
  for cfg, (_, grads) in runs.items():
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      ref = functools.reduce(lambda t, k: t[k.key], path, base)
      assert float(jnp.abs(g).max()) > 0, (cfg, path)  # every layer gets a gradient
      np.testing.assert_allclose(g, ref, rtol=0, atol=1e-4 * float(jnp.abs(ref).max()),
                                 err_msg=f"{cfg} {path}")


@pytest.mark.parametrize("surrogate", ["triangle", "atan:4"])
def test_engines_agree_on_other_surrogates(tiny_model, images, surrogate):
  module = tiny_model.module.clone(surrogate=surrogate)
  (_, _), g_scan = _loss_and_grad(module, tiny_model.params, images, "scan", 0, "step")
  (_, _), g_par = _loss_and_grad(module, tiny_model.params, images, "parallel", 0, "none")
  for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_par)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.slow
@pytest.mark.parametrize("variant,img_size,classes", [
    ("BITnet6", 32, 10), ("BITnet6_v101", 32, 10), ("BITnet6", 64, 20)])
def test_engines_equal_numpy_reference_float64(variant, img_size, classes):
  """In float64 both engines reproduce the release's per-step loop exactly."""
  with jax.enable_x64(True):
    model = bitnet_jax.create_model(variant, fs=0.125, num_classes=classes, img_size=img_size,
                                    dtype=jnp.float64, seed=1)
    params = firing_params(model.params, gain=2.5)
    images = np.random.default_rng(1).normal(size=(3, img_size, img_size, 3))
    ref = reference.run(release.to_reference_weights(params),
                        images.transpose(0, 3, 1, 2), STEPS, variant=variant)
    assert ref["counts"].sum() > 0 and ref["layer_spikes"].min() > 0
    for engine in ("scan", "parallel"):
      run = jax.jit(bitnet_jax.run, static_argnums=(0, 3), static_argnames="engine")
      trace = run(model.module, params, jnp.asarray(images), STEPS, engine=engine)
      np.testing.assert_array_equal(trace.out_spikes.sum(0), ref["counts"], err_msg=engine)
      np.testing.assert_array_equal(trace.layer_spikes, ref["layer_spikes"], err_msg=engine)
      np.testing.assert_allclose(trace.final_state, ref["final_state"], atol=1e-12)
