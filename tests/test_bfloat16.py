"""bfloat16 compute (model dtype bfloat16, float32 parameters and membranes) against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax

STEPS = 10


@pytest.fixture(scope="module")
def batch():
  """32 images: 320 output counts, so that 1 % is a few outputs."""
  return jnp.asarray(np.random.default_rng(0).normal(size=(32, 32, 32, 3)), jnp.float32)


def _bf16(module):
  return module.clone(dtype=jnp.bfloat16)


def test_bfloat16_keeps_float32_parameters_states_and_outputs(tiny_model, batch):
  trace = bitnet_jax.run(_bf16(tiny_model.module), tiny_model.params, batch[:4], 2)
  assert trace.out_spikes.dtype == trace.final_state.dtype == jnp.float32
  assert _bf16(tiny_model.module).state_dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(lambda p, x: bitnet_jax.run(_bf16(tiny_model.module), p, x, 2))(
      tiny_model.params, batch[:4]))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr  # the synapses do run in bf16


def test_bfloat16_first_layer_spikes_agree_with_float32(tiny_model, batch):
  """One step: the first layer's spikes per image agree to within 1 % (they differ only where
  bf16 rounding of the image and the kernel moves a pred across the threshold)."""
  f32 = bitnet_jax.run(tiny_model.module, tiny_model.params, batch, 1).layer_spikes[:, 0]
  bf16 = bitnet_jax.run(_bf16(tiny_model.module), tiny_model.params, batch, 1).layer_spikes[:, 0]
  assert float(f32.sum()) > 0
  assert float(jnp.abs(f32 - bf16).sum()) <= 0.01 * float(f32.sum())


def _bf16x3(module):
  return module.clone(dtype=jnp.bfloat16, kernel_parts=3)


def test_bfloat16x3_counts_agree_with_float32(tiny_model, batch):
  """compute_dtype "bfloat16x3": each synapse sums 3 bf16 products (the kernel's hi, mid and lo
  parts; spikes are exact in bf16) in float32. Measured for this model and batch (equal counts
  out of 320): T=10: 1 part 61.6 %, 2 parts 96.6 %, 3 parts 100 %; T=50: 40.9 %, 60.9 %,
  95.0 % (99.7 % within one count). The T=50 gap of 3 parts is float32's own: a different
  summation order moves a spike by a step (see docs/benchmarks.md, "bfloat16")."""
  f32 = bitnet_jax.spike_counts(tiny_model, batch, STEPS)
  assert 0 < float(f32.mean()) < STEPS
  bf16 = bitnet_jax.spike_counts(tiny_model.replace(module=_bf16x3(tiny_model.module)), batch,
                                 STEPS)
  assert float(jnp.mean(f32 == bf16)) >= 0.99


def test_bfloat16x3_first_layer_runs_in_float32(tiny_model, batch):
  """Images are not exact in bf16; the first layer (computed once per image) keeps float32."""
  ref = tiny_model.module.apply({"params": tiny_model.params}, "begin", batch,
                                method=tiny_model.module.synapse)
  got = _bf16x3(tiny_model.module).apply({"params": tiny_model.params}, "begin", batch,
                                         method=tiny_model.module.synapse)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_kernel_parts_rejects_other_values(tiny_model):
  with pytest.raises(ValueError, match="kernel_parts must be 1, 2 or 3, got 4"):
    tiny_model.module.clone(kernel_parts=4)


def _grads(module, params, images, engine, chunk, remat):
  def loss(params):
    trace = bitnet_jax.run(module, params, images, 6, engine=engine, chunk=chunk, remat=remat)
    return jnp.sum((trace.out_spikes.sum(0) / 6 - 0.5) ** 2), trace.out_spikes
  # By default XLA may skip a bf16 rounding where it fuses ops ("excess precision"), so the same
  # bf16 network gives different spikes in two programs; this comparison needs it off.
  step = jax.jit(jax.grad(loss, has_aux=True)).lower(params)
  return step.compile(compiler_options={"xla_allow_excess_precision": False})(params)


@pytest.mark.slow
def test_stream_with_bfloat16_compute_matches_autodiff(tiny_model, batch):
  """The same bf16 spikes as plain autodiff of the parallel engine with the same chunks; the
  kernel gradients differ only by bf16 rounding of the cotangents (autodiff rounds them to bf16
  before the weight gradient, `stream` on CPU multiplies in float32). The reference has the same
  chunks because Flax sums a bias gradient in bf16, whose rounding depends on how many terms
  one sum has (per step in `scan`, per chunk here)."""
  module = _bf16(tiny_model.module)
  g_ref, out_ref = _grads(module, tiny_model.params, batch[:4], "parallel", 3, "none")
  g, out = _grads(module, tiny_model.params, batch[:4], "parallel", 3, "stream")
  np.testing.assert_array_equal(out, out_ref)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * float(jnp.abs(b).max()))


@pytest.mark.slow
def test_bfloat16x3_stream_gradients_match_float32(tiny_model, batch):
  """bfloat16x3 trains like float32: the same spikes, and gradients within bf16 rounding of the
  cotangents (the weight gradients of the stream are computed in float32)."""
  g_ref, out_ref = _grads(tiny_model.module, tiny_model.params, batch[:4], "parallel", 3, "none")
  g, out = _grads(_bf16x3(tiny_model.module), tiny_model.params, batch[:4], "parallel", 3,
                  "stream")
  np.testing.assert_array_equal(out, out_ref)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    assert float(jnp.abs(b).max()) > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * float(jnp.abs(b).max()))
