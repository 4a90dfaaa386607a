"""Convolutions of 0/1 spikes that skip the zeros, for XLA:CPU (`csrc/spike_conv.cc`).

- `conv(spikes, kernel)` equals the 3x3 'SAME' convolution of `models._linear` (up to summation
  order): per output position it adds only the kernel rows of the active inputs around it, so
  its cost scales with the number of spikes instead of the number of inputs.
- `layer(spikes, kernel, bias, state, pool, surrogate, valid=None)` runs a spiking conv layer over
  the T time steps of its input spikes (T, N, H, W, Ci) in one call: at each step that synapse,
  the bias and the bddi neuron (`neuron.bddi`), then the 2x2 max pool and the per-image spike
  count. `valid`, a runtime int32 operand, masks the steps past it (a padded last chunk).
  The membranes stay in the L1 cache across steps and no float32 pre-activation is stored. Both
  engines run sparse models through it (`scan` with T = 1, `parallel` once per chunk);
- `neuron(pred, state, steps, pool, surrogate, valid=None)`: the same without the synapse, for a
  constant pred (the first layer, whose input is the image).
- `neuron_steps(preds, state, valid=None)`: the neuron alone over a pred per step (the
  training forward of `lean.py`, whose synapse ran over all steps at once), forward only: in
  one pass, where a scan writes every step into a zero-filled stack.

They differentiate as the dense computations do (`jax.custom_vjp`), so a model that uses them
trains, and the backward skips zeros too: `layer` recomputes its synapse with `conv` (the same
sums as the forward, so the same spikes), whose vjp is

- `input_grad(g, kernel)`: the convolution of the output's cotangent with the flipped kernel,
  adding per position only the rows of g's nonzero entries, each times its value (under the
  `ste` clip window and the max pool's routing, most of g is zero);
- `kernel_grad(x, g)`: per active input, the cotangent rows of the outputs it feeds, added into
  the kernel's gradient; rows of g that are zero are skipped.

`neuron`'s backward is elementwise (jnp). Under a jit whose batch is sharded over several
devices (data parallelism), each device's kernel runs on its own images only (`partition.py`);
`kernel_grad` then adds the devices' sums. The C++ is built on first use
(`shared_library.py`): `available()` says whether it can run here and why not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import neuron as bitnet_neuron  # this module's `neuron` is the fused op
from bitnet_jax.kernels import partition
from bitnet_jax.kernels.shared_library import available, check_available  # noqa: F401


def _dense(x, kernel):
  """The dense convolution that `conv` equals, at `HIGHEST` like the kernel's float32 sums (sparse
  synapses run on CPU only, where the module's `precision` changes nothing)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


def _over_steps(op: str, x: jax.Array, other: jax.Array) -> jax.Array:
  """The partitioned `op` of x, (N, ...) or (T, N, ...), and `other` (the kernel; for
  `kernel_grad` the cotangent, shaped like x); its result for x's shape."""
  steps = x.ndim == 5
  if not steps:  # one step
    x, other = x[None], other[None] if op == "kernel_grad" else other
  out = partition.batch_partitioned(op, np.dtype(other.dtype))(x, other)
  return out if steps or op == "kernel_grad" else out[0]


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution (no bias) of 0/1 spikes, skipping the zeros.

  Args:
    x: (N, H, W, Ci) spikes, values 0 or 1, float32 or float64; or (T, N, H, W, Ci), T steps
      of them (the same as (T * N, H, W, Ci), but a device of a batch-sharded jit gets its own
      images of every step).
    kernel: (3, 3, Ci, Co) HWIO kernel of x's dtype.

  Returns:
    (N, H, W, Co) (or (T, N, H, W, Co)) in x's dtype.
  """
  _check("conv", x, kernel)
  return _over_steps("conv", x, kernel)


def _check(op, x, kernel, *more):
  """Raises ValueError unless x, kernel (and `more`) are a valid float32/float64 input."""
  if x.ndim not in (4, 5) or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"spike_conv.{op}: expected (N, H, W, Ci) (or (T, N, H, W, Ci)) spikes and "
                     f"a (3, 3, Ci, Co) kernel, got {x.shape} and {kernel.shape}")
  dtypes = {jnp.dtype(a.dtype) for a in (x, kernel, *more)}
  if len(dtypes) != 1 or dtypes.pop() not in partition.SUFFIX:
    raise ValueError(f"spike_conv.{op}: all inputs must be float32, or all float64, got "
                     f"{', '.join(str(a.dtype) for a in (x, kernel, *more))}")
  check_available()


def _conv_fwd(x, kernel):
  return conv(x, kernel), (x.astype(jnp.bool_), kernel)


def _conv_bwd(residual, g):
  """The dense convolution's gradients (up to summation order), skipping zeros: the input
  gradient through `input_grad` (g is mostly zeros under the ste window and the max pool's
  routing), the kernel gradient through `kernel_grad` (the inputs are mostly zeros)."""
  x, kernel = residual
  g = g.astype(kernel.dtype)
  return input_grad(g, kernel), kernel_grad(x, g)


conv.defvjp(_conv_fwd, _conv_bwd)


def input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """The input gradient of a 3x3 'SAME' convolution, adding only the rows of g's nonzeros.

  It is the convolution of g with the kernel flipped in space, its channel axes swapped,
  computed by the kernel of `conv` on real values: per output position, the rows of the nonzero
  entries of g around it, each times its value.

  Args:
    g: (N, H, W, Co) (or (T, N, H, W, Co), as in `conv`) cotangent of the convolution's
      output, float32 or float64.
    kernel: (3, 3, Ci, Co) HWIO kernel of g's dtype.

  Returns:
    (N, H, W, Ci) (or (T, N, H, W, Ci)): what autodiff of the dense convolution gives, up to
    summation order.
  """
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (3, 3, Co, Ci)
  _check("input_grad", g, flipped)
  return _over_steps("sparse_conv", g, flipped)


def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The kernel gradient of the 3x3 'SAME' convolution of 0/1 spikes x, visiting active inputs.

  dK[dy, dx, c, :] = the sum of g[n, y, x, :] over the positions where x[n, y + dy - 1,
  x + dx - 1, c] is 1; rows of g that are zero are skipped too.

  Args:
    x: (N, H, W, Ci) (or (T, N, H, W, Ci), as in `conv`) spikes, bool (or 0/1 values of any
      dtype, made bool here).
    g: (N, H, W, Co) (or (T, N, H, W, Co)) cotangent of the convolution's output, float32 or
      float64.

  Returns:
    (3, 3, Ci, Co) in g's dtype: what autodiff of the dense convolution gives, up to summation
    order. Under a batch-sharded jit, each device sums its own images and the sums are added.
  """
  if x.ndim not in (4, 5) or g.ndim != x.ndim or x.shape[:-1] != g.shape[:-1]:
    raise ValueError(f"spike_conv.kernel_grad: expected (N, H, W, Ci) (or (T, N, H, W, Ci)) "
                     f"spikes and a cotangent of the same shape but its channels, got {x.shape} "
                     f"and {g.shape}")
  if np.dtype(g.dtype) not in partition.SUFFIX:
    raise ValueError(f"spike_conv.kernel_grad: the cotangent must be float32 or float64, got "
                     f"{g.dtype}")
  check_available()
  return _over_steps("kernel_grad", x.astype(jnp.bool_), g)


def _layer_over_time(state, pool, surrogate, valid, **preds):
  """`neuron.layer_over_time` (the dense engine's layer) with the bddi neuron of `surrogate`."""
  return bitnet_neuron.layer_over_time(state, bitnet_neuron.get_surrogate(surrogate), pool,
                                       valid=valid, **preds)


def _dense_steps(x, kernel):
  """`_dense` of (T, N, H, W, Ci) spikes: (T, N, H, W, Co)."""
  out = _dense(x.reshape((-1,) + x.shape[2:]), kernel)
  return out.reshape(x.shape[:2] + out.shape[1:])


def _layer_dense(x, kernel, bias, state, pool, surrogate, valid=None, synapse=_dense_steps):
  """What `layer` computes, with the dense convolution. `synapse` (of (T, N, ...) spikes)
  chooses the convolution: `layer`'s backward differentiates this with `conv`, whose sums are
  those of `layer`'s kernel (so the recomputed spikes are the forward's) and whose gradients
  skip zeros."""
  pred = synapse(x, kernel) + bias  # (T, N, H, W, Co)
  return _layer_over_time(state, pool, surrogate, valid, preds=pred)


def _neuron_dense(pred, state, steps, pool, surrogate, valid=None):
  """What `neuron` computes, in jnp (its backward differentiates this)."""
  return _layer_over_time(state, pool, surrogate, valid, const=pred, length=steps)


def _check_valid(op: str, valid):
  """Raises ValueError unless `valid` is None or an integer scalar."""
  if valid is not None and (jnp.ndim(valid) != 0 or
                            not jnp.issubdtype(jnp.result_type(valid), jnp.integer)):
    raise ValueError(f"spike_conv.{op}: valid (the number of steps that run) must be None or an "
                     f"integer scalar, got {getattr(valid, 'shape', ())} "
                     f"{jnp.result_type(valid)}")


def _valid_operand(valid, steps: int) -> jax.Array:
  """The kernels' int32 scalar operand: the steps that run (all of them when `valid` is None)."""
  return jnp.asarray(steps if valid is None else valid, jnp.int32)


def layer(x, kernel, bias, state, pool: bool, surrogate: str, valid=None):
  """A spiking 3x3 conv layer over the time steps of its 0/1 input spikes, skipping the zeros.

  Args:
    x: (T, N, H, W, Ci) input spikes (0/1), float32 or float64.
    kernel: (3, 3, Ci, Co) HWIO kernel; bias: (Co,); state: (N, H, W, Co) membranes before the
      first step; all of x's dtype.
    pool: apply the 2x2 max pool to the output spikes.
    surrogate: the bddi surrogate (only the backward uses it).
    valid: None (all T steps run), or an integer scalar, a runtime operand (the compiled call
      does not depend on its value): only the first `valid` steps run; a later step leaves the
      membranes unchanged, emits no spike, counts nothing and has zero gradient
      (`neuron.over_time`). The kernel skips those steps' work.

  Returns:
    (spikes, state, count): (T, N, H/2, W/2, Co) or (T, N, H, W, Co) spikes, the (N, H, W, Co)
    membranes after the last step, (N,) spikes per image over the T steps, before pooling.
  """
  if x.ndim != 5:
    raise ValueError(f"spike_conv.layer: expected (T, N, H, W, Ci) spikes, got {x.shape}")
  _check("layer", jax.ShapeDtypeStruct(x.shape[1:], x.dtype), kernel, bias, state)
  co = kernel.shape[3]
  if state.shape != x.shape[1:4] + (co,) or bias.shape != (co,):
    raise ValueError(f"spike_conv.layer: expected a ({co},) bias and an {x.shape[1:4] + (co,)} "
                     f"state for spikes {x.shape} and kernel {kernel.shape}, got {bias.shape} "
                     f"and {state.shape}")
  _check_valid("layer", valid)
  return _layer(x, kernel, bias, state, valid, pool, surrogate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _layer(x, kernel, bias, state, valid, pool, surrogate):
  """`layer` after its checks; `valid` may be None (a pytree without leaves)."""
  del surrogate  # the forward does not depend on it
  operands = (x, kernel, bias, state, _valid_operand(valid, x.shape[0]))
  return tuple(partition.batch_partitioned("layer", np.dtype(x.dtype), pool)(*operands))


def _layer_fwd(x, kernel, bias, state, valid, pool, surrogate):
  out = _layer(x, kernel, bias, state, valid, pool, surrogate)
  return out, (x.astype(jnp.bool_), kernel, bias, state, valid)


def _layer_bwd(pool, surrogate, residual, g):
  x, kernel, bias, state, valid = residual
  f = lambda *args: _layer_dense(*args, pool, surrogate, valid, synapse=conv)
  _, vjp = jax.vjp(f, x.astype(kernel.dtype), kernel, bias, state)
  return vjp(g) + (None,)  # valid: an integer, no cotangent


_layer.defvjp(_layer_fwd, _layer_bwd)


def neuron(pred, state, steps: int, pool: bool, surrogate: str, valid=None):
  """`steps` bddi steps of a layer whose pred is constant (the first layer).

  Args:
    pred: (N, H, W, C) synaptic input (before the clip), float32 or float64.
    state: (N, H, W, C) membranes, pred's dtype.
    steps, pool, surrogate: time steps T; as in `layer`.
    valid: as in `layer`.

  Returns:
    (spikes, state, count) as in `layer`.
  """
  if pred.ndim != 4 or pred.shape != state.shape or pred.dtype != state.dtype or (
      np.dtype(pred.dtype) not in partition.SUFFIX):
    raise ValueError(f"spike_conv.neuron: expected (N, H, W, C) pred and state of one dtype, "
                     f"float32 or float64, got {pred.shape} {pred.dtype} and {state.shape} "
                     f"{state.dtype}")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"spike_conv.neuron: steps must be an int >= 1, got {steps!r}")
  _check_valid("neuron", valid)
  check_available()
  return _neuron(pred, state, valid, steps, pool, surrogate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _neuron(pred, state, valid, steps, pool, surrogate):
  """`neuron` after its checks."""
  del surrogate  # the forward does not depend on it
  return tuple(partition.batch_partitioned("neuron", np.dtype(pred.dtype), pool, steps)(
      pred, state, _valid_operand(valid, steps)))


def _neuron_fwd(pred, state, valid, steps, pool, surrogate):
  return _neuron(pred, state, valid, steps, pool, surrogate), (pred, state, valid)


def _neuron_bwd(steps, pool, surrogate, residual, g):
  pred, state, valid = residual
  _, vjp = jax.vjp(lambda *args: _neuron_dense(*args, steps, pool, surrogate, valid), pred, state)
  return vjp(g) + (None,)  # valid: an integer, no cotangent


_neuron.defvjp(_neuron_fwd, _neuron_bwd)


def neuron_steps(preds, state, valid=None):
  """The bddi neuron over the time steps of its preds, in one kernel call; forward only.

  Bitwise `neuron.over_time(state, surrogate, preds, valid=valid)` (every surrogate's forward is
  the same), without the scan's zero-filled (T, N, H, W, C) stack of outputs and its per-step
  writes. It has no gradient: `lean.py` differentiates it with its own elementwise rule.

  Args:
    preds: (T, N, H, W, C) synaptic outputs (before the clip), float32 or float64.
    state: (N, H, W, C) membranes before the first step, preds' dtype.
    valid: as in `layer`.

  Returns:
    ((T, N, H, W, C) spikes, the (N, H, W, C) membranes after the last step).
  """
  if preds.ndim != 5 or preds.shape[1:] != state.shape or preds.dtype != state.dtype or (
      np.dtype(preds.dtype) not in partition.SUFFIX):
    raise ValueError(f"spike_conv.neuron_steps: expected (T, N, H, W, C) preds and an (N, H, W, "
                     f"C) state of one dtype, float32 or float64, got {preds.shape} "
                     f"{preds.dtype} and {state.shape} {state.dtype}")
  _check_valid("neuron_steps", valid)
  check_available()
  spikes, state, _ = partition.batch_partitioned("neuron_steps", np.dtype(preds.dtype), False)(
      preds, state, _valid_operand(valid, preds.shape[0]))
  return spikes, state
