"""Padded chunks (`engines._over_chunks`): with more than one chunk every chunk has the same
length and the steps of the last one past T are masked. In float64 the padded run equals the
unpadded one (one chunk of all T steps) exactly, forward and backward, dense and sparse, in every
parallel mode, and equals the NumPy reference of the release; the chunk program does not depend
on T."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import engines
from bitnet_jax.interop import release
from bitnet_jax import reference
from bitnet_jax.kernels import spike_conv
from configs import default

STEPS = 7   # T: chunks of 3 steps are 3 + 3 + 1 (the last padded by 2 masked steps)
CHUNK = 3
_SPARSE_OK, _WHY = spike_conv.available()
SYNAPSES = ["dense", pytest.param("sparse", marks=pytest.mark.skipif(
    not _SPARSE_OK, reason=f"spike_conv kernel unavailable: {_WHY}"))]
# (remat, surrogate): `stream` needs `ste`; the others with `triangle`, whose gradient also flows
# through the membranes across time steps, across the masked ones included.
MODES = [("none", "triangle"), ("chunk", "triangle"), ("stream", "ste")]


def _model(synapses: str, surrogate: str = "ste"):
  """A float64 fs=0.125 model whose every layer fires, with float64 parameters."""
  model = bitnet_jax.create_model(fs=0.125, num_classes=10, dtype=jnp.float64, seed=1,
                                  sparse=synapses == "sparse", surrogate=surrogate)
  return model.module, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) * 2.5,
                                              model.params)


def _images(batch: int = 3):
  return jnp.asarray(np.random.default_rng(1).normal(size=(batch, 32, 32, 3)), jnp.float64)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _loss_and_grad(module, params, images, chunk, remat):
  def loss(params):
    trace = bitnet_jax.run(module, params, images, STEPS, chunk=chunk, remat=remat)
    # Every output the run has: the counts, each step's spikes (weighted per step), every
    # layer's spike count and the final membranes.
    weights = jnp.linspace(0.5, 1.5, STEPS)[:, None, None]
    return (jnp.sum((trace.out_spikes.sum(0) / STEPS - 0.5) ** 2)
            + 1e-2 * jnp.sum(weights * trace.out_spikes) + 1e-3 * trace.layer_spikes.sum()
            + 1e-2 * trace.final_state.sum()), trace
  return jax.value_and_grad(loss, has_aux=True)(params)


@functools.cache
def _unpadded(surrogate: str):
  """The reference: the dense engine in one chunk of all T steps (nothing padded or masked)."""
  module, params = _model("dense", surrogate)
  return _loss_and_grad(module, params, _images(), 0, "none")


@pytest.mark.slow
@pytest.mark.parametrize("synapses", SYNAPSES)
@pytest.mark.parametrize("remat,surrogate", MODES)
def test_padded_chunks_equal_one_chunk_float64(synapses, remat, surrogate):
  """Against the dense engine's single chunk (in float64 the sparse synapses equal the dense
  ones up to summation order, and `stream` equals plain autodiff): the same spikes, counts and
  final membranes, and the gradients up to summation order."""
  with jax.enable_x64(True):
    (loss0, ref), g_ref = _unpadded(surrogate)
    module, params = _model(synapses, surrogate)
    (loss, trace), grads = _loss_and_grad(module, params, _images(), CHUNK, remat)
    assert trace.out_spikes.shape == ref.out_spikes.shape == (STEPS, 3, 10)
    assert float(ref.layer_spikes.min()) > 0 and 0 < float(ref.out_spikes.mean()) < 1
    np.testing.assert_array_equal(trace.out_spikes, ref.out_spikes)
    np.testing.assert_array_equal(trace.layer_spikes, ref.layer_spikes)
    np.testing.assert_allclose(trace.final_state, ref.final_state, rtol=0, atol=1e-13)
    np.testing.assert_allclose(loss, loss0, rtol=1e-13)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = functools.reduce(lambda t, k: t[k.key], path, g_ref)
      assert g.dtype == jnp.float64 and float(jnp.abs(want).max()) > 0, path
      np.testing.assert_allclose(g, want, rtol=0, atol=1e-12 * float(jnp.abs(want).max()),
                                 err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("synapses", SYNAPSES)
def test_padded_chunks_equal_numpy_reference_float64(synapses):
  with jax.enable_x64(True):
    module, params = _model(synapses)
    images = _images()
    ref = reference.run(release.to_reference_weights(params),
                        np.asarray(images).transpose(0, 3, 1, 2), STEPS)
    run = jax.jit(bitnet_jax.run, static_argnums=(0, 3), static_argnames="chunk")
    for chunk in (4,):  # the last chunk: 3 of its 4 steps run
      trace = run(module, params, images, STEPS, chunk=chunk)
      np.testing.assert_array_equal(trace.out_spikes.sum(0), ref["counts"], err_msg=chunk)
      np.testing.assert_array_equal(trace.layer_spikes, ref["layer_spikes"], err_msg=chunk)
      np.testing.assert_allclose(trace.final_state, ref["final_state"], rtol=0, atol=1e-12)


def _chunk_program(module, params, images, time_steps, chunk):
  """The jaxpr text of the loop body of the chunk loop (the scan over chunks)."""
  jaxpr = jax.make_jaxpr(lambda p, x: bitnet_jax.run(module, p, x, time_steps, chunk=chunk))(
      params, images)
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"
           and e.params["length"] == -(-time_steps // chunk)]
  assert len(loops) == 1, [e.params["length"] for e in jaxpr.jaxpr.eqns
                           if e.primitive.name == "scan"]
  return str(loops[0].params["jaxpr"])


@pytest.mark.parametrize("synapses", SYNAPSES)
def test_the_chunk_program_does_not_depend_on_time_steps(tiny_model, images, synapses):
  """Every T with more than one chunk traces the same chunk (so compiles it at the same cost):
  a T that the chunk divides runs it unmasked, any other T the masked one."""
  module = tiny_model.module.clone(sparse=synapses == "sparse")
  program = functools.partial(_chunk_program, module, tiny_model.params, images)
  assert program(20, 10) == program(200, 10) == program(50, 10)
  masked = program(25, 10)
  assert masked == program(203, 10) == program(11, 10)
  assert masked != program(20, 10)


def test_a_run_shorter_than_a_chunk_has_no_loop(tiny_model, images):
  """T <= chunk: one chunk of T steps, no loop around the convolutions (training's weight
  gradients stay out of loop bodies, jax issue #12868)."""
  jaxpr = jax.make_jaxpr(lambda p: bitnet_jax.run(tiny_model.module, p, images, 6, chunk=10))(
      tiny_model.params)
  assert not any(e.primitive.name == "while" or (e.primitive.name == "scan" and any(
      i.primitive.name == "conv_general_dilated" for i in e.params["jaxpr"].jaxpr.eqns))
                 for e in jaxpr.jaxpr.eqns)


def test_eval_chunk_default():
  """Evaluation chunks by default (`engines.EVAL_CHUNK`), training does not (`chunk=0`)."""
  config = default.get_config()
  assert config.eval_chunk == engines.EVAL_CHUNK == 10 and config.chunk == 0
