"""The pure, data-parallel train step: `train_step(state, batch) -> (state, metrics)`.

It is jitted once, with the state donated. The batch is sharded over a 1-D device mesh ("data")
spanning every device of every process; parameters and optimizer state are replicated, so XLA
inserts the gradient all-reduce. Everything here takes explicit arguments; `run_config` turns a
config into them (`run_config.optimizer`, `run_config.train_step`).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax import data
from bitnet_jax import engines
from bitnet_jax import losses
from bitnet_jax import twin


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array      # optimizer steps taken
  params: Any
  opt_state: Any


def init_state(module, tx, rng) -> TrainState:
  """Fresh parameters and optimizer state (step 0); works under `jax.eval_shape` too."""
  dummy = jnp.zeros((1, module.img_size, module.img_size, module.in_channels), jnp.float32)
  params = module.init(rng, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   schedule: str = "cosine", optimizer: str = "adamw", weight_decay: float = 0.0,
                   momentum: float = 0.9, grad_clip: float = 0.0) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) or SGD with Nesterov momentum (L2 added to the gradient),
  after a linear warm-up of `warmup_steps`, then cosine decay to 0 at `total_steps` or a
  constant rate; the global gradient norm clipped to `grad_clip` (0 = off)."""
  if schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                            max(total_steps, warmup_steps + 1))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                               optax.constant_schedule(learning_rate)], [warmup_steps])
  if optimizer == "adamw":
    opt = optax.adamw(lr, weight_decay=weight_decay)
  else:
    opt = optax.chain(optax.add_decayed_weights(weight_decay),
                      optax.sgd(lr, momentum=momentum, nesterov=True))
  if grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return opt


def make_train_step(module, tx, mesh, *, mean, std, time_steps: int, engine: str = "parallel",
                    chunk: int = 0, remat: "str | engines.Remat" = "none",
                    loss: str = "mse_rate", logit_scale: float = 10.0, relu_twin: bool = False):
  """Builds `train_step(state, batch) -> (state, metrics)`, jitted with donation.

  Args:
    module: the BITnet module.
    tx: the optimizer.
    mesh: the device mesh; the state and the metrics come back replicated on it.
    mean, std: (C,) per-channel normalisation of the dataset.
    time_steps, engine, chunk, remat: T in training and how it runs (`engines.run`).
    loss, logit_scale: the loss on spike counts (`losses.py`).
    relu_twin: train the seed's ReLU baseline of the same layers instead (`twin.py`: one pass,
      softmax cross-entropy on the logits).
  """

  def loss_fn(params, batch):
    images = data.normalize(batch["image"], mean, std)                  # (B, H, W, C)
    if relu_twin:
      logits, _ = twin.forward(module, params, images)                  # (B, K)
      return twin.per_example_loss(logits, batch["label"]).mean(), logits
    trace = engines.run(module, params, images, time_steps, engine=engine, chunk=chunk,
                        remat=remat)
    counts = trace.out_spikes.sum(0)                                    # (B, K)
    value = losses.per_example_loss(loss, counts, batch["label"], time_steps,
                                    logit_scale).mean()
    return value, counts

  def train_step(state, batch):
    (value, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(counts, -1) == batch["label"])}
    if not relu_twin:
      metrics["output_rate"] = jnp.mean(counts) / time_steps
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))
