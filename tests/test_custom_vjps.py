"""Every `custom_vjp` of the library against autodiff (or, for the neuron, its documented
gradient) over its whole documented input domain.

A hand-written backward used outside its domain fails silently: the max pool's once assumed 0/1
inputs and the ReLU twin, which pools real values, trained with wrong gradients. So each one is
listed here with the test that checks it, and a new `custom_vjp` without an entry fails
`test_every_custom_vjp_is_listed_with_its_test`.
"""

import ast
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import lean
from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv
from tests.helpers import ROOT

# "module path:function" -> (test file, test function) that checks it over its domain.
TESTED = {
    "bitnet_jax/neuron.py:neuron": ("test_custom_vjps.py",
                                    "test_bddi_vjp_is_its_documented_gradient"),
    "bitnet_jax/neuron.py:maxpool": ("test_lean.py", "test_maxpool_gradient_is_bitwise_autodiffs"),
    "bitnet_jax/lean.py:_spike_synapse": ("test_custom_vjps.py",
                                          "test_spike_synapse_vjp_is_autodiff_on_spikes"),
    "bitnet_jax/lean.py:_neuron_over_time": ("test_custom_vjps.py",
                                             "test_lean_neuron_vjp_is_autodiff_of_the_scan"),
    "bitnet_jax/engines.py:_streamed": ("test_lean.py", "test_stream_equals_scan_engine"),
    "bitnet_jax/kernels/spike_conv.py:conv": ("test_spike_conv.py",
                                              "test_gradient_kernels_match_dense_autodiff"),
    "bitnet_jax/kernels/spike_conv.py:_layer": ("test_spike_conv.py",
                                                "test_masked_layer_gradient_is_the_dense_one"),
    "bitnet_jax/kernels/spike_conv.py:_neuron": ("test_spike_conv.py",
                                                 "test_sparse_gradients_equal_dense_float64"),
}


def _custom_vjps() -> set[str]:
  """Every function decorated with jax.custom_vjp in bitnet_jax/, as "path:name"."""
  found = set()
  for path in glob.glob(os.path.join(ROOT, "bitnet_jax", "**", "*.py"), recursive=True):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.FunctionDef) and any(
          "custom_vjp" in ast.unparse(d) for d in node.decorator_list):
        found.add(f"{os.path.relpath(path, ROOT)}:{node.name}")
  return found


def _test_functions(filename: str) -> set[str]:
  tree = ast.parse(open(os.path.join(ROOT, "tests", filename)).read())
  return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_custom_vjp_is_listed_with_its_test():
  assert _custom_vjps() == set(TESTED)
  for name, (filename, test) in TESTED.items():
    assert test in _test_functions(filename), (name, filename, test)


# ------------------------------------------------------------------------------------------
# The neuron: its backward is the surrogate by definition, checked against the documented math.


@pytest.mark.parametrize("spec", ["ste", "triangle", "sigmoid:3", "atan", "ste+leak:0.1",
                                  "triangle:0.5+leak:0.25"])
def test_bddi_vjp_is_its_documented_gradient(spec):
  """Over states in [0, 1) and preds below, inside, at the ends of and above the clip window:
  d state_in = g_c, d pred = g_c inside [0, 1] (ends included) and leak * g_c outside, with
  g_c = g_spike * sg(c) + g_state * (1 - sg(c)) (for ste: g_c = g_spike)."""
  surrogate = neuron.get_surrogate(spec)
  rng = np.random.default_rng(0)
  pred = np.concatenate([rng.uniform(-1.5, 2.5, 200), [0.0, 1.0, -1e-7, 1 + 1e-6, 0.5]])
  state = rng.uniform(0, 1, pred.shape)
  g_spike, g_state = rng.normal(size=pred.shape), rng.normal(size=pred.shape)
  with jax.enable_x64(True):
    (_, _), vjp = jax.vjp(lambda s, p: neuron.bddi(s, p, surrogate), jnp.asarray(state),
                          jnp.asarray(pred))
    d_state, d_pred = (np.asarray(a) for a in vjp((jnp.asarray(g_spike), jnp.asarray(g_state))))
    c = state + np.clip(pred, 0, 1)
    sg = np.asarray(surrogate.derivative(jnp.asarray(c)))
  g_c = g_spike if surrogate.name == "ste" else g_spike * sg + g_state * (1 - sg)
  window = (pred >= 0) & (pred <= 1)
  np.testing.assert_allclose(d_state, g_c, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(d_pred, np.where(window, g_c, surrogate.leak * g_c), rtol=1e-12,
                             atol=1e-12)


# ------------------------------------------------------------------------------------------
# The lean backend's two: their domain is spikes for the synapse, any pred for the neuron.


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", ["layer2", "mlp1"])
def test_spike_synapse_vjp_is_autodiff_on_spikes(sparse, name):
  """`_spike_synapse` (domain: 0/1 inputs, kept as bool) gives autodiff's gradients of the
  module's synapse, for the parameters and the input, dense and sparse, in float64."""
  if sparse and name == "mlp1":
    pytest.skip("mlp1 is dense in a sparse module")
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    model = bitnet_jax.create_model(fs=0.125, num_classes=10, seed=0, dtype=jnp.float64,
                                    sparse=sparse)
    module = model.module
    layer = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.params[name])
    shape = (3, 16, 16, 8) if name == "layer2" else (3, 4, 4, 64)  # fs 0.125: 8 ... 64 channels
    x = jnp.asarray(rng.random(shape) < 0.3, jnp.float64)             # spikes: 0 and 1
    synapse = lambda p, x: module.apply({"params": {name: p}}, name, x, method=module.synapse)
    out, vjp_ref = jax.vjp(synapse, layer, x)
    ours = lean._spike_synapse  # pylint: disable=protected-access
    got, vjp = jax.vjp(lambda p, x: ours(module, name, p, x), layer, x)
    g = jnp.asarray(rng.normal(size=out.shape))
    np.testing.assert_allclose(got, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(vjp(g)), jax.tree_util.tree_leaves(vjp_ref(g))):
      assert float(jnp.abs(b).max()) > 0
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("const", [False, True])
@pytest.mark.parametrize("valid", [None, 3, 1])
def test_lean_neuron_vjp_is_autodiff_of_the_scan(const, valid, fused):
  """`_neuron_over_time` (the ste neuron through time, backward without a loop) equals autodiff
  of `neuron.over_time` (the scan of per-step bddi) over preds in and out of the clip window,
  for a pred per step or one constant pred, with and without masked steps, stepped by the scan
  or by the C++ kernels (`fused`, the sparse modules' path: the same spikes)."""
  if fused and not spike_conv.available()[0]:
    pytest.skip(f"spike_conv kernel unavailable: {spike_conv.available()[1]}")
  rng = np.random.default_rng(2)
  n = 5
  surrogate = neuron.get_surrogate("ste+leak:0.1")
  with jax.enable_x64(True):
    state = jnp.asarray(rng.uniform(0, 1, (2, 3, 3, 4)))
    preds = jnp.asarray(rng.uniform(-0.7, 1.7, (2, 3, 3, 4) if const else (n, 2, 3, 3, 4)))
    v = None if valid is None else jnp.int32(valid)

    def ref(state, preds):
      kw = {"const": preds, "length": n} if const else {"preds": preds}
      return neuron.over_time(state, surrogate, valid=v, **kw)

    def ours(state, preds):
      neuron_over_time = lean._neuron_over_time  # pylint: disable=protected-access
      return neuron_over_time(state, preds, v, n, surrogate, fused)

    out_ref, vjp_ref = jax.vjp(ref, state, preds)
    out, vjp = jax.vjp(ours, state, preds)
    g_spikes = jnp.asarray(rng.normal(size=out[0].shape))
    g_state = jnp.zeros_like(out[1])  # ste drops the membrane's cotangent in both
    np.testing.assert_array_equal(out[0], out_ref[0])
    np.testing.assert_array_equal(out[1], out_ref[1])
    for a, b in zip(vjp((g_spikes, g_state)), vjp_ref((g_spikes, g_state))):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
