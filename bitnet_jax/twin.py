"""The seed's "Baseline": the same architecture with ReLU and a softmax, no spikes, no time.

The seed compares each BITnet with its twin: the same six layers (the module's own synapses,
parameters and 2x2 maxpools), with ReLU in place of the bddi neuron, trained with softmax
cross-entropy on the last layer's outputs. `config.neuron = "relu"` selects it in the trainer
and in evaluation (`python -m bitnet_jax.baseline` trains the twin of any config); one forward
pass replaces the T time steps, so it costs about 1/T of the spiking network's compute.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from bitnet_jax import models
from bitnet_jax import neuron

NEURONS = ("bddi", "relu")


def check_neuron(name: str) -> str:
  if name not in NEURONS:
    raise ValueError(f"neuron must be one of {NEURONS} (bddi: the spiking BITnet; relu: the "
                     f"seed's ReLU baseline of the same layers), got {name!r}")
  return name


def forward(module: models.BITnet6, params, images: jax.Array):
  """The ReLU twin of `module` on normalised images.

  Args:
    module: the BITnet module whose synapses (and pools) the twin uses.
    params: its parameters.
    images: (B, H, W, C) normalised images.

  Returns:
    (logits (B, K), active (B, 6)): the last layer's outputs (no ReLU), and per layer the number
    of units with a non-zero activation per image (the twin's counterpart of the spike totals;
    for the last layer, of logits > 0).
  """
  synapse = functools.partial(module.apply, {"params": params}, method=module.synapse)
  x, active = images, []
  for spec in module.plan():
    out = synapse(spec.name, x)                                # (B, H, W, C) or (B, K)
    if spec.name == "mlp1":
      active.append(jnp.sum(out > 0, axis=-1))
      return out, jnp.stack(active, -1).astype(out.dtype)     # (B, K), (B, 6)
    out = jax.nn.relu(out)
    active.append(jnp.sum(out > 0, axis=(1, 2, 3)))
    x = neuron.maxpool(out) if spec.pool else out
  raise AssertionError("the plan ends with mlp1")


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each example, (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
