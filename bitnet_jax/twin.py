"""The seed's "Baseline": the same architecture with ReLU and a softmax, no spikes, no time.

The seed compares each BITnet with its twin: the same six layers (the module's own synapses,
parameters and 2x2 maxpools), with ReLU in place of the bddi neuron, trained with softmax
cross-entropy on the last layer's outputs. The config's `neuron = "relu"` selects it in the
trainer and in evaluation (`python -m bitnet_jax.cli.twin` trains the twin of any config); one
forward pass through the layer contract (`layers.relu`, n = 1) replaces the T time steps, so it
costs about 1/T of the spiking network's compute.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from bitnet_jax import layers
from bitnet_jax import models

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
  _, out, active = _through(module, params, images)
  return out[0], active


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each example, (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def activations(module: models.BITnet6, params, images: jax.Array) -> list[jax.Array]:
  """The twin's output of each layer on normalised images: ReLU outputs (before pooling) for the
  convs, the logits for `mlp1`; a list of 6 arrays (B, ...)."""
  acts, _, _ = _through(module, params, images)
  return list(acts)


def _through(module, params, images):
  """The twin's layers (`layers.relu`) through the layer contract with n = 1. A sparse module's
  twin runs its dense synapses (the sparse kernel is for 0/1 spikes)."""
  if module.sparse:
    module = module.clone(sparse=False)
  synapse = functools.partial(module.apply, {"params": params}, method=module.synapse)
  plan = module.plan()
  runs = tuple(layers.relu(spec, synapse) for spec in plan)
  rest = layers.rest(plan, images.shape[0], module.state_dtype)
  return layers.through(runs, synapse("begin", images), rest, 1)


def balance(module: models.BITnet6, params, images: jax.Array, percentile: float = 99.9):
  """Rescales trained twin parameters so that each layer's activations fit bddi's [0, 1] window.

  Rate conversion (threshold balancing by data): with lam_l the `percentile`-th percentile of
  layer l's activations on `images` (lam_0 = 1 for the images), W_l <- W_l * lam_{l-1} / lam_l
  and b_l <- b_l / lam_l. Positive scalings commute with ReLU and max pooling, so the rescaled
  twin computes each layer's activations divided by lam_l (the same predictions), and a BITnet
  with these weights fires at about rate activation / lam_l, clipped at 1 (a few outliers above
  the percentile saturate).

  Args:
    module: the BITnet module (its synapses are the twin's).
    params: the trained twin's parameters.
    images: (N, H, W, C) normalised training images (a few thousand).
    percentile: of the positive activations of each layer, in (0, 100].

  Returns:
    (params, lams): the rescaled parameters and the 6 scales lam_1..lam_6.
  """
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  outs = jax.jit(functools.partial(activations, module))(params, images)
  lams = []
  for name, out in zip(models.LAYERS, outs):
    positive = out[out > 0]
    if positive.size == 0:
      raise ValueError(f"layer {name} of the twin is silent on the balancing images (no "
                       "positive activation): train the twin first")
    lams.append(float(jnp.percentile(positive, percentile)))
  scaled, previous = {}, 1.0
  for name, lam in zip(models.LAYERS, lams):
    layer = params[name]
    scaled[name] = {"kernel": layer["kernel"] * (previous / lam), "bias": layer["bias"] / lam}
    previous = lam
  return scaled, lams
