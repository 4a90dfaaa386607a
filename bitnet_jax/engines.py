"""Time engines: run a BITnet for T time steps and collect its spikes.

Both engines compute exactly the release's per-step loop (docs/ORIGINAL.md) with the same `bddi`
neuron, so their spikes and gradients agree (up to float-order flips of a convolution's sums):

- `scan`: `jax.lax.scan` over time steps, carrying every layer's membrane state; all six layers
  advance one step per iteration. `remat` chooses what backprop keeps:
  "none" (every step's activations), "step" (`jax.checkpoint` around each step: only the states
  are kept, the step is recomputed) or "every:K" (only every K-th step's states are kept).
- `parallel`: layer by layer over a chunk of time steps. A layer's conv runs once over the whole
  (T_chunk * B) batch; only the cheap elementwise neuron is stepped in time (a `lax.scan` of
  `bddi`), which is exactly the running-sum identity of docs/ORIGINAL.md (spikes up to t =
  floor(sum of pred)) evaluated in the release's order. Chunks of `chunk` steps are run one after
  another (carrying the states) so memory is bounded; `remat="chunk"` recomputes a chunk in the
  backward pass instead of keeping it. With one chunk (the default) there is no loop around the
  convolutions, so their weight gradients stay out of loop bodies (XLA:CPU runs those ~60x slower,
  jax issue #12868). `remat="stream"` (`ste` surrogate only; `streaming.py`): the forward keeps
  no activations and the backward re-runs the chunks one at a time, differentiating each on its
  own, so training memory is one chunk's activations whatever T is (one extra forward pass).

In both, the first layer's convolution is computed once: its input, the image, is the same at
every step.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bitnet_jax import neuron
from bitnet_jax import models
from bitnet_jax import spike_conv
from bitnet_jax import streaming

ENGINES = ("scan", "parallel")


class Trace(NamedTuple):
  """What a run records (unused fields cost nothing under jit: XLA drops them)."""
  out_spikes: jax.Array    # (T, B, classes) spikes of the last layer at every step
  layer_spikes: jax.Array  # (B, 6) total spikes of each layer (before pooling) per image
  final_state: jax.Array   # (B, classes) membrane state of the last layer after the last step


def parse_remat(engine: str, remat: str, surrogate: "str | None" = None) -> int | str:
  """Validates `remat` for `engine`; returns K for "every:K", else the string.

  `surrogate` (the model's) is checked against "stream", which needs "ste"; None skips that
  check (`run` always makes it).
  """
  allowed = {"scan": "'none', 'step' or 'every:K'",
             "parallel": "'none', 'chunk' or 'stream' (stream: 'ste' surrogate only)"}
  if engine not in ENGINES:
    raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES}")
  if engine == "parallel" and remat in ("none", "chunk"):
    return remat
  if engine == "parallel" and remat == "stream":
    if surrogate is not None:
      streaming.check_surrogate(surrogate)
    return remat
  if engine == "scan" and remat in ("none", "step"):
    return remat
  if engine == "scan" and isinstance(remat, str) and remat.startswith("every:"):
    k = remat.partition(":")[2]
    if k.isdigit() and int(k) >= 1:
      return int(k)
  raise ValueError(f"remat={remat!r} is not valid for engine {engine!r}: expected "
                   f"{allowed[engine]}")


def check_inputs(module: models.BITnet6, images, steps):
  """Raises ValueError unless images are (B, img_size, img_size, in_channels) and steps >= 1."""
  want = (module.img_size, module.img_size, module.in_channels)
  if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must be NHWC of shape (B, {want[0]}, {want[1]}, {want[2]}) for "
                     f"this model, got shape {getattr(images, 'shape', type(images))}")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"steps (time steps T) must be an int >= 1, got {steps!r}")


def run(module: models.BITnet6, params, images: jax.Array, steps: int, *,
        engine: str = "parallel", chunk: int = 0, remat: str = "none") -> Trace:
  """Runs `module` for `steps` time steps on normalised images.

  Args:
    module: a BITnet6 / BITnet6_v101.
    params: its parameters (the `params` collection).
    images: (B, H, W, C) normalised images.
    steps: number of time steps T.
    engine: "scan" or "parallel".
    chunk: parallel engine only: time steps per chunk; 0 = all steps in one chunk.
    remat: what backprop keeps, see the module docstring.

  Returns:
    A `Trace`; the class scores of the release are `trace.out_spikes.sum(0)`.
  """
  check_inputs(module, images, steps)
  k = parse_remat(engine, remat, module.surrogate)
  if not (isinstance(chunk, int) and chunk >= 0):
    raise ValueError(f"chunk (time steps per chunk) must be an int >= 0, got {chunk!r}")
  synapse = functools.partial(module.apply, {"params": params}, method=module.synapse)
  fire = functools.partial(neuron.bddi, surrogate=module.surrogate)  # one bddi step
  plan = module.plan()
  batch = images.shape[0]
  states = tuple(jnp.zeros((batch,) + spec.shape, module.state_dtype) for spec in plan)
  pred0 = synapse("begin", images)  # (B, H, W, c1): the first layer's input never changes
  if engine == "scan":
    return _scan(_layer_steps(module, params, plan, synapse, fire), pred0, states, steps, k)
  if k == "stream":
    return Trace(*streaming.run(module, params, pred0, steps, chunk))
  return _parallel(_layer_runs(module, params, plan, synapse, fire), pred0, states, steps,
                   chunk or steps, k)


def _per_image_sum(spikes: jax.Array, leading: int) -> jax.Array:
  """Sums all axes but the batch axis, which follows `leading` time axes."""
  axes = tuple(i for i in range(spikes.ndim) if i != leading)
  return spikes.sum(axes)


def _layer_runs(module, params, plan, synapse, fire):
  """Per layer, `(x, state, n) -> (output, state, spikes per image)`: the layer run for n time
  steps, where x is its input spikes (n, B, ...) (for `begin`, its constant pred (B, ...)) and
  output its (pooled) spikes (n, B, ...).

  Sparse models run each conv layer as one fused call (`spike_conv.layer`, or
  `spike_conv.neuron` for `begin`).
  """
  def dense(spec, x, state, n):
    if spec.name == "begin":
      return layer_over_time(fire, state, spec.pool, const=x, length=n)
    flat = x.reshape((-1,) + x.shape[2:])                    # (n*B, H, W, C)
    pred = synapse(spec.name, flat)                          # one conv for n steps
    pred = pred.reshape(x.shape[:2] + pred.shape[1:])        # (n, B, ...)
    return layer_over_time(fire, state, spec.pool, pred)

  def fused(spec, x, state, n):
    if spec.name == "begin":
      return spike_conv.neuron(x, state, n, spec.pool, module.surrogate)
    layer, dtype = params[spec.name], module.state_dtype
    return spike_conv.layer(x, layer["kernel"].astype(dtype), layer["bias"].astype(dtype), state,
                            spec.pool, module.surrogate)

  return tuple(functools.partial(fused if _fused(module, spec) else dense, spec) for spec in plan)


def _layer_steps(module, params, plan, synapse, fire):
  """Per layer, one time step `(x, state) -> (output, state, spikes per image)` for `scan`."""
  def dense(spec, x, state):
    spike, state = fire(state, x if spec.name == "begin" else synapse(spec.name, x))
    return (models.maxpool(spike) if spec.pool else spike), state, _per_image_sum(spike, 0)

  def fused(run, spec, x, state):
    out, state, count = run(x if spec.name == "begin" else x[None], state, 1)
    return out[0], state, count

  runs = _layer_runs(module, params, plan, synapse, fire)
  return tuple(functools.partial(fused, run, spec) if _fused(module, spec)
               else functools.partial(dense, spec) for run, spec in zip(runs, plan))


def _fused(module, spec) -> bool:
  """Whether a layer runs as one `spike_conv` call: every layer of a sparse model but mlp1."""
  return module.sparse and spec.name != "mlp1"


def _scan(layer_steps, pred0, states, steps, remat):
  def step(states, _):
    x, new_states, fired = pred0, [], []
    for layer_step, state in zip(layer_steps, states):
      x, state, count = layer_step(x, state)
      new_states.append(state)
      fired.append(count)  # (B,)
    return tuple(new_states), (x, jnp.stack(fired, -1))  # (B, classes), (B, 6)

  if remat == "none":
    states, (out, fired) = jax.lax.scan(step, states, length=steps)
  elif remat == "step":
    states, (out, fired) = jax.lax.scan(jax.checkpoint(step), states, length=steps)
  else:  # every K steps: keep the states at block boundaries, recompute each block
    block = jax.checkpoint(lambda s, _: jax.lax.scan(step, s, length=remat))
    states, (out, fired) = jax.lax.scan(block, states, length=steps // remat)
    out, fired = out.reshape((-1,) + out.shape[2:]), fired.reshape((-1,) + fired.shape[2:])
    if steps % remat:
      states, (out_r, fired_r) = jax.lax.scan(step, states, length=steps % remat)
      out, fired = jnp.concatenate([out, out_r]), jnp.concatenate([fired, fired_r])
  return Trace(out, fired.sum(0), states[-1])


def _neuron_over_time(fire, state, preds=None, const=None, length=None):
  """Steps one layer's neurons through time; preds (T, ...) or a constant pred (...)."""
  def step(s, pred):
    spike, s = fire(s, const if pred is None else pred)
    return s, spike
  state, spikes = jax.lax.scan(step, state, preds, length=length)
  return spikes, state  # (T, ...) spikes, final state


def layer_over_time(fire, state, pool: bool, preds=None, const=None, length=None):
  """A layer's neurons through time (`_neuron_over_time`), then its max pool and spike count.

  Returns:
    (out, state, count): (T, B, ...) spikes, pooled if `pool`; the final state; (B,) spikes
    per image over the T steps, before pooling. (The dense form of `spike_conv.layer`.)
  """
  spikes, state = _neuron_over_time(fire, state, preds, const, length)
  return (models.maxpool(spikes) if pool else spikes), state, _per_image_sum(spikes, 1)


def _parallel_chunk(layer_runs, pred0, states, n):
  """Advances all layers by n steps, one layer at a time."""
  x, new_states, fired = pred0, [], []
  for run, state in zip(layer_runs, states):
    x, state, count = run(x, state, n)
    new_states.append(state)
    fired.append(count)                                      # (B,)
  return tuple(new_states), x, jnp.stack(fired, -1)          # states, (n, B, K), (B, 6)


def _parallel(layer_runs, pred0, states, steps, chunk, remat):
  chunk = min(chunk, steps)
  run_chunk = functools.partial(_parallel_chunk, layer_runs, pred0)
  if remat == "chunk":
    run_chunk = jax.checkpoint(run_chunk, static_argnums=(1,))
  outs, fired = [], jnp.zeros((pred0.shape[0], len(layer_runs)), pred0.dtype)
  n_chunks, rest = divmod(steps, chunk)
  if n_chunks == 1:
    states, out, f = run_chunk(states, chunk)
    outs.append(out)
    fired += f
  else:
    def body(carry, _):
      states, fired = carry
      states, out, f = run_chunk(states, chunk)
      return (states, fired + f), out
    (states, fired), out = jax.lax.scan(body, (states, fired), length=n_chunks)
    outs.append(out.reshape((-1,) + out.shape[2:]))
  if rest:
    states, out, f = run_chunk(states, rest)
    outs.append(out)
    fired += f
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
  return Trace(out, fired, states[-1])
