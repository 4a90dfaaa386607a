"""The lean `ste` backend of the layer contract (`layers.py`), for `remat="stream"`.

`engines.run(..., engine="parallel", remat="stream")` runs the chunk loop with these layers inside
a `custom_vjp` whose backward re-runs the chunks one at a time (training memory independent of
T). Why that is exact: with the `ste` surrogate the neuron's backward ignores the membrane's
cotangent (d state'/d c = 0, see `neuron.py`), so no gradient crosses from one time step to the
next, and the gradient of a run is the sum over chunks of each chunk's own vjp, given the
membrane states at the chunk's start. Other surrogates pass gradient through the membrane across
chunks; `stream` rejects them (`check_surrogate`).

Inside a chunk, two small `custom_vjp`s keep the backward lean and loop-friendly (and
`neuron.maxpool` a third, in every backend):

- `_spike_synapse` (a conv or the linear layer on 0/1 spikes) keeps its input as `bool` (one
  byte instead of four) for the weight gradient; it computes the input gradient as a plain
  forward convolution with the flipped kernel (autodiff's transposed convolution runs 4-5x
  slower inside a loop body on XLA:CPU, jax issue #12868) and, on CPU, the weight gradient as
  nine shifted matrix products (XLA:CPU's convolution-backprop-filter is 2-5x slower at these
  shapes, and slower still in a loop). A sparse module's synapse is `kernels.spike_conv.conv`,
  whose own vjp skips zeros;
- `_neuron_over_time` keeps the neuron's clip window as `bool` and differentiates elementwise:
  under `ste` nothing crosses time steps, so no reverse scan is needed. It is the `ste` case of
  `neuron.over_time`'s backward (autodiff of the per-step `bddi`), written without the loop.

Both give the autodiff results (the convolution gradients up to float summation order; tested
over their whole domains: 0/1 inputs for the synapse, any pred for the neuron).
"""

import functools

import jax
import jax.numpy as jnp

from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv


def check_surrogate(surrogate) -> None:
  """Raises ValueError unless `surrogate` is `ste`, the only one `stream` is exact for."""
  if neuron.get_surrogate(surrogate).name != "ste":
    raise ValueError(
        f"remat='stream' needs the 'ste' surrogate (the membrane then carries no gradient "
        f"between time steps, so chunks can be differentiated one at a time), got surrogate="
        f"{surrogate!r}; use remat='none' or 'chunk' with this surrogate")


# ------------------------------------------------------------------------------------------
# Layers whose inputs are spikes (exactly 0 or 1): keep those inputs as bool for the backward.
# Only for such inputs: a bool copy of anything else would be wrong.


def _sum_leading(x: jax.Array) -> jax.Array:
  """x.sum(0), as a product with a vector of ones.

  XLA:CPU reduces over a leading axis with many kept elements very slowly (0.4 GB/s measured:
  225 ms for a (10, 2M) float32 sum, against 4 ms for this product); `HIGHEST` keeps it in
  full float32 on GPUs, whose default would round the operands to TF32. It stays `HIGHEST`
  whatever the module's `precision`: a sum is no synapse, and a product with a vector is cheap.
  """
  ones = jnp.ones(x.shape[:1], x.dtype)
  return jnp.tensordot(ones, x, 1, precision=jax.lax.Precision.HIGHEST)


def _kernel_grad_taps(x: jax.Array, g: jax.Array,
                      precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Weight gradient of a 3x3, stride-1, pad-1 NHWC/HWIO convolution as 9 matrix products.

  dK[dy, dx] = sum_{n,h,w} x_pad[n, h+dy, w+dx, :]^T g[n, h, w, :]. The taps run in a loop, so
  only one shifted copy of x exists at a time, and each product is split into up to 16
  independent slices of the summed axis (a batched product, then a sum), which lets XLA:CPU run
  the long, thin contraction on all cores.

  Args:
    x: (N, H, W, Ci) layer input, any dtype (bool for spikes).
    g: (N, H, W, Co) cotangent of the layer output.
    precision: of the products (the module's `lax_precision`).

  Returns:
    (3, 3, Ci, Co) in float32 (float64 for a float64 g).
  """
  n, h, w, ci = x.shape
  co = g.shape[-1]
  rows = n * h * w
  dtype = jnp.promote_types(g.dtype, jnp.float32)
  split = next(p for p in (16, 8, 4, 2, 1) if rows % p == 0)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # bool: the float copy is made per tap
  g = g.astype(dtype).reshape(split, rows // split, co)

  def tap(_, k):  # k = 3 * dy + dx
    xs = jax.lax.dynamic_slice(xp, (0, k // 3, k % 3, 0), (n, h, w, ci))
    xs = xs.astype(dtype).reshape(split, rows // split, ci)
    return None, _sum_leading(jax.lax.dot_general(xs, g, (((1,), (1,)), ((0,), (0,))),
                                                  precision=precision))

  _, taps = jax.lax.scan(tap, None, jnp.arange(9))
  return taps.reshape(3, 3, ci, co)


def _conv_input_grad(g: jax.Array, kernel: jax.Array, dtype,
                     precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Input gradient of a 3x3, stride-1, pad-1 NHWC/HWIO convolution, as a forward convolution.

  The transpose of the convolution is the convolution with the kernel flipped in space and its
  in/out channels swapped. Written as a plain forward convolution it runs at full speed inside
  a loop body on XLA:CPU (autodiff's transposed form is 4-5x slower there, jax issue #12868),
  and outside a loop it gives the same result (bitwise, on CPU).

  Args:
    g: (N, H, W, Co) cotangent of the layer output.
    kernel: (3, 3, Ci, Co).
    dtype: the layer's compute dtype.
    precision: the module's `lax_precision` (autodiff's transpose would inherit the forward's).

  Returns:
    (N, H, W, Ci) in `dtype`.
  """
  flipped = jnp.flip(kernel.astype(dtype), (0, 1)).swapaxes(2, 3)  # (3, 3, Co, Ci)
  return jax.lax.conv_general_dilated(g.astype(dtype), flipped, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _spike_synapse(module, name, layer_params, x):
  """`module.synapse(name, x)` for an input x of 0/1 values, keeping x as bool for the backward."""
  return module.apply({"params": {name: layer_params}}, name, x, method=module.synapse)


def _spike_synapse_fwd(module, name, layer_params, x):
  return _spike_synapse(module, name, layer_params, x), (layer_params, x.astype(jnp.bool_))


def _spike_synapse_bwd(module, name, residual, g):
  layer_params, x_bool = residual
  x = x_bool.astype(g.dtype)  # exact: the input was 0/1
  synapse = lambda p, x: module.apply({"params": {name: p}}, name, x, method=module.synapse)
  _, vjp = jax.vjp(synapse, layer_params, x)
  g_params, g_x = vjp(g)
  if name != "mlp1" and not module.sparse:  # sparse: `spike_conv.conv`'s own zero-skipping vjp
    g_x = _conv_input_grad(g, layer_params["kernel"], module.dtype,
                           module.lax_precision).astype(g_x.dtype)
    native = lambda x, g: g_params["kernel"]
    taps = lambda x, g: _kernel_grad_taps(x, g, module.lax_precision).astype(
        g_params["kernel"].dtype)
    kernel = jax.lax.platform_dependent(x_bool, g, cpu=taps, default=native)
    g_params = dict(g_params, kernel=kernel)
  return g_params, g_x


_spike_synapse.defvjp(_spike_synapse_fwd, _spike_synapse_bwd)


# ------------------------------------------------------------------------------------------
# The neuron through time, and the layers of a chunk.


def _step_through_time(state, preds, const, length, surrogate, valid, fused):
  """The bddi forward of one layer through time: (n, ...) spikes, final state, bool window.
  `fused`: in one call of the C++ kernels (bitwise the same), not a scan."""
  if fused and preds is not None:
    spikes, state = spike_conv.neuron_steps(preds, state, valid)
  elif fused:
    spikes, state, _ = spike_conv.neuron(const, state, length, False, surrogate.name, valid)
  else:
    spikes, state = neuron.over_time(state, surrogate, preds, const, length, valid)
  pred = const if preds is None else preds
  return spikes, state, (pred >= 0) & (pred <= 1)  # window: the clip's pass-through mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _neuron_over_time(state, preds, valid, length, surrogate, fused=False):
  """Steps one layer's `ste` neurons through time.

  Args:
    state: (B, ...) membrane states before the first step.
    preds: (n, B, ...) synaptic outputs of the n steps, or (B, ...), the same at every step.
    valid: None, or an int32 scalar >= 1: only the first `valid` steps run, later ones are
      masked (`neuron.over_time`).
    length: n.
    surrogate: the `ste` `neuron.Surrogate` (its clip leak is used in the backward).
    fused: step the neurons in the C++ kernels (`spike_conv.neuron_steps`, `spike_conv.neuron`:
      the sparse modules' forward; bitwise the scan's), not in a `lax.scan`.

  Returns:
    (n, B, ...) spikes and the final state.
  """
  return _neuron_over_time_fwd(state, preds, valid, length, surrogate, fused)[0]


def _neuron_over_time_fwd(state, preds, valid, length, surrogate, fused=False):
  const = preds.ndim == state.ndim
  spikes, state, window = _step_through_time(state, None if const else preds,
                                             preds if const else None, length, surrogate, valid,
                                             fused)
  return (spikes, state), (window, valid)


def _neuron_over_time_bwd(length, surrogate, fused, residual, cotangents):
  """The `ste` neuron's backward needs no loop: d spike_t / d pred_t = window_t and nothing
  crosses time steps (the membrane's cotangent is dropped), so it is elementwise. This keeps
  only the bool window (a constant pred: one step's), where the scan's transpose would also
  reverse and restack float tensors. A masked step's spike is a constant 0: its cotangent
  (which the spike count's cotangent reaches) is dropped."""
  del fused  # the same forward either way
  window, valid = residual
  g_spikes, _ = cotangents                            # (n, B, ...); final state: no gradient
  if valid is not None:
    on = jnp.arange(length, dtype=jnp.int32) < valid  # (n,) the steps that ran
    g_spikes = jnp.where(on.reshape((length,) + (1,) * (g_spikes.ndim - 1)), g_spikes,
                         jnp.zeros((), g_spikes.dtype))
  if window.ndim == g_spikes.ndim:                    # a pred per step
    g_preds = surrogate.clip_grad(window, g_spikes)
  else:                                               # one pred for every step
    g_preds = surrogate.clip_grad(window, _sum_leading(g_spikes))
  # d state_0: g_c of the first step, as `neuron.bddi` gives; valid: an integer, no cotangent.
  return g_spikes[0], g_preds, None


_neuron_over_time.defvjp(_neuron_over_time_fwd, _neuron_over_time_bwd)


def runs(module, params) -> tuple:
  """The lean layers of `module` in the layer contract (`layers.py`).

  Args:
    module: a BITnet module whose surrogate is `ste`.
    params: parameters of every layer but `begin` (whose synapse runs outside, once).
  """
  check_surrogate(module.surrogate)

  def run(spec, x, state, n, valid=None):
    if spec.name != "begin" and module.sparse and spec.name != "mlp1":
      # spike_conv.conv takes the (n, B, ...) steps as they are: a device of a batch-sharded
      # jit then gets its own images of every step.
      x = _spike_synapse(module, spec.name, params[spec.name], x)        # (n, B, H, W, C)
    elif spec.name != "begin":
      flat = x.reshape((-1,) + x.shape[2:])                              # (n*B, H, W, C)
      x = _spike_synapse(module, spec.name, params[spec.name], flat)     # one conv for n steps
      x = x.reshape((n, -1) + x.shape[1:])                               # (n, B, ...)
    fused = module.sparse and state.ndim == 4                            # not mlp1's (B, C)
    spikes, state = _neuron_over_time(state, x, valid, n, module.surrogate, fused)
    return (neuron.maxpool(spikes) if spec.pool else spikes), state, neuron.per_image(spikes)

  return tuple(functools.partial(run, spec) for spec in module.plan())
