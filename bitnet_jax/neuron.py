"""The bddi neuron: one integrate-and-fire step of the original release, with surrogate gradients.

Forward (exactly the release, see docs/ORIGINAL.md), elementwise and in the input dtype:

    p      = clip(pred, 0, 1)
    c      = state + p
    spike  = 1 if c >= 1 else 0          # threshold 1; the spike value equals the threshold
    state' = c - spike                    # reset by subtraction

Backward: the Heaviside step has no useful derivative, so a *surrogate* sg(c) = d spike / d c
stands in for it. The reset is differentiated with the same surrogate, d state' / d c = 1 - sg(c),
and the clip passes gradient inside its window, d p / d pred = 1[0 <= pred <= 1] (both ends
included), and `leak` times it outside (default 0: the clip's own derivative). With x = c - 1
(distance to the threshold):

    ste        sg = 1                                         (straight-through)
    triangle   sg = max(0, 1 - |x| / w) / w                   (width w, default 1)
    sigmoid    sg = a * s * (1 - s),  s = sigmoid(a * x)      (steepness a, default 4)
    atan       sg = (a / 2) / (1 + (pi * a * x / 2) ** 2)     (steepness a, default 2)

Every default has sg(threshold) = 1. For `ste`, d state'/d c = 0: gradient does not pile up
through the membrane over time, and d count / d pred_t = 1 inside the clip window (the rate view).
A surrogate is named by a string, optionally with its parameter and a clip leak:
"triangle", "triangle:0.5", "atan:4", "ste+leak:0.1". The `ste` backward keeps only a boolean
mask as residual (1 byte per neuron).

Why a leak: with leak 0, a neuron whose pred leaves [0, 1] at every step (silent, or firing at
every step) gets no gradient at all and can stay there for good (docs/fashion_mnist_study.md).
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

_DEFAULT_PARAM = {"ste": None, "triangle": 1.0, "sigmoid": 4.0, "atan": 2.0}


def _ste(x, _):
  return jnp.ones_like(x)


def _triangle(x, w):
  return jnp.maximum(0.0, 1.0 - jnp.abs(x) / w) / w


def _sigmoid(x, a):
  s = jax.nn.sigmoid(a * x)
  return a * s * (1.0 - s)


def _atan(x, a):
  return (a / 2.0) / (1.0 + (math.pi * a * x / 2.0) ** 2)


_DERIVATIVES: dict[str, Callable] = {
    "ste": _ste, "triangle": _triangle, "sigmoid": _sigmoid, "atan": _atan}
SURROGATES = tuple(_DERIVATIVES)


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A named surrogate derivative sg(c) of the spike, and the clip's gradient outside its window
  (`leak`); hashable, so usable as a static argument."""
  name: str
  param: float | None = None
  leak: float = 0.0

  def clip_grad(self, window: jax.Array, g: jax.Array) -> jax.Array:
    """d loss / d pred from d loss / d p: g inside the clip window, leak * g outside."""
    return jnp.where(window, g, self.leak * g if self.leak else 0).astype(g.dtype)

  def derivative(self, c: jax.Array) -> jax.Array:
    """sg(c) = d spike / d c, evaluated at membrane values c (any shape)."""
    return _DERIVATIVES[self.name](c - 1.0, self.param).astype(c.dtype)


def get_surrogate(spec: "str | Surrogate") -> Surrogate:
  """Parses "name[:param][+leak:alpha]" (e.g. "triangle:0.5", "ste+leak:0.1") into a `Surrogate`."""
  if isinstance(spec, Surrogate):
    return spec
  if not isinstance(spec, str):
    raise ValueError(f"surrogate must be a string such as 'ste' or 'atan:2', got {spec!r}")
  spec, _, leak_spec = spec.partition("+")
  leak = _parse_leak(spec, leak_spec) if leak_spec else 0.0
  name, _, param = spec.partition(":")
  if name not in _DERIVATIVES:
    raise ValueError(f"unknown surrogate {spec!r}: expected one of {SURROGATES}, "
                     "optionally with ':<param>' (e.g. 'triangle:0.5')")
  if name == "ste":
    if param:
      raise ValueError(f"surrogate 'ste' takes no parameter, got {spec!r}")
    return Surrogate("ste", leak=leak)
  try:
    value = float(param) if param else _DEFAULT_PARAM[name]
  except ValueError:
    raise ValueError(f"surrogate parameter in {spec!r} must be a number") from None
  if not value > 0:
    raise ValueError(f"surrogate parameter in {spec!r} must be > 0, got {value}")
  return Surrogate(name, value, leak)


def _parse_leak(spec: str, leak_spec: str) -> float:
  """The alpha of a "+leak:alpha" suffix: a number in [0, 1]."""
  key, _, alpha = leak_spec.partition(":")
  try:
    value = float(alpha)
  except ValueError:
    value = None
  if key != "leak" or value is None or not 0 <= value <= 1:
    raise ValueError(f"surrogate suffix '+{leak_spec}' of {spec!r}: expected '+leak:<alpha>' "
                     "with alpha in [0, 1], e.g. 'ste+leak:0.1'")
  return value


def _forward(state, pred):
  c = state + jnp.clip(pred, 0, 1)
  spike = (c >= 1).astype(c.dtype)
  return spike, c - spike, c


@functools.cache
def _bddi_fn(surrogate: Surrogate):
  """Builds the custom-VJP neuron for one surrogate (cached: one function per surrogate)."""

  @jax.custom_vjp
  def neuron(state, pred):
    spike, new_state, _ = _forward(state, pred)
    return spike, new_state

  def fwd(state, pred):
    spike, new_state, c = _forward(state, pred)
    window = (pred >= 0) & (pred <= 1)  # bool: the clip's pass-through mask
    # `ste` needs no membrane value: keep the backward residual at one byte per neuron.
    residual = (window,) if surrogate.name == "ste" else (window, c)
    return (spike, new_state), residual

  def bwd(residual, cotangents):
    g_spike, g_state = cotangents
    window = residual[0]
    if surrogate.name == "ste":
      g_c = g_spike  # sg = 1, so the reset cancels the state path: d state'/dc = 0.
    else:
      sg = surrogate.derivative(residual[1])
      g_c = g_spike * sg + g_state * (1 - sg)
    return g_c, surrogate.clip_grad(window, g_c)

  neuron.defvjp(fwd, bwd)
  return neuron


def bddi(state: jax.Array, pred: jax.Array, surrogate: "str | Surrogate" = "ste"):
  """One bddi step for a layer: integrate `pred`, fire at threshold 1, reset by subtraction.

  Args:
    state: membrane state before the step, in [0, 1); same shape as `pred`.
    pred: the layer's synaptic output (conv or linear) for this step, before clipping.
    surrogate: name of the surrogate gradient ("ste", "triangle", "sigmoid", "atan", optionally
      "name:param"), or a `Surrogate`.

  Returns:
    (spike, new_state): spike in {0, 1} and the state after reset, both in the input dtype.
  """
  state, pred = jnp.asarray(state), jnp.asarray(pred)
  if state.shape != pred.shape:
    raise ValueError(f"bddi: state and pred must have the same shape, got {state.shape} and "
                     f"{pred.shape}")
  return _bddi_fn(get_surrogate(surrogate))(state.astype(pred.dtype), pred)


# ------------------------------------------------------------------------------------------
# A layer of neurons through time: the dense backend of the layer contract (`layers.py`) and the
# fused kernels' reference (their vjp differentiates it).


def _reduce_max(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool over the H, W axes of (..., H, W, C), autodiff's (reduce_window)."""
  dims = (1,) * (x.ndim - 3) + (2, 2, 1)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")


@jax.custom_vjp
def maxpool(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool over the H, W axes of (..., H, W, C), for any real x: 0/1 spikes (a
  logical OR) or the ReLU twin's activations.

  Its backward routes each window's gradient to the window's first maximal element in row-major
  order: the choice of XLA's select-and-scatter (autodiff of `_reduce_max`), so the gradient is
  bitwise autodiff's, for every finite input (tested on spikes and on real values with ties).
  The residual is one bool per input, "equals its window's maximum", where autodiff keeps a
  float copy of the input and, on CPU, builds int32 scatter indices several times the size of
  the layer (about half a second of a 1.04 s sparse train step, T = 10, fs = 1, batch 32,
  2026-12-02: the per-op totals that `python -m benchmarks.profile_ops --mode train --synapses
  sparse --remat none` prints).
  """
  return _reduce_max(x)


def _windows(x: jax.Array) -> jax.Array:
  """(..., H, W, C) -> (..., H/2, 2, W/2, 2, C): the 2x2 windows of the pool."""
  *lead, h, w, c = x.shape
  return x.reshape(*lead, h // 2, 2, w // 2, 2, c)


def _maxpool_fwd(x):
  out = _reduce_max(x)                                     # (..., H/2, W/2, C)
  is_max = _windows(x) == out[..., :, None, :, None, :]    # bool (..., H/2, 2, W/2, 2, C)
  return out, is_max


def _maxpool_bwd(is_max, g):
  a, b = is_max[..., 0, :, 0, :], is_max[..., 0, :, 1, :]  # (..., H/2, W/2, C) each
  c_, d = is_max[..., 1, :, 0, :], is_max[..., 1, :, 1, :]
  first = a                                               # the first maximum, row-major
  second = ~a & b
  third = ~a & ~b & c_
  fourth = ~a & ~b & ~c_ & d
  zero = jnp.zeros((), g.dtype)
  parts = [jnp.where(sel, g, zero) for sel in (first, second, third, fourth)]
  top = jnp.stack(parts[:2], -2)                          # (..., H/2, W/2, 2, C): dx = 0, 1
  bottom = jnp.stack(parts[2:], -2)
  out = jnp.stack([top, bottom], -4)                      # (..., H/2, 2, W/2, 2, C)
  *lead, h2, _, w2, _, c = is_max.shape
  return (out.reshape(*lead, 2 * h2, 2 * w2, c),)


maxpool.defvjp(_maxpool_fwd, _maxpool_bwd)


# Steps at most this many (the scan engine's one step, chunks, short T) are unrolled (no loop):
# XLA then fuses the steps' elementwise work and writes each step's spikes in place, instead of a
# loop that stacks them one slice at a time.
_UNROLL = 16


def over_time(state: jax.Array, surrogate: Surrogate, preds: "jax.Array | None" = None,
              const: "jax.Array | None" = None, length: "int | None" = None,
              valid: "jax.Array | None" = None):
  """Steps one layer's bddi neurons through time (a `lax.scan` of `bddi`).

  Args:
    state: (B, ...) membranes before the first step.
    surrogate: the parsed `Surrogate`.
    preds: (n, B, ...) synaptic outputs, one per step; or None with `const`.
    const: (B, ...) one synaptic output for every step (the first layer); with `length`.
    length: n, when `preds` is None.
    valid: None (every step runs), or an int32 scalar (a runtime value: the compiled shapes do
      not depend on it): only the first `valid` steps run. A later, masked step leaves the
      membranes unchanged and emits no spike, so it counts nothing and contributes exactly zero
      gradient (the padding of a last, partial chunk; see `engines._over_chunks`).

  Returns:
    ((n, B, ...) spikes, the final state).
  """
  fire = _bddi_fn(surrogate)

  def step(s, pred):
    spike, s = fire(s, const if pred is None else pred)
    return s, spike

  n = length if preds is None else preds.shape[0]
  if valid is None:
    state, spikes = jax.lax.scan(step, state, preds, length=length, unroll=n <= _UNROLL)
    return spikes, state

  def masked_step(s, xs):
    pred, t = xs
    new_s, spike = step(s, pred)
    on = t < valid                                           # () bool: a step that runs
    return jnp.where(on, new_s, s), jnp.where(on, spike, jnp.zeros((), spike.dtype))

  state, spikes = jax.lax.scan(masked_step, state, (preds, jnp.arange(n, dtype=jnp.int32)),
                               unroll=n <= _UNROLL)
  return spikes, state


def layer_over_time(state: jax.Array, surrogate: Surrogate, pool: bool,
                    preds: "jax.Array | None" = None, const: "jax.Array | None" = None,
                    length: "int | None" = None, valid: "jax.Array | None" = None):
  """`over_time`, then the layer's max pool and its spike count.

  Returns:
    (out, state, count): (n, B, ...) spikes, pooled if `pool`; the final state; (B,) spikes per
    image over the n steps, before pooling. (The dense form of `spike_conv.layer`.)
  """
  spikes, state = over_time(state, surrogate, preds, const, length, valid)
  return (maxpool(spikes) if pool else spikes), state, per_image(spikes)


def per_image(spikes: jax.Array, batch_axis: int = 1) -> jax.Array:
  """Spikes per image, (B,): the sum over every axis but `batch_axis` (1 after the time axis)."""
  return spikes.sum(tuple(a for a in range(spikes.ndim) if a != batch_axis))
