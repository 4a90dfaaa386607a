"""The zero-skipping spike convolution (`spike_conv.py`, `synapses="sparse"`) against the dense
convolution, the NumPy reference of the release and the dense engines."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import run_config
from bitnet_jax.interop import release
from bitnet_jax import reference
from bitnet_jax.kernels import shared_library
from bitnet_jax.kernels import spike_conv
from bitnet_jax import evaluate
from bitnet_jax import neuron as bitnet_neuron
from bitnet_jax import trainer
from configs import default
from tests.helpers import firing_params, tiny_config

_OK, _WHY = spike_conv.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"spike_conv kernel unavailable: {_WHY}")

STEPS = 6
# The jnp computations the kernels replace (and differentiate through).
_dense = spike_conv._dense  # pylint: disable=protected-access
_layer_dense = spike_conv._layer_dense  # pylint: disable=protected-access
_neuron_dense = spike_conv._neuron_dense  # pylint: disable=protected-access


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


def _spikes(rng, shape, density):
  return (rng.random(shape) < density).astype(np.float32)


# (N, H, W, Ci, Co): Co that fills 4 vectors, 1 vector, and a scalar tail; Ci = 1; a row of 1.
@pytest.mark.parametrize("shape", [(3, 8, 8, 16, 64), (2, 5, 7, 3, 20), (2, 4, 4, 1, 128 + 16 + 5),
                                   (1, 1, 9, 8, 8)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_conv_matches_dense_conv(shape, density):
  n, h, w, ci, co = shape
  rng = np.random.default_rng(0)
  x = _spikes(rng, (n, h, w, ci), density)
  kernel = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
  got = jax.jit(spike_conv.conv)(x, kernel)
  want = _dense(x, kernel)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * 9 * ci)
  with jax.enable_x64(True):
    x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
    np.testing.assert_allclose(spike_conv.conv(x64, k64), _dense(x64, k64), rtol=0, atol=1e-12)


def test_conv_gradient_is_the_dense_one():
  rng = np.random.default_rng(1)
  x = _spikes(rng, (2, 6, 6, 8), 0.2)
  kernel = rng.standard_normal((3, 3, 8, 24)).astype(np.float32)
  probe = rng.standard_normal((2, 6, 6, 24)).astype(np.float32)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * probe)
  got = jax.grad(loss(spike_conv.conv), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(_dense), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


# (N, H, W, Ci, Co): output tiles of 4 vectors, of 1 vector and a scalar tail, of 128 + 16 + 5
# channels, narrowed tiles (9 * 256 * 128 floats > the L2 budget), Ci = 1, a row of 1.
@pytest.mark.parametrize("shape", [(3, 8, 8, 16, 64), (2, 5, 7, 3, 20), (2, 4, 4, 1, 149),
                                   (2, 4, 4, 256, 512), (1, 1, 9, 8, 8)])
@pytest.mark.parametrize("density", [0.0, 0.15, 1.0])
def test_gradient_kernels_match_dense_autodiff(shape, density):
  """`input_grad` and `kernel_grad` (conv's vjp) against autodiff of the dense convolution, on a
  cotangent that is mostly zeros (as the ste window and max pool make it): float32 within
  summation-order rounding, float64 to 1e-12; a (T, N, ...) input equals its (T * N, ...)."""
  n, h, w, ci, co = shape
  rng = np.random.default_rng(2)
  x = _spikes(rng, (n, h, w, ci), density)
  kernel = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
  g = (rng.standard_normal((n, h, w, co)) * (rng.random((n, h, w, co)) < 0.2)).astype(np.float32)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
    with jax.enable_x64(dtype == jnp.float64):
      xd, kd, gd = (jnp.asarray(a, dtype) for a in (x, kernel, g))
      want_x, want_k = jax.vjp(_dense, xd, kd)[1](gd)
      got_x, got_k = spike_conv.input_grad(gd, kd), spike_conv.kernel_grad(x.astype(bool), gd)
      assert got_x.dtype == got_k.dtype == dtype
      np.testing.assert_allclose(got_x, want_x, rtol=0, atol=tol * (1 + float(jnp.abs(want_x).max())))
      np.testing.assert_allclose(got_k, want_k, rtol=0, atol=tol * (1 + float(jnp.abs(want_k).max())))
  if n % 2 == 0:  # the same arrays as 2 steps of n / 2 images
    steps = lambda a: a.reshape((2, n // 2) + a.shape[1:])
    np.testing.assert_array_equal(spike_conv.input_grad(steps(g), kernel),
                                  steps(spike_conv.input_grad(g, kernel)))
    np.testing.assert_array_equal(spike_conv.kernel_grad(steps(x), steps(g)),
                                  spike_conv.kernel_grad(x, g))
    np.testing.assert_array_equal(spike_conv.conv(steps(x), kernel),
                                  steps(spike_conv.conv(x, kernel)))


def _layer_inputs(rng):
  """float64 (call under enable_x64) inputs of a layer over T = 19 steps (three blocks of the
  kernel's step loop): spikes (19, 2, 6, 8, 5), kernel, bias, state and a constant pred."""
  return (jnp.asarray(_spikes(rng, (19, 2, 6, 8, 5), 0.3), jnp.float64),
          jnp.asarray(rng.standard_normal((3, 3, 5, 21)) * 0.5),
          jnp.asarray(rng.standard_normal(21) * 0.2),
          jnp.asarray(rng.random((2, 6, 8, 21))),
          jnp.asarray(rng.standard_normal((2, 6, 8, 21))))


@pytest.mark.parametrize("pool", [False, True])
def test_layer_and_neuron_match_dense_over_many_steps(pool):
  """`layer` / `neuron` over T = 19 steps (three blocks of the kernel's step loop), float64:
  spikes and counts equal, membranes equal up to rounding, as the jnp computation gives."""
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x, kernel, bias, state, pred = _layer_inputs(rng)
    for got, want in [
        (spike_conv.layer(x, kernel, bias, state, pool, "ste"),
         _layer_dense(x, kernel, bias, state, pool, "ste")),
        (spike_conv.neuron(pred, state, 19, pool, "ste"),
         _neuron_dense(pred, state, 19, pool, "ste"))]:
      assert got[0].shape == want[0].shape == ((19, 2, 3, 4, 21) if pool else (19, 2, 6, 8, 21))
      assert 0 < float(want[0].mean()) < 1
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)
      np.testing.assert_array_equal(got[2], want[2])


# (Ci, Co, dtype): several output tiles, the last with a vector and a scalar tail (float32: tiles
# of 128, read in place for two tiles, from the tile-major copy for more); many input channels,
# so that a tile's kernel slice is narrowed to fit the L2 cache (float64: 9 * 300 * 64 * 8 bytes
# = 1.4 MB, more than the tile budget, 5/8 of the L2, of any core with up to 2 MB).
@pytest.mark.parametrize("ci,co,dtype", [(8, 128 + 16 + 5, np.float32),
                                         (8, 3 * 128 + 16 + 5, np.float32),
                                         (300, 139, np.float64)])
def test_layer_matches_dense_in_tiles(ci, co, dtype):
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    x = jnp.asarray(_spikes(rng, (11, 2, 4, 6, ci), 0.2), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, ci, co)) / np.sqrt(ci), dtype)
    bias = jnp.asarray(rng.standard_normal(co) * 0.2, dtype)
    state = jnp.asarray(rng.random((2, 4, 6, co)), dtype)
    got = spike_conv.layer(x, kernel, bias, state, True, "ste")
    want = _layer_dense(x, kernel, bias, state, True, "ste")
    assert 0 < float(want[0].mean()) < 1
    if dtype == np.float64:
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)
      np.testing.assert_array_equal(got[2], want[2])
    else:  # float32: a spike may move where the summation order rounds across the threshold
      assert np.mean(np.asarray(got[0]) != np.asarray(want[0])) <= 1e-3
      np.testing.assert_allclose(got[2], want[2], rtol=1e-3)


@pytest.mark.parametrize("pool", [False, True])
def test_layer_and_neuron_mask_steps_past_valid(pool):
  """`valid` is a runtime operand (one compiled call for every value): the first `valid` steps
  run as the unmasked call over only those steps does; later steps emit nothing and leave the
  membranes as they are; the dense reference (whose autodiff is the backward) agrees, float64."""
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    x, kernel, bias, state, pred = _layer_inputs(rng)
    layer = jax.jit(lambda v: spike_conv.layer(x, kernel, bias, state, pool, "ste", v))
    neuron = jax.jit(lambda v: spike_conv.neuron(pred, state, 19, pool, "ste", v))
    for valid in (0, 1, 8, 11, 19):
      v = jnp.int32(valid)
      for got, dense, short in [
          (layer(v), _layer_dense(x, kernel, bias, state, pool, "ste", v),
           _layer_dense(x[:max(valid, 1)], kernel, bias, state, pool, "ste")),
          (neuron(v), _neuron_dense(pred, state, 19, pool, "ste", v),
           _neuron_dense(pred, state, max(valid, 1), pool, "ste"))]:
        np.testing.assert_array_equal(got[0], dense[0], err_msg=valid)
        np.testing.assert_allclose(got[1], dense[1], rtol=0, atol=1e-12, err_msg=valid)
        np.testing.assert_array_equal(got[2], dense[2], err_msg=valid)
        assert not np.any(np.asarray(got[0][valid:])), valid
        if valid:
          np.testing.assert_array_equal(got[0][:valid], short[0])
          np.testing.assert_allclose(got[1], short[1], rtol=0, atol=1e-12)
          np.testing.assert_array_equal(got[2], short[2])
        else:
          np.testing.assert_array_equal(got[1], state)
          np.testing.assert_array_equal(got[2], 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_neuron_steps_is_the_scan_bitwise(dtype):
  """`neuron_steps` (the training forward's neuron) is `neuron.over_time` bitwise, in float32 as
  in float64 (the same elementwise operations in the same order): over 19 steps (three blocks of
  the kernel), channels that fill no whole vector, preds on both sides of the clip, with and
  without masked steps."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    preds = jnp.asarray(rng.normal(0.3, 0.8, size=(19, 3, 6, 4, 37)), dtype)
    state = jnp.asarray(rng.random((3, 6, 4, 37)), dtype)
    run = jax.jit(spike_conv.neuron_steps)
    for valid in (None, 0, 11, 19):
      v = None if valid is None else jnp.int32(valid)
      got = run(preds, state, v)
      want = bitnet_neuron.over_time(state, bitnet_neuron.get_surrogate("ste"), preds, valid=v)
      assert 0 < float(want[0].mean()) < 1 or valid == 0
      for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b, err_msg=str(valid))


def test_masked_layer_gradient_is_the_dense_one():
  """The backward of a masked call differentiates the masked dense computation: masked steps
  contribute zero, so the gradient equals that of the unmasked call over the valid steps."""
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    x = jnp.asarray(_spikes(rng, (6, 2, 4, 4, 3), 0.4), jnp.float64)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 8)) * 0.5)
    bias, state = jnp.asarray(rng.standard_normal(8) * 0.2), jnp.asarray(rng.random((2, 4, 4, 8)))
    probe = jnp.asarray(rng.standard_normal((6, 2, 2, 2, 8)))

    def loss(f, n):
      def value(kernel, bias, state):
        spikes, new_state, count = f(kernel, bias, state)
        return (jnp.sum(spikes[:n] * probe[:n]) + jnp.sum(spikes) + jnp.sum(new_state ** 2)
                + jnp.sum(count))
      return jax.grad(value, argnums=(0, 1, 2))(kernel, bias, state)

    masked = loss(lambda *a: spike_conv.layer(x, *a, True, "triangle", jnp.int32(4)), 6)
    short = loss(lambda *a: _layer_dense(x[:4], *a, True, "triangle"), 4)
    for a, b in zip(masked, short):
      assert float(jnp.abs(b).max()) > 0
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * float(jnp.abs(b).max()))


def test_conv_rejects_bad_input():
  x = np.zeros((1, 4, 4, 8), np.float32)
  with pytest.raises(ValueError, match=r"expected \(N, H, W, Ci\) \(or \(T, N, H, W, Ci\)\) "
                                       r"spikes and a \(3, 3, Ci, Co\) kernel"):
    spike_conv.conv(x, np.zeros((3, 3, 4, 8), np.float32))
  with pytest.raises(ValueError, match=r"kernel_grad: expected .* got \(1, 4, 4, 8\) and "
                                       r"\(1, 4, 5, 8\)"):
    spike_conv.kernel_grad(x, np.zeros((1, 4, 5, 8), np.float32))
  with pytest.raises(ValueError, match="cotangent must be float32 or float64, got bfloat16"):
    spike_conv.kernel_grad(x, jnp.zeros((1, 4, 4, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match="all inputs must be float32, or all float64, got float32, "
                                       "bfloat16"):
    spike_conv.conv(x, jnp.zeros((3, 3, 8, 8), jnp.bfloat16))
  kernel, bias = np.zeros((3, 3, 8, 4), np.float32), np.zeros(4, np.float32)
  state = np.zeros((1, 4, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"expected \(T, N, H, W, Ci\) spikes, got \(1, 4, 4, 8\)"):
    spike_conv.layer(x, kernel, bias, state, False, "ste")
  with pytest.raises(ValueError, match=r"expected a \(4,\) bias and an \(1, 4, 4, 4\) state .* "
                                       r"got \(4,\) and \(1, 4, 4, 5\)"):
    spike_conv.layer(x[None], kernel, bias, np.zeros((1, 4, 4, 5), np.float32), False, "ste")
  with pytest.raises(ValueError, match="pooling needs an even height and width, got 3x4"):
    spike_conv.neuron(state[:, :3], state[:, :3], 2, True, "ste")
  with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
    spike_conv.neuron(state, state, 0, False, "ste")
  with pytest.raises(ValueError, match=r"valid \(the number of steps that run\) must be None or "
                                       r"an integer scalar, got \(2,\) int32"):
    spike_conv.neuron(state, state, 2, False, "ste", np.array([1, 2], np.int32))
  with pytest.raises(ValueError, match="must be None or an integer scalar, got \\(\\) float32"):
    spike_conv.layer(x[None], kernel, bias, state, False, "ste", np.float32(1))
  with pytest.raises(ValueError, match=r"neuron_steps: expected \(T, N, H, W, C\) preds and an "
                                       r".* got \(1, 4, 4, 4\) float32 and \(1, 4, 4, 4\)"):
    spike_conv.neuron_steps(state, state)
  with pytest.raises(ValueError, match=r"got \(2, 1, 4, 4, 4\) bfloat16 and"):
    spike_conv.neuron_steps(jnp.zeros((2, 1, 4, 4, 4), jnp.bfloat16), state)


def test_unavailable_kernel_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(shared_library, "register", lambda: "no C++ compiler found (set $CXX)")
  with pytest.raises(RuntimeError, match="sparse synapses .* not available: no C.. compiler"):
    spike_conv.conv(np.zeros((1, 4, 4, 8), np.float32), np.zeros((3, 3, 8, 8), np.float32))
  config = _config(synapses="sparse")  # explicit: a usage error, one line on the command line
  with pytest.raises(ValueError, match="config: sparse synapses .* not available: no C.. comp"):
    run_config.validate_config(config)


def test_sparse_needs_float32():
  with pytest.raises(ValueError, match="sparse synapses compute in float32 or float64"):
    bitnet_jax.create_model(fs=0.125, num_classes=10, dtype=jnp.bfloat16, sparse=True)
  config = _config(synapses="sparse", compute_dtype="bfloat16")
  with pytest.raises(ValueError, match="synapses=sparse computes in float32"):
    run_config.validate_config(config)
  config = _config(synapses="csr")
  with pytest.raises(ValueError, match="synapses must be auto, dense or sparse, got 'csr'"):
    run_config.validate_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("variant,img_size", [("BITnet6", 32), ("BITnet6_v101", 32),
                                              ("BITnet6", 64)])
def test_sparse_engines_equal_numpy_reference_float64(variant, img_size):
  """In float64 the sparse synapses reproduce the release's per-step loop exactly."""
  with jax.enable_x64(True):
    model = bitnet_jax.create_model(variant, fs=0.125, num_classes=10, img_size=img_size,
                                    dtype=jnp.float64, sparse=True, seed=1)
    params = firing_params(model.params, gain=2.5)
    images = np.random.default_rng(1).normal(size=(3, img_size, img_size, 3))
    ref = reference.run(release.to_reference_weights(params),
                        images.transpose(0, 3, 1, 2), STEPS, variant=variant)
    assert ref["counts"].sum() > 0 and ref["layer_spikes"].min() > 0
    run = jax.jit(bitnet_jax.run, static_argnums=(0, 3), static_argnames="engine")
    for engine in ("scan", "parallel"):
      trace = run(model.module, params, jnp.asarray(images), STEPS, engine=engine)
      np.testing.assert_array_equal(trace.out_spikes.sum(0), ref["counts"], err_msg=engine)
      np.testing.assert_array_equal(trace.layer_spikes, ref["layer_spikes"], err_msg=engine)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _loss_and_grad(module, params, images, engine, remat):
  def loss(params):
    trace = bitnet_jax.run(module, params, images, STEPS, engine=engine, chunk=3, remat=remat)
    counts = trace.out_spikes.sum(0)
    return jnp.sum((counts / STEPS - 0.5) ** 2) + 1e-4 * trace.layer_spikes.sum(), trace
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.slow
@pytest.mark.parametrize("engine,remat", [("scan", "step"), ("parallel", "none"),
                                          ("parallel", "stream")])
def test_sparse_float32_agrees_with_dense(tiny_model, images, engine, remat):
  """float32: spikes and `ste` gradients as the dense synapses give (up to summation order)."""
  sparse = tiny_model.module.clone(sparse=True)
  (_, base), g_base = _loss_and_grad(tiny_model.module, tiny_model.params, images, engine, remat)
  (_, trace), grads = _loss_and_grad(sparse, tiny_model.params, images, engine, remat)
  assert 0 < float(base.out_spikes.mean()) < 1
  assert np.mean(np.asarray(trace.out_spikes) != np.asarray(base.out_spikes)) <= 1e-4
  np.testing.assert_allclose(trace.layer_spikes, base.layer_spikes, rtol=1e-4)
  # A clip window or spike that moves with the summation order moves a few gradient entries.
  for g, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_base)):
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, ref, rtol=0, atol=3e-4 * float(jnp.abs(ref).max()))


@pytest.mark.slow
@pytest.mark.parametrize("engine,remat", [("scan", "step"), ("parallel", "none"),
                                          ("parallel", "stream")])
def test_sparse_gradients_equal_dense_float64(engine, remat):
  """float64: the sparse synapses' backward (zero-skipping input and kernel gradients) gives the
  dense engine's gradients of the whole model to 1e-10 of their scale."""
  with jax.enable_x64(True):
    model = bitnet_jax.create_model(fs=0.125, num_classes=10, dtype=jnp.float64, seed=1)
    params = firing_params(model.params, gain=2.5)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32, 32, 3)))
    _, want = _loss_and_grad(model.module, params, images, engine, remat)
    _, got = _loss_and_grad(model.module.clone(sparse=True), params, images, engine, remat)
    for g, ref in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      assert float(jnp.abs(ref).max()) > 0
      np.testing.assert_allclose(g, ref, rtol=0, atol=1e-10 * float(jnp.abs(ref).max()))


@pytest.mark.slow
def test_training_with_sparse_synapses(tmp_path):
  """`synapses="sparse"` end to end: the trainer builds a sparse model, trains and evaluates."""
  config = tiny_config(synapses="sparse", num_epochs=1, chunk=1)
  assert run_config.make_module(run_config.resolve(config)[0],
                                run_config.dataset_info(config)).sparse
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["n"] == 20 and np.isfinite(result["loss"])
  again = evaluate.run_evaluation(config, workdir=str(tmp_path), which="latest")
  assert (again["top1"], again["loss"]) == (result["top1"], result["loss"])  # what was saved
