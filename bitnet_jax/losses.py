"""Training losses on spike counts.

Both take the class scores of a run, counts (B, K) in [0, T], and integer labels (B,):

- `mse_rate` (the release): mean over batch and classes of (min(counts, T) / T - one_hot)^2,
  i.e. PyTorch's `MSELoss()(clamp(counts, max=T) / T, one_hot(label))`.
- `xent_rate`: softmax cross-entropy of logits = logit_scale * counts / T, averaged over the batch.
"""

import jax
import jax.numpy as jnp
import optax

LOSSES = ("mse_rate", "xent_rate")
# What each loss is, in words, for the run's header.
DESCRIPTIONS = {
    "mse_rate": "the mean squared error of spike rates (counts / T, in [0, 1]) against one-hot "
                "targets",
    "xent_rate": "softmax cross-entropy of logit_scale * spike rates (counts / T)",
}


def per_example_loss(kind: str, counts: jax.Array, labels: jax.Array, time_steps: int,
                     logit_scale: float = 10.0) -> jax.Array:
  """Loss of each example, shape (B,); the batch loss is its mean over (unpadded) examples."""
  rates = jnp.minimum(counts, time_steps) / time_steps               # (B, K)
  if kind == "mse_rate":
    one_hot = jax.nn.one_hot(labels, counts.shape[-1], dtype=rates.dtype)
    return jnp.mean((rates - one_hot) ** 2, axis=-1)
  if kind == "xent_rate":
    return optax.softmax_cross_entropy_with_integer_labels(logit_scale * rates, labels)
  raise ValueError(f"unknown loss {kind!r}: expected one of {LOSSES}")
