"""Time engines: run a BITnet for T time steps and collect its spikes.

Both engines compute exactly the release's per-step loop (docs/ORIGINAL.md) with the same `bddi`
neuron, so their spikes and gradients agree (up to float-order flips of a convolution's sums).
Both advance the layers through the one layer contract (`layers.py`): a chunk of `parallel` is
`layers.through` with n = chunk steps, a step of `scan` the same with n = 1.

- `scan`: `jax.lax.scan` over time steps, carrying every layer's membrane state; all six layers
  advance one step per iteration. `remat` chooses what backprop keeps: "none" (every step's
  activations) or "step" (`jax.checkpoint` around each step: only the states are kept, the step
  is recomputed). No config trains with it: it is the release's loop order, tested equal to
  `parallel`, and what `python -m benchmarks.memory` compares the others' memory with.
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
  (`ste` surrogate only): the same chunk loop, over the lean layers of `lean.py`, inside a
  `custom_vjp` (`_streamed`) whose forward keeps no activations and whose backward re-runs the
  chunks one at a time, differentiating each on its own, so training memory is one chunk's
  activations whatever T is (one extra forward pass).

In both, the first layer's convolution is computed once: its input, the image, is the same at
every step.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bitnet_jax import layers
from bitnet_jax import lean
from bitnet_jax import models

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


@dataclasses.dataclass(frozen=True)
class Remat:
  """What backprop keeps (see the module docstring): scan: "none" or "step"; parallel: "none",
  "chunk" or "stream". `str()` gives the config's spelling."""
  kind: str

  def __str__(self) -> str:
    return self.kind


_REMATS = {"scan": ("none", "step"), "parallel": ("none", "chunk", "stream")}


def parse_remat(engine: str, remat: "str | Remat", surrogate=None) -> Remat:
  """The `Remat` of a config's `remat` string (or a `Remat`), checked for `engine`.

  `surrogate` (the model's) is checked against "stream", which needs "ste"; None skips that
  check (`run` always makes it).

  Raises:
    ValueError: an unknown engine, or a remat the engine does not have.
  """
  allowed = {"scan": "'none' or 'step'",
             "parallel": "'none', 'chunk' or 'stream' (stream: 'ste' surrogate only)"}
  if engine not in ENGINES:
    raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES}")
  if isinstance(remat, Remat):
    parsed = remat
  else:
    parsed = Remat(remat) if isinstance(remat, str) else None
  if parsed is None or parsed.kind not in _REMATS[engine]:
    raise ValueError(f"remat={remat!r} is not valid for engine {engine!r}: expected "
                     f"{allowed[engine]}")
  if parsed.kind == "stream" and surrogate is not None:
    lean.check_surrogate(surrogate)
  return parsed


def check_inputs(module: models.BITnet6, images, time_steps):
  """Raises ValueError unless images are (B, img_size, img_size, in_channels) and T >= 1."""
  want = (module.img_size, module.img_size, module.in_channels)
  if getattr(images, "ndim", None) != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must be NHWC of shape (B, {want[0]}, {want[1]}, {want[2]}) for "
                     f"this model, got shape {getattr(images, 'shape', type(images))}")
  if not (isinstance(time_steps, int) and time_steps >= 1):
    raise ValueError(f"time_steps (T) must be an int >= 1, got {time_steps!r}")


def run(module: models.BITnet6, params, images: jax.Array, time_steps: int, *,
        engine: str = "parallel", chunk: int = 0, remat: "str | Remat" = "none") -> Trace:
  """Runs `module` for `time_steps` time steps on normalised images.

  Args:
    module: a BITnet6 / BITnet6_v101.
    params: its parameters (the `params` collection).
    images: (B, H, W, C) normalised images.
    time_steps: number of time steps T.
    engine: "scan" or "parallel".
    chunk: parallel engine only: time steps per chunk; 0 = all steps in one chunk.
    remat: what backprop keeps (a config string such as "stream", or a `Remat`), see the
      module docstring.

  Returns:
    A `Trace`; the class scores of the release are `trace.out_spikes.sum(0)`.
  """
  check_inputs(module, images, time_steps)
  remat = parse_remat(engine, remat, module.surrogate)
  if not (isinstance(chunk, int) and chunk >= 0):
    raise ValueError(f"chunk (time steps per chunk) must be an int >= 0, got {chunk!r}")
  synapse = functools.partial(module.apply, {"params": params}, method=module.synapse)
  pred0 = synapse("begin", images)  # (B, H, W, c1): the first layer's input never changes
  states = layers.rest(module.plan(), images.shape[0], module.state_dtype)
  if engine == "scan":
    return _scan(layers.for_model(module, params, synapse), pred0, states, time_steps, remat)
  if remat.kind == "stream":
    inner = {name: p for name, p in params.items() if name != "begin"}
    if _chunks(time_steps, chunk)[1] == 1:  # one chunk: nothing to recompute
      states, out, fired = _lean_chunk(module, inner, pred0, states, time_steps)
      return Trace(out, fired, states[-1])
    return Trace(*_streamed(module, inner, pred0, time_steps, chunk))
  run_chunk = functools.partial(layers.through, layers.for_model(module, params, synapse), pred0)
  if remat.kind == "chunk":
    run_chunk = jax.checkpoint(run_chunk, static_argnums=(1,))
  states, out, fired = _over_chunks(run_chunk, states, time_steps, chunk)
  return Trace(out, fired, states[-1])


# ------------------------------------------------------------------------------------------
# The scan engine.


def _scan(runs, pred0, states, time_steps: int, remat: Remat):
  """Every layer one step at a time (the layer contract with n = 1), `time_steps` times."""
  def step(states, _):
    states, out, fired = layers.through(runs, pred0, states, 1)
    return states, (out[0], fired)                           # (B, classes), (B, 6)

  if remat.kind == "step":
    step = jax.checkpoint(step)
  states, (out, fired) = jax.lax.scan(step, states, length=time_steps)
  return Trace(out, fired.sum(0), states[-1])


# ------------------------------------------------------------------------------------------
# The chunk loop of the parallel engine (plain, remat="chunk" and remat="stream").


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
# the chunks one at a time (see `lean.py` for why this is exact under `ste`).


def _lean_chunk(module, params, pred0, states, n, valid=None):
  """`layers.through` the lean layers (params: every layer but `begin`)."""
  return layers.through(lean.runs(module, params), pred0, states, n, valid)


def _streamed_forward(module, params, pred0, time_steps, chunk):
  """All chunks in order, keeping nothing for a backward pass."""
  run_chunk = functools.partial(_lean_chunk, module, params, pred0)
  rest = layers.rest(module.plan(), pred0.shape[0], module.state_dtype)
  states, out, fired = _over_chunks(run_chunk, rest, time_steps, chunk)
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
  rest = layers.rest(module.plan(), pred0.shape[0], module.state_dtype)
  (_, acc), _ = jax.lax.scan(body, (rest, zeros), (g_chunks, valid))
  return acc


_streamed.defvjp(_streamed_fwd, _streamed_bwd)
