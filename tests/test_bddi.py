"""The bddi neuron: forward on hand-computed cases, every surrogate's gradient, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import bddi, get_surrogate


def _trace(preds, surrogate="ste"):
  """Runs one neuron per entry of preds[t] over time; returns spikes (T, N) and final state."""
  state = jnp.zeros(preds.shape[1:], jnp.float32)
  spikes = []
  for pred in preds:
    spike, state = bddi(state, jnp.asarray(pred, jnp.float32), surrogate)
    spikes.append(spike)
  return np.stack(spikes), np.asarray(state)


def test_forward_hand_cases():
  # Exactly representable preds, so c hits 1.0 exactly where the hand trace says.
  #   0.25: c = .25 .5 .75 1.0* .25 .5 .75 1.0*   (spike when c >= 1, including c == 1.0)
  #   0.75: c = .75 1.5* 1.25* 1.0* .75 1.5* 1.25* 1.0*
  #   -0.5 -> clipped to 0: never fires;  1.0 and 7.0 -> clipped to 1: fire every step
  preds = np.tile(np.array([0.25, 0.75, -0.5, 1.0, 7.0], np.float32), (8, 1))
  spikes, state = _trace(preds)
  np.testing.assert_array_equal(spikes[:, 0], [0, 0, 0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(spikes[:, 1], [0, 1, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(spikes[:, 2], np.zeros(8))
  np.testing.assert_array_equal(spikes[:, 3], np.ones(8))
  np.testing.assert_array_equal(spikes[:, 4], np.ones(8))
  np.testing.assert_array_equal(state, [0, 0, 0, 0, 0])


def test_forward_one_step_values_and_dtype():
  state = jnp.array([0.0, 0.5, 0.9, 0.2], jnp.float32)
  pred = jnp.array([0.3, 0.5, 0.05, -3.0], jnp.float32)
  spike, new_state = bddi(state, pred)
  np.testing.assert_array_equal(spike, [0, 1, 0, 0])
  np.testing.assert_allclose(new_state, [0.3, 0.0, 0.95, 0.2], rtol=1e-6)
  assert spike.dtype == jnp.float32 and new_state.dtype == jnp.float32
  spike16, _ = bddi(state.astype(jnp.bfloat16), pred.astype(jnp.bfloat16))
  assert spike16.dtype == jnp.bfloat16


def test_count_is_floor_of_running_sum():
  """ORIGINAL.md: spikes up to t = floor(pred_1 + ... + pred_t) (state stays in [0, 1))."""
  rng = np.random.default_rng(0)
  preds = rng.uniform(-0.3, 1.3, size=(40, 500)).astype(np.float32)
  spikes, state = _trace(preds)
  running = np.cumsum(np.clip(preds.astype(np.float64), 0, 1), axis=0)
  mismatches = np.sum(np.cumsum(spikes, 0) != np.floor(running))
  assert mismatches <= 0.001 * running.size  # float32 order can flip exact integer boundaries
  assert np.all((state >= 0) & (state < 1))


def _grads(surrogate, state, pred, g_spike=1.0, g_state=0.0):
  def f(s, p):
    spike, new_state = bddi(s, p, surrogate)
    return g_spike * spike + g_state * new_state
  return jax.grad(f, argnums=(0, 1))(jnp.float32(state), jnp.float32(pred))


@pytest.mark.parametrize("pred,window", [(-0.1, 0.0), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0),
                                         (1.2, 0.0)])
def test_ste_gradient_and_clip_window(pred, window):
  g_state, g_pred = _grads("ste", 0.3, pred)
  assert float(g_pred) == window  # d spike/d c = 1, times the clip window (ends included)
  assert float(g_state) == 1.0
  # The reset cancels the state path: d state'/d c = 1 - 1 = 0.
  g_state, g_pred = _grads("ste", 0.3, 0.5, g_spike=0.0, g_state=1.0)
  assert float(g_state) == 0.0 and float(g_pred) == 0.0


@pytest.mark.parametrize("spec,c,expected", [
    ("triangle", 1.0, 1.0),                       # max(0, 1 - |x|/w)/w at x = 0
    ("triangle", 0.25, 0.25),                     # x = -0.75, w = 1
    ("triangle:0.5", 1.0, 2.0),                   # peak 1/w
    ("triangle:0.5", 0.4, 0.0),                   # |x| = 0.6 > w: outside the window
    ("sigmoid", 1.0, 1.0),                        # a/4 at x = 0, a = 4
    ("sigmoid", 1.5, 4 * (1 / (1 + math.exp(-2))) * (1 - 1 / (1 + math.exp(-2)))),
    ("atan", 1.0, 1.0),                           # a/2 at x = 0, a = 2
    ("atan", 1.5, 1.0 / (1 + (math.pi / 2) ** 2)),  # x = 0.5, a = 2
    ("atan:4", 1.0, 2.0),
    ("ste", 0.1, 1.0),
])
def test_surrogate_derivative(spec, c, expected):
  # state = c - 0.5, pred = 0.5 (inside the clip window): d spike / d pred = sg(c).
  _, g_pred = _grads(spec, c - 0.5, 0.5)
  assert float(g_pred) == pytest.approx(expected, rel=1e-5, abs=1e-7)
  # Differentiated reset: d state'/d pred = 1 - sg(c).
  _, g_pred = _grads(spec, c - 0.5, 0.5, g_spike=0.0, g_state=1.0)
  assert float(g_pred) == pytest.approx(1.0 - expected, rel=1e-5, abs=1e-6)


def test_surrogate_zero_outside_clip_window():
  for spec in ("triangle", "sigmoid", "atan"):
    _, g_pred = _grads(spec, 0.5, 1.5)
    assert float(g_pred) == 0.0


@pytest.mark.parametrize("spec", ["ste+leak:0.25", "atan+leak:0.25"])
@pytest.mark.parametrize("pred,clip_grad", [(-0.1, 0.25), (0.5, 1.0), (1.2, 0.25)])
def test_leak_scales_the_gradient_outside_the_clip_window(spec, pred, clip_grad):
  g_state, g_pred = _grads(spec, 0.0, pred)
  _, g_pred_in = _grads(spec.split("+")[0], 0.0, min(max(pred, 0.0), 1.0))  # same c, no leak
  assert float(g_pred) == pytest.approx(clip_grad * float(g_pred_in), rel=1e-6)
  assert float(g_state) == pytest.approx(float(g_pred_in), rel=1e-6)  # the state path: no clip
  # The forward is the plain bddi's: the leak changes gradients only.
  assert [float(x) for x in bddi(jnp.float32(0.0), jnp.float32(pred), spec)] == \
      [float(x) for x in bddi(jnp.float32(0.0), jnp.float32(pred), "ste")]


def test_get_surrogate_parses_and_rejects():
  assert get_surrogate("atan:3").param == 3.0
  assert get_surrogate("triangle").param == 1.0
  assert get_surrogate("ste").leak == 0.0
  assert get_surrogate("ste+leak:0.1") == bitnet_jax.Surrogate("ste", None, 0.1)
  assert get_surrogate("atan:3+leak:1") == bitnet_jax.Surrogate("atan", 3.0, 1.0)
  for bad, match in [("relu", "unknown surrogate"), ("atan:x", "must be a number"),
                     ("triangle:-1", "must be > 0"), ("ste:2", "takes no parameter"),
                     (3, "must be a string"), ("ste+leak:2", "alpha in \\[0, 1\\]"),
                     ("ste+leek:0.1", "expected '\\+leak:<alpha>'"), ("ste+leak:x", "e.g. 'ste")]:
    with pytest.raises(ValueError, match=match):
      get_surrogate(bad)


def test_bddi_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="same shape"):
    bddi(jnp.zeros(3), jnp.zeros(4))
