"""Streaming backprop for the `ste` surrogate: training memory that does not grow with T.

Used by `engines.run(..., engine="parallel", remat="stream")`.

Why it is exact. With the `ste` surrogate the neuron's backward ignores the membrane's cotangent
(d state'/d c = 0, see `neuron.py`), so no gradient crosses from one time step to the next: the
gradient of a run is the sum over chunks of time steps of each chunk's own vjp, given the
membrane states at the chunk's start. The states do not need gradients, only values, and the
forward pass can recompute them.

What it keeps. A `custom_vjp` over the whole run `(params, pred0) -> (out_spikes, layer_spikes,
final_state)`:

- forward: runs the chunks one after another (carrying the states) and keeps *no* activations;
  the residuals are the parameters and `pred0` (the first layer's constant synaptic input);
- backward: runs the chunks again, in order, carrying the states; inside each chunk it takes the
  vjp of that chunk's function with the chunk's slice of the `out_spikes` cotangent and the
  `layer_spikes` cotangent, and adds the parameter and `pred0` gradients to the loop carry.
  The `pred0` gradient leaves the custom_vjp and reaches the first convolution once, outside
  the loop (ordinary autodiff of `begin`, whose input is the image).

Peak memory is then one chunk's activations plus the parameters, independent of T, for the price
of one extra forward pass. Every field of the `Trace` is differentiated exactly as the other
engines do: `out_spikes` (any function of it, e.g. the counts) and `layer_spikes` (e.g. a spike
penalty) carry their cotangents into every chunk; `final_state` has zero gradient under `ste` in
every engine (the neuron drops the membrane's cotangent), so its cotangent is ignored here too.
Other surrogates pass gradient through the membrane across chunks; `stream` rejects them.

Inside a chunk, three small `custom_vjp`s keep the backward lean and loop-friendly:

- `_spike_synapse` (a conv or the linear layer on 0/1 spikes) keeps its input as `bool` (one
  byte instead of four) for the weight gradient; it computes the input gradient as a plain
  forward convolution with the flipped kernel (autodiff's transposed convolution runs 4-5x
  slower inside a loop body on XLA:CPU, jax issue #12868) and, on CPU, the weight gradient as
  nine shifted matrix products (XLA:CPU's convolution-backprop-filter is 2-5x slower at these
  shapes, and slower still in a loop);
- `_spike_pool` keeps the max pool's input as `bool` and routes the gradient elementwise (on
  CPU autodiff's version builds int32 scatter indices several times the size of the layer);
- `_neuron_over_time` keeps the neuron's clip window as `bool` and differentiates elementwise:
  under `ste` nothing crosses time steps, so no reverse scan is needed.

All three give the autodiff results (the pool bitwise; the convolution gradients up to float
summation order).

One chunk (`chunk=0` or `chunk >= T`) needs no recomputation: it is ordinary autodiff of that
chunk with the lean residuals above (memory then grows with T, as with `remat="none"`).
"""

import functools

import jax
import jax.numpy as jnp

from bitnet_jax import models
from bitnet_jax import neuron


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
  if name != "mlp1":
    g_x = _conv_input_grad(g, layer_params["kernel"], module.dtype,
                           module.lax_precision).astype(g_x.dtype)
    native = lambda x, g: g_params["kernel"]
    taps = lambda x, g: _kernel_grad_taps(x, g, module.lax_precision).astype(
        g_params["kernel"].dtype)
    kernel = jax.lax.platform_dependent(x_bool, g, cpu=taps, default=native)
    g_params = dict(g_params, kernel=kernel)
  return g_params, g_x


_spike_synapse.defvjp(_spike_synapse_fwd, _spike_synapse_bwd)


@jax.custom_vjp
def _spike_pool(x):
  """`models.maxpool` of 0/1 spikes, keeping its input as bool for the backward."""
  return models.maxpool(x)


def _spike_pool_fwd(x):
  return models.maxpool(x), x.astype(jnp.bool_)


def _spike_pool_bwd(x, g):
  """Routes each window's gradient to its first maximal element in row-major order.

  That is the choice of XLA's select-and-scatter (the vjp of `models.maxpool`), so the result
  is bitwise the same; but elementwise, where autodiff's version keeps a float32 copy of the
  input and, on CPU, builds int32 scatter indices several times the size of the layer.
  """
  *lead, h, w, c = x.shape
  win = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  a, b = win[..., 0, :, 0, :], win[..., 0, :, 1, :]       # (..., H/2, W/2, C) each
  c_, d = win[..., 1, :, 0, :], win[..., 1, :, 1, :]
  first = a | ~(b | c_ | d)                               # a is a maximum (a = 1, or all 0)
  second = ~first & b
  third = ~first & ~b & c_
  fourth = ~first & ~b & ~c_
  zero = jnp.zeros((), g.dtype)
  parts = [jnp.where(sel, g, zero) for sel in (first, second, third, fourth)]
  top = jnp.stack(parts[:2], -2)                          # (..., H/2, W/2, 2, C): dx = 0, 1
  bottom = jnp.stack(parts[2:], -2)
  out = jnp.stack([top, bottom], -4)                      # (..., H/2, 2, W/2, 2, C)
  return (out.reshape(*lead, h, w, c),)


_spike_pool.defvjp(_spike_pool_fwd, _spike_pool_bwd)


# ------------------------------------------------------------------------------------------
# One chunk of time steps (the parallel engine's chunk, with lean residuals).


def _step_through_time(state, preds, const, length):
  """The bddi forward of one layer through time: (n, ...) spikes, final state, bool window."""
  def step(s, pred):
    spike, s = neuron.bddi(s, const if pred is None else pred, "ste")
    return s, spike
  state, spikes = jax.lax.scan(step, state, preds, length=length)
  pred = const if preds is None else preds
  return spikes, state, (pred >= 0) & (pred <= 1)  # window: the clip's pass-through mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _neuron_over_time(state, preds, length, surrogate):
  """Steps one layer's `ste` neurons through time.

  Args:
    state: (B, ...) membrane states before the first step.
    preds: (n, B, ...) synaptic outputs of the n steps, or (B, ...), the same at every step.
    length: n.
    surrogate: the `ste` `neuron.Surrogate` (its clip leak is used in the backward).

  Returns:
    (n, B, ...) spikes and the final state.
  """
  const = preds.ndim == state.ndim
  spikes, state, _ = _step_through_time(state, None if const else preds,
                                        preds if const else None, length)
  return spikes, state


def _neuron_over_time_fwd(state, preds, length, surrogate):
  const = preds.ndim == state.ndim
  spikes, state, window = _step_through_time(state, None if const else preds,
                                             preds if const else None, length)
  return (spikes, state), window


def _neuron_over_time_bwd(length, surrogate, window, cotangents):
  """The `ste` neuron's backward needs no loop: d spike_t / d pred_t = window_t and nothing
  crosses time steps (the membrane's cotangent is dropped), so it is elementwise. This keeps
  only the bool window (a constant pred: one step's), where the scan's transpose would also
  reverse and restack float tensors."""
  g_spikes, _ = cotangents                            # (n, B, ...); final state: no gradient
  if window.ndim == g_spikes.ndim:                    # a pred per step
    g_preds = surrogate.clip_grad(window, g_spikes)
  else:                                               # one pred for every step
    g_preds = surrogate.clip_grad(window, _sum_leading(g_spikes))
  return g_spikes[0], g_preds  # d state_0: g_c of the first step, as `neuron.bddi` gives


_neuron_over_time.defvjp(_neuron_over_time_fwd, _neuron_over_time_bwd)


def _chunk(module, params, pred0, states, n):
  """Advances all layers by n steps, one layer at a time, as `engines._parallel_chunk`.

  Args:
    module: the BITnet module.
    params: parameters of every layer but `begin`.
    pred0: (B, H, W, c1) the first layer's synaptic input (the same at every step).
    states: per-layer membrane states, (B,) + spec.shape each.
    n: time steps in the chunk.

  Returns:
    (states, out (n, B, K) spikes of the last layer, fired (B, 6) spikes per layer and image).
  """
  x, new_states, fired = None, [], []
  surrogate = neuron.get_surrogate(module.surrogate)
  for i, spec in enumerate(module.plan()):
    if i == 0:
      spikes, state = _neuron_over_time(states[0], pred0, n, surrogate)
    else:
      flat = x.reshape((-1,) + x.shape[2:])                              # (n*B, H, W, C)
      pred = _spike_synapse(module, spec.name, params[spec.name], flat)  # one conv for n steps
      pred = pred.reshape(x.shape[:2] + pred.shape[1:])                  # (n, B, ...)
      spikes, state = _neuron_over_time(states[i], pred, n, surrogate)
    new_states.append(state)
    fired.append(spikes.sum(tuple(a for a in range(spikes.ndim) if a != 1)))  # (B,)
    x = _spike_pool(spikes) if spec.pool else spikes
  return tuple(new_states), x, jnp.stack(fired, -1)


# ------------------------------------------------------------------------------------------
# The run.


def _chunks(steps: int, chunk: int) -> tuple[int, int, int]:
  """(chunk length, number of full chunks, length of the last partial chunk or 0)."""
  chunk = min(chunk or steps, steps)
  return (chunk,) + divmod(steps, chunk)


def _forward(module, params, pred0, steps, chunk):
  """All chunks in order, keeping nothing for a backward pass."""
  chunk, n_full, rest = _chunks(steps, chunk)
  states = tuple(jnp.zeros(pred0.shape[:1] + spec.shape, pred0.dtype) for spec in module.plan())

  def body(states, _):
    states, out, fired = _chunk(module, params, pred0, states, chunk)
    return states, (out, fired)

  states, (out, fired) = jax.lax.scan(body, states, length=n_full)
  out, fired = out.reshape((-1,) + out.shape[2:]), fired.sum(0)  # (n_full*chunk, B, K), (B, 6)
  if rest:
    states, out_r, fired_r = _chunk(module, params, pred0, states, rest)
    out, fired = jnp.concatenate([out, out_r]), fired + fired_r
  return out, fired, states[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _streamed(module, params, pred0, steps, chunk):
  return _forward(module, params, pred0, steps, chunk)


def _streamed_fwd(module, params, pred0, steps, chunk):
  return _forward(module, params, pred0, steps, chunk), (params, pred0)


def _streamed_bwd(module, steps, chunk, residual, cotangents):
  params, pred0 = residual
  g_out, g_fired, _ = cotangents  # (T, B, K), (B, 6); final_state: no gradient under ste
  chunk, n_full, rest = _chunks(steps, chunk)
  states = tuple(jnp.zeros(pred0.shape[:1] + spec.shape, pred0.dtype) for spec in module.plan())
  zeros = jax.tree_util.tree_map(jnp.zeros_like, (params, pred0))

  def chunk_grads(states, g_out_chunk, n):
    """This chunk's states after it, and its gradients w.r.t. params and pred0."""
    (new_states, _, _), vjp = jax.vjp(
        lambda p, p0: _chunk(module, p, p0, states, n), params, pred0)
    g_states = jax.tree_util.tree_map(jnp.zeros_like, new_states)  # ignored by the ste neuron
    return new_states, vjp((g_states, g_out_chunk, g_fired))

  def body(carry, g_out_chunk):
    states, acc = carry
    states, grads = chunk_grads(states, g_out_chunk, chunk)
    return (states, jax.tree_util.tree_map(jnp.add, acc, grads)), None

  g_full = g_out[:n_full * chunk].reshape((n_full, chunk) + g_out.shape[1:])
  (states, acc), _ = jax.lax.scan(body, (states, zeros), g_full)
  if rest:
    _, grads = chunk_grads(states, g_out[n_full * chunk:], rest)
    acc = jax.tree_util.tree_map(jnp.add, acc, grads)
  return acc


_streamed.defvjp(_streamed_fwd, _streamed_bwd)


def run(module: models.BITnet6, params, pred0: jax.Array, steps: int, chunk: int):
  """Runs all time steps with streaming backprop (see the module docstring).

  Args:
    module: a BITnet6 / BITnet6_v101 whose surrogate is `ste`.
    params: its parameters (all layers; `begin` is only used through `pred0`).
    pred0: (B, H, W, c1) the first layer's synaptic input, `synapse("begin", images)`.
    steps: time steps T.
    chunk: time steps per chunk (0 = all T in one chunk).

  Returns:
    (out_spikes (T, B, K), layer_spikes (B, 6), final_state (B, K)), the fields of a `Trace`.
  """
  check_surrogate(module.surrogate)
  inner = {name: p for name, p in params.items() if name != "begin"}
  chunk, n_full, rest = _chunks(steps, chunk)
  if n_full == 1 and not rest:  # one chunk: nothing to recompute, plain autodiff
    states = tuple(jnp.zeros(pred0.shape[:1] + spec.shape, pred0.dtype)
                   for spec in module.plan())
    states, out, fired = _chunk(module, inner, pred0, states, steps)
    return out, fired, states[-1]
  return _streamed(module, inner, pred0, steps, chunk)
