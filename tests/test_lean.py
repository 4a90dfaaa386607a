"""remat="stream" (streaming backprop, bitnet_jax/lean.py): the same spikes and gradients as
the reference engines, memory that does not grow with the time steps, and its building blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import data
from bitnet_jax import engines
from bitnet_jax import neuron
from bitnet_jax import lean
from bitnet_jax import run_config
from configs import default

STEPS = 6
# chunk 0: one chunk (plain autodiff); 2 and 3 divide T; 4 leaves a partial chunk of 2 steps.
CHUNKS = [0, 2, 3, 4]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _loss_and_grad(module, params, images, engine, chunk, remat):
  def loss(params):
    trace = bitnet_jax.run(module, params, images, STEPS, engine=engine, chunk=chunk, remat=remat)
    counts = trace.out_spikes.sum(0)
    # A per-step weighting (not only the counts) and every layer's spikes, so that every
    # cotangent the stream receives is exercised.
    weights = jnp.linspace(0.5, 1.5, STEPS)[:, None, None]
    return (jnp.sum((counts / STEPS - 0.5) ** 2) + 1e-2 * jnp.sum(weights * trace.out_spikes)
            + 1e-4 * trace.layer_spikes.sum()), trace
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.fixture(scope="module")
def reference(tiny_model, images):
  return _loss_and_grad(tiny_model.module, tiny_model.params, images, "scan", 0, "none")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_stream_equals_scan_engine(tiny_model, images, reference, chunk):
  (ref_loss, ref_trace), ref_grads = reference
  (loss, trace), grads = _loss_and_grad(tiny_model.module, tiny_model.params, images,
                                        "parallel", chunk, "stream")
  assert 0 < float(ref_trace.out_spikes.mean()) < 1  # the test model's output layer does fire
  assert np.mean(np.asarray(trace.out_spikes) != np.asarray(ref_trace.out_spikes)) <= 1e-4
  np.testing.assert_allclose(trace.layer_spikes, ref_trace.layer_spikes, rtol=1e-4)
  np.testing.assert_allclose(trace.final_state, ref_trace.final_state, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
    assert float(jnp.abs(ref).max()) > 0, path  # every layer gets a gradient
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-4 * float(jnp.abs(ref).max()),
                               err_msg=f"chunk={chunk} {jax.tree_util.keystr(path)}")


def test_stream_final_state_has_no_gradient_as_in_other_engines(tiny_model, images):
  """Under `ste` the membrane's cotangent is dropped by the neuron in every engine."""
  def grads(engine, remat, chunk):
    def loss(params):
      trace = bitnet_jax.run(tiny_model.module, params, images, STEPS, engine=engine,
                             chunk=chunk, remat=remat)
      return trace.final_state.sum()
    return jax.jit(jax.grad(loss))(tiny_model.params)
  for g in jax.tree_util.tree_leaves([grads("scan", "none", 0), grads("parallel", "stream", 3)]):
    assert float(jnp.abs(g).max()) == 0


@pytest.mark.parametrize("surrogate", ["triangle", "atan:2", "sigmoid"])
def test_stream_rejects_other_surrogates(tiny_model, images, surrogate):
  with pytest.raises(ValueError, match="remat='stream' needs the 'ste' surrogate"):
    engines.parse_remat("parallel", "stream", surrogate)
  module = tiny_model.module.clone(surrogate=surrogate)
  with pytest.raises(ValueError, match="remat='stream' needs the 'ste' surrogate"):
    bitnet_jax.run(module, tiny_model.params, images, STEPS, remat="stream")


def test_stream_is_a_parallel_engine_option_only():
  assert engines.parse_remat("parallel", "stream", "ste") == engines.Remat("stream")
  assert engines.parse_remat("parallel", "stream") == engines.Remat("stream")  # run checks it
  step = engines.parse_remat("scan", "step")
  assert step == engines.Remat("step") and str(step) == "step"
  for bad in ("every:4", "chunk", None):
    with pytest.raises(ValueError, match="is not valid for engine 'scan'"):
      engines.parse_remat("scan", bad)
  with pytest.raises(ValueError, match="remat='stream' is not valid for engine 'scan'"):
    engines.parse_remat("scan", "stream")


@pytest.mark.parametrize("values", ["spikes", "real", "ties"])
def test_maxpool_gradient_is_bitwise_autodiffs(values):
  """The elementwise max-pool backward routes every window's gradient where XLA's
  select-and-scatter does (first maximum in row-major order), over its whole domain: 0/1 spikes
  (all 16 window patterns), real values (the ReLU twin's activations, negative ones too), and
  real values with ties. Regression: from 8b5c912 to the fix, the backward assumed 0/1 inputs
  and sent a real window [[0.3, 0.9], [0, 0]]'s gradient to the 0.3, so the ReLU twin trained
  with wrong gradients."""
  rng = np.random.default_rng(0)
  if values == "spikes":
    x = jnp.asarray(rng.random((3, 2, 8, 6, 5)) < 0.3, jnp.float32)  # (T, B, H, W, C)
    x = x.at[0].set(0).at[1, 0, :2, :2].set(1)                        # all-0 and all-1 windows
  elif values == "real":
    x = jnp.asarray(rng.normal(size=(3, 2, 8, 6, 5)), jnp.float32)
  else:  # a few distinct values: many windows with two or more equal maxima
    x = jnp.asarray(rng.integers(-1, 3, (3, 2, 8, 6, 5)) * 0.5, jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 2, 4, 3, 5)), jnp.float32)
  ref = jax.vjp(neuron._reduce_max, x)[1](g)[0]  # pylint: disable=protected-access
  ours = jax.vjp(neuron.maxpool, x)[1](g)[0]
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(neuron.maxpool(x), neuron._reduce_max(x))  # pylint: disable=protected-access
  window = jnp.asarray([[0.3, 0.9], [0.0, 0.0]])[None, :, :, None]         # the case
  np.testing.assert_array_equal(jax.grad(lambda x: neuron.maxpool(x).sum())(window)[0, ..., 0],
                                [[0, 1], [0, 0]])


def test_conv_gradients_match_autodiff():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((4, 8, 8, 6)) < 0.2)                 # bool spikes
  k = jnp.asarray(rng.normal(size=(3, 3, 6, 7)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 8, 8, 7)), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  g_x, g_k = jax.vjp(conv, x.astype(jnp.float32), k)[1](g)
  np.testing.assert_allclose(lean._kernel_grad_taps(x, g), g_k, rtol=1e-5, atol=1e-5)  # pylint: disable=protected-access
  np.testing.assert_allclose(lean._conv_input_grad(g, k, jnp.float32), g_x, rtol=1e-5,  # pylint: disable=protected-access
                             atol=1e-5)


def _train_step_memory(remat, chunk, steps, fs=0.125, batch=8):
  """temp + argument + output bytes of the compiled train step (compile only)."""
  c = default.get_config()
  c.update(fs=fs, time_steps=steps, engine="parallel", remat=remat, chunk=chunk,
           batch_size=batch)
  info = data.DatasetInfo(name="synthetic", num_classes=10, image_shape=(32, 32, 3),
                              num_train=100, num_test=10, mean=(0.5,) * 3, std=(0.25,) * 3)
  m = run_config.compile_train_step(c, info).memory_analysis()
  if m is None:
    pytest.skip("this backend reports no memory analysis")
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.slow
def test_stream_memory_does_not_grow_with_time_steps():
  """With chunks of 4 steps, 32 steps take (almost) the memory of 8; remat='none' grows."""
  short, long = _train_step_memory("stream", 4, 8), _train_step_memory("stream", 4, 32)
  assert long <= 1.05 * short, (short, long)
  assert _train_step_memory("none", 0, 32) > 2 * long


def test_stream_with_clip_leak_equals_scan_engine(tiny_model, images):
  """The clip leak ("ste+leak:a") reaches the stream's own backward, as it reaches `bddi`'s."""
  module = tiny_model.module.clone(surrogate="ste+leak:0.5")
  (_, ref_trace), ref_grads = _loss_and_grad(module, tiny_model.params, images, "scan", 0, "none")
  (_, trace), grads = _loss_and_grad(module, tiny_model.params, images, "parallel", 3, "stream")
  (_, _), plain_grads = _loss_and_grad(tiny_model.module, tiny_model.params, images, "scan", 0,
                                       "none")
  assert np.mean(np.asarray(trace.out_spikes) != np.asarray(ref_trace.out_spikes)) <= 1e-4
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-4 * float(jnp.abs(ref).max()),
                               err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(ref_grads["begin"]["kernel"], plain_grads["begin"]["kernel"])
