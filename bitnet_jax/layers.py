"""The one layer contract: a layer of the network advanced by n time steps.

A *layer run* is a function

    run(x, state, n, valid) -> (out, state, count)

- x: the layer's input for the n steps: (n, B, ...) spikes; for the first layer (`begin`), whose
  input, the image, is the same at every step, its synaptic output `pred` (B, ...), computed once;
- state: (B, ...) the layer's membranes before the first step;
- n: the number of steps (static);
- valid: None (all n steps run), or an int32 scalar, a runtime value (the compiled program does
  not depend on it): only the first `valid` steps run; a later step leaves the membranes
  unchanged, emits no spike, counts nothing and has exactly zero gradient (the padding of a last,
  partial chunk: `engines._over_chunks`);
- out: (n, B, ...) the layer's output spikes, max-pooled when the layer pools;
- state: the membranes after the last step;
- count: (B,) spikes per image over the n steps, before pooling.

`through(runs, x, states, n, valid)` advances all layers by n steps, one layer after another: a
chunk of the `parallel` engine, one step (n = 1) of the `scan` engine, and the model's first step
from rest (`models.BITnet6.__call__`, which creates the parameters).

Backends, with the same spikes and gradients (tested against each other and, in float64,
against the NumPy copy of the release's loop):
- `dense`: the module's synapse (XLA's convolution, once over all n steps of a layer), then the
  bddi neuron stepped through time (`neuron.over_time`, any surrogate); autodiff through both;
- `fused`: the sparse synapses' C++ kernels (`kernels.spike_conv.layer` and `.neuron`), one call
  per layer for all n steps; float32/float64 on a CPU;
- `lean` (`lean.py`): `ste` only; the backward keeps bool masks and needs no loop over time
  (`remat="stream"`);
- `relu`: the ReLU twin of the same layers (`twin.py`): n = 1, no membrane.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv

# (x, state, n, valid) -> (out, state, count); see the module docstring.
LayerRun = Callable


def rest(plan, batch: int, dtype) -> tuple[jax.Array, ...]:
  """Every layer's membranes at rest (zeros): (B,) + spec.shape each, for `plan`'s layers."""
  return tuple(jnp.zeros((batch,) + spec.shape, dtype) for spec in plan)


def through(runs, x: jax.Array, states, n: int, valid=None):
  """Advances every layer by n steps, in order; each layer's output is the next one's input.

  Args:
    runs: one `LayerRun` per layer.
    x: the first layer's pred (B, ...).
    states: each layer's membranes (B, ...).
    n, valid: as in the contract.

  Returns:
    (states, out (n, B, K) spikes of the last layer, counts (B, L) spikes per layer and image).
  """
  new_states, counts = [], []
  for run, state in zip(runs, states):
    x, state, count = run(x, state, n, valid)
    new_states.append(state)
    counts.append(count)                                     # (B,)
  return tuple(new_states), x, jnp.stack(counts, -1)


def dense(spec, synapse, surrogate: neuron.Surrogate) -> LayerRun:
  """The XLA backend: `synapse(name, x)` (one convolution over all n steps), then the neuron
  through time, then the layer's pool."""

  def run(x, state, n, valid=None):
    if spec.name == "begin":
      return neuron.layer_over_time(state, surrogate, spec.pool, const=x, length=n, valid=valid)
    flat = x.reshape((-1,) + x.shape[2:])                    # (n*B, H, W, C)
    pred = synapse(spec.name, flat)                          # one conv for n steps
    pred = pred.reshape(x.shape[:2] + pred.shape[1:])        # (n, B, ...)
    return neuron.layer_over_time(state, surrogate, spec.pool, pred, valid=valid)

  return run


def fused(spec, layer_params, dtype, surrogate: neuron.Surrogate) -> LayerRun:
  """The C++ backend of a conv layer (sparse synapses): synapse, neuron, pool and count in one
  call for all n steps (`begin`: the neuron alone, its pred being constant)."""

  def run(x, state, n, valid=None):
    if spec.name == "begin":
      return spike_conv.neuron(x, state, n, spec.pool, surrogate, valid)
    return spike_conv.layer(x, layer_params["kernel"].astype(dtype),
                            layer_params["bias"].astype(dtype), state, spec.pool, surrogate, valid)

  return run


def relu(spec, synapse) -> LayerRun:
  """The ReLU twin's layer (n = 1, no time): `relu(synapse(x))` (the logits for `mlp1`), pooled.

  The twin has no membrane: the `state` it returns is the layer's activation before pooling
  (what `twin.balance` measures), and `count` the number of units with a non-zero activation
  (logits > 0 for `mlp1`) per image.
  """

  def run(x, state, n=1, valid=None):
    del state, valid
    if n != 1:
      raise ValueError(f"the ReLU twin has no time steps: n must be 1, got {n}")
    pre = x if spec.name == "begin" else synapse(spec.name, x[0])  # (B, ...)
    act = pre if spec.name == "mlp1" else jax.nn.relu(pre)
    out = neuron.maxpool(act) if spec.pool else act
    active = jnp.sum(act > 0, axis=tuple(range(1, act.ndim))).astype(act.dtype)
    return out[None], act, active

  return run


def for_model(module, params, synapse) -> tuple[LayerRun, ...]:
  """The layers of a BITnet module for the `scan` and `parallel` engines: the fused backend for
  the conv layers of a sparse module, the dense one otherwise (`lean.runs` for remat="stream").

  Args:
    module: the BITnet module.
    params: its parameters.
    synapse: `synapse(name, x)`, the module's synapse with `params` bound.
  """
  def pick(spec):
    if module.sparse and spec.name != "mlp1":
      return fused(spec, params.get(spec.name), module.state_dtype, module.surrogate)
    return dense(spec, synapse, module.surrogate)
  return tuple(pick(spec) for spec in module.plan())
