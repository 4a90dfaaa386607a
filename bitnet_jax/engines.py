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
  another in a `lax.scan` (carrying the states) so memory is bounded; all of them have the same
  length, the last one padded with masked steps when `chunk` does not divide T, so every T
  compiles the same chunk program. `remat="chunk"` recomputes a chunk in the backward pass
  instead of keeping it. With one chunk (the training default) there is no loop around the
  convolutions, so their weight gradients stay out of loop bodies (XLA:CPU runs those ~60x slower,
  jax issue #12868); evaluation runs chunks of `EVAL_CHUNK` steps by default. `remat="stream"`
  (`ste` surrogate only): the same chunk loop, over the lean layers of `streaming.py`, inside a
  `custom_vjp` (`_streamed`) whose forward keeps no activations and whose backward re-runs the
  chunks one at a time, differentiating each on its own, so training memory is one chunk's
  activations whatever T is (one extra forward pass).

One chunk loop (`_chunk`, `_over_chunks`) serves all three `parallel` modes; the neuron through
time is `neuron.layer_over_time`, which the sparse kernels' dense references use too.

In both, the first layer's convolution is computed once: its input, the image, is the same at
every step.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bitnet_jax import neuron
from bitnet_jax import models
from bitnet_jax.kernels import spike_conv
from bitnet_jax import streaming

ENGINES = ("scan", "parallel")
# Time steps per chunk of the parallel engine when evaluating (`evaluate.make_eval_step`,
# `api.spike_counts`). Evaluation takes no gradients, so a loop around the convolutions costs
# nothing (the single-chunk case exists for training's weight gradients); with chunks, every
# T > 10 compiles the same 10-step chunk, memory is one chunk's activations whatever T is, and
# the usual T (10, 50, 100, 200) need no padded steps.
EVAL_CHUNK = 10


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


def check_inputs(module: models.BITnet6, images, time_steps):
  """Raises ValueError unless images are (B, img_size, img_size, in_channels) and T >= 1."""
  want = (module.img_size, module.img_size, module.in_channels)
  if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must be NHWC of shape (B, {want[0]}, {want[1]}, {want[2]}) for "
                     f"this model, got shape {getattr(images, 'shape', type(images))}")
  if not (isinstance(time_steps, int) and time_steps >= 1):
    raise ValueError(f"time_steps (T) must be an int >= 1, got {time_steps!r}")


def run(module: models.BITnet6, params, images: jax.Array, time_steps: int, *,
        engine: str = "parallel", chunk: int = 0, remat: str = "none") -> Trace:
  """Runs `module` for `time_steps` time steps on normalised images.

  Args:
    module: a BITnet6 / BITnet6_v101.
    params: its parameters (the `params` collection).
    images: (B, H, W, C) normalised images.
    time_steps: number of time steps T.
    engine: "scan" or "parallel".
    chunk: parallel engine only: time steps per chunk; 0 = all steps in one chunk.
    remat: what backprop keeps, see the module docstring.

  Returns:
    A `Trace`; the class scores of the release are `trace.out_spikes.sum(0)`.
  """
  check_inputs(module, images, time_steps)
  k = parse_remat(engine, remat, module.surrogate)
  if not (isinstance(chunk, int) and chunk >= 0):
    raise ValueError(f"chunk (time steps per chunk) must be an int >= 0, got {chunk!r}")
  synapse = functools.partial(module.apply, {"params": params}, method=module.synapse)
  pred0 = synapse("begin", images)  # (B, H, W, c1): the first layer's input never changes
  states = _rest(module, images.shape[0])
  if engine == "scan":
    return _scan(_layer_steps(module, params, synapse), pred0, states, time_steps, k)
  if k == "stream":
    inner = {name: p for name, p in params.items() if name != "begin"}
    if _chunks(time_steps, chunk)[1] == 1:  # one chunk: nothing to recompute
      states, out, fired = _lean_chunk(module, inner, pred0, states, time_steps)
      return Trace(out, fired, states[-1])
    return Trace(*_streamed(module, inner, pred0, time_steps, chunk))
  run_chunk = functools.partial(_chunk, _layer_runs(module, params, synapse), pred0)
  if k == "chunk":
    run_chunk = jax.checkpoint(run_chunk, static_argnums=(1,))
  states, out, fired = _over_chunks(run_chunk, states, time_steps, chunk)
  return Trace(out, fired, states[-1])


def _rest(module, batch: int) -> tuple[jax.Array, ...]:
  """Every layer's membranes at rest (zeros), (B,) + spec.shape each."""
  return tuple(jnp.zeros((batch,) + spec.shape, module.state_dtype) for spec in module.plan())


# ------------------------------------------------------------------------------------------
# Layers. Per layer, a run `(x, state, n, valid) -> (output, state, spikes per image)` advances it
# by n time steps: x is its input spikes (n, B, ...) (for `begin`, its constant pred (B, ...)),
# output its (pooled) spikes (n, B, ...), and valid None (all n steps run) or an int32 scalar:
# only the first `valid` steps run, later ones are masked (no spike, membranes unchanged, zero
# gradient: `neuron.over_time`). `streaming.layer_runs` gives the lean `ste` ones.


def _layer_runs(module, params, synapse):
  """The layers of the parallel engine. Sparse models run each conv layer as one fused call
  (`spike_conv.layer`, or `spike_conv.neuron` for `begin`)."""
  surrogate = module.surrogate

  def dense(spec, x, state, n, valid=None):
    if spec.name == "begin":
      return neuron.layer_over_time(state, surrogate, spec.pool, const=x, length=n, valid=valid)
    flat = x.reshape((-1,) + x.shape[2:])                    # (n*B, H, W, C)
    pred = synapse(spec.name, flat)                          # one conv for n steps
    pred = pred.reshape(x.shape[:2] + pred.shape[1:])        # (n, B, ...)
    return neuron.layer_over_time(state, surrogate, spec.pool, pred, valid=valid)

  def fused(spec, x, state, n, valid=None):
    if spec.name == "begin":
      return spike_conv.neuron(x, state, n, spec.pool, surrogate, valid)
    layer, dtype = params[spec.name], module.state_dtype
    return spike_conv.layer(x, layer["kernel"].astype(dtype), layer["bias"].astype(dtype), state,
                            spec.pool, surrogate, valid)

  return tuple(functools.partial(fused if _fused(module, spec) else dense, spec)
               for spec in module.plan())


def _layer_steps(module, params, synapse):
  """Per layer, one time step `(x, state) -> (output, state, spikes per image)` for `scan`."""
  def dense(spec, x, state):
    pred = x if spec.name == "begin" else synapse(spec.name, x)
    spike, state = neuron.bddi(state, pred, module.surrogate)
    return (neuron.maxpool(spike) if spec.pool else spike), state, neuron.per_image(spike, 0)

  def fused(run, spec, x, state):
    out, state, count = run(x if spec.name == "begin" else x[None], state, 1, None)
    return out[0], state, count

  runs = _layer_runs(module, params, synapse)
  return tuple(functools.partial(fused, run, spec) if _fused(module, spec)
               else functools.partial(dense, spec) for run, spec in zip(runs, module.plan()))


def _fused(module, spec) -> bool:
  """Whether a layer runs as one `spike_conv` call: every layer of a sparse model but mlp1."""
  return module.sparse and spec.name != "mlp1"


# ------------------------------------------------------------------------------------------
# The scan engine.


def _scan(layer_steps, pred0, states, time_steps, remat):
  def step(states, _):
    x, new_states, fired = pred0, [], []
    for layer_step, state in zip(layer_steps, states):
      x, state, count = layer_step(x, state)
      new_states.append(state)
      fired.append(count)  # (B,)
    return tuple(new_states), (x, jnp.stack(fired, -1))  # (B, classes), (B, 6)

  if remat == "none":
    states, (out, fired) = jax.lax.scan(step, states, length=time_steps)
  elif remat == "step":
    states, (out, fired) = jax.lax.scan(jax.checkpoint(step), states, length=time_steps)
  else:  # every K steps: keep the states at block boundaries, recompute each block
    block = jax.checkpoint(lambda s, _: jax.lax.scan(step, s, length=remat))
    states, (out, fired) = jax.lax.scan(block, states, length=time_steps // remat)
    out, fired = out.reshape((-1,) + out.shape[2:]), fired.reshape((-1,) + fired.shape[2:])
    if time_steps % remat:
      states, (out_r, fired_r) = jax.lax.scan(step, states, length=time_steps % remat)
      out, fired = jnp.concatenate([out, out_r]), jnp.concatenate([fired, fired_r])
  return Trace(out, fired.sum(0), states[-1])


# ------------------------------------------------------------------------------------------
# The chunk loop of the parallel engine (plain, remat="chunk" and remat="stream").


def _chunk(layer_runs, pred0, states, n, valid=None):
  """Advances all layers by n steps, one layer at a time; with `valid` (an int32 scalar), only
  the first `valid` of them run and the rest are masked.

  Returns:
    (states, out (n, B, K) spikes of the last layer, fired (B, 6) spikes per layer and image).
  """
  x, new_states, fired = pred0, [], []
  for run_layer, state in zip(layer_runs, states):
    x, state, count = run_layer(x, state, n, valid)
    new_states.append(state)
    fired.append(count)                                      # (B,)
  return tuple(new_states), x, jnp.stack(fired, -1)


def _chunks(time_steps: int, chunk: int) -> tuple[int, int]:
  """(chunk length, number of chunks): one chunk of all T steps when `chunk` is 0 or >= T, else
  ceil(T / chunk) chunks of `chunk` steps, the last one padded."""
  chunk = min(chunk or time_steps, time_steps)
  return chunk, -(-time_steps // chunk)


def _valid_steps(time_steps: int, chunk: int, n_chunks: int) -> "jax.Array | None":
  """(n_chunks,) int32 steps that run in each chunk (the last one may be partial), or None when
  every chunk is full (nothing to mask)."""
  if time_steps == chunk * n_chunks:
    return None
  return jnp.minimum(chunk, time_steps - chunk * jnp.arange(n_chunks, dtype=jnp.int32))


def _over_chunks(run_chunk, states, time_steps: int, chunk: int):
  """Runs `run_chunk(states, n, valid) -> (states, out, fired)` over all time steps.

  With more than one chunk, all ceil(T / chunk) chunks have the same length and run in one
  `lax.scan`, so every T compiles the same chunk program (compile time does not grow with T).
  When `chunk` does not divide T, the last chunk is padded: its steps past T are masked (no
  spikes, membranes unchanged, zero gradient) and the padded outputs are cut off. A single chunk
  runs without a loop: its convolutions' weight gradients then stay out of loop bodies (XLA:CPU
  runs those ~60x slower, jax issue #12868).

  Returns:
    (final states, out (T, B, K), fired (B, 6)).
  """
  chunk, n_chunks = _chunks(time_steps, chunk)
  if n_chunks == 1:
    return run_chunk(states, chunk, None)
  valid = _valid_steps(time_steps, chunk, n_chunks)

  def body(carry, valid):
    states, fired = carry
    states, out, f = run_chunk(states, chunk, valid)
    return (states, fired + f), out

  fired = jnp.zeros((states[0].shape[0], len(states)), states[0].dtype)
  (states, fired), out = jax.lax.scan(body, (states, fired), valid, length=n_chunks)
  out = out.reshape((-1,) + out.shape[2:])                   # (n_chunks * chunk, B, K)
  return states, out[:time_steps], fired


# ------------------------------------------------------------------------------------------
# remat="stream": the chunk loop of the lean layers inside a custom_vjp whose backward re-runs
# the chunks one at a time (see `streaming.py` for why this is exact under `ste`).


def _lean_chunk(module, params, pred0, states, n, valid=None):
  """`_chunk` of `streaming.layer_runs` (params: every layer but `begin`)."""
  return _chunk(streaming.layer_runs(module, params), pred0, states, n, valid)


def _streamed_forward(module, params, pred0, time_steps, chunk):
  """All chunks in order, keeping nothing for a backward pass."""
  run_chunk = functools.partial(_lean_chunk, module, params, pred0)
  states, out, fired = _over_chunks(run_chunk, _rest(module, pred0.shape[0]), time_steps, chunk)
  return out, fired, states[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _streamed(module, params, pred0, time_steps, chunk):
  """`(params, pred0) -> (out_spikes (T, B, K), layer_spikes (B, 6), final_state (B, K))`.

  Forward: the chunks one after another, carrying the states, keeping no activations (the
  residuals are `params` and `pred0`). Backward: the chunks again, in order, carrying the
  states; inside each, the vjp of that chunk with its slice of the `out_spikes` cotangent and
  the `layer_spikes` cotangent, summed over chunks. Peak memory is one chunk's activations plus
  the parameters, independent of T, for one extra forward pass. `final_state` has zero gradient
  under `ste` in every engine (the neuron drops the membrane's cotangent), so its cotangent is
  ignored here too. The `pred0` gradient leaves the custom_vjp and reaches the first
  convolution once, outside the loop.
  """
  return _streamed_forward(module, params, pred0, time_steps, chunk)


def _streamed_fwd(module, params, pred0, time_steps, chunk):
  return _streamed_forward(module, params, pred0, time_steps, chunk), (params, pred0)


def _streamed_bwd(module, time_steps, chunk, residual, cotangents):
  params, pred0 = residual
  g_out, g_fired, _ = cotangents  # (T, B, K), (B, 6); final_state: no gradient under ste
  chunk, n_chunks = _chunks(time_steps, chunk)
  valid = _valid_steps(time_steps, chunk, n_chunks)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, (params, pred0))

  def body(carry, xs):
    """One chunk: its states after it, and its gradients w.r.t. params and pred0 added."""
    states, acc = carry
    g_out_chunk, valid = xs
    (new_states, _, _), vjp = jax.vjp(
        lambda p, p0: _lean_chunk(module, p, p0, states, chunk, valid), params, pred0)
    g_states = jax.tree_util.tree_map(jnp.zeros_like, new_states)  # ignored by the ste neuron
    grads = vjp((g_states, g_out_chunk, g_fired))
    return (new_states, jax.tree_util.tree_map(jnp.add, acc, grads)), None

  pad = n_chunks * chunk - time_steps                        # masked steps: zero cotangent
  g_out = jnp.pad(g_out, ((0, pad),) + ((0, 0),) * (g_out.ndim - 1))
  g_chunks = g_out.reshape((n_chunks, chunk) + g_out.shape[1:])
  (_, acc), _ = jax.lax.scan(body, (_rest(module, pred0.shape[0]), zeros), (g_chunks, valid))
  return acc


_streamed.defvjp(_streamed_fwd, _streamed_bwd)
