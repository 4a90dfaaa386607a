"""Training: a pure, data-parallel train step and the loop around it.

`train_step(state, batch) -> (state, metrics)` is jitted once, with the state donated. The batch
is sharded over a 1-D device mesh ("data") spanning every device of every process; parameters and
optimizer state are replicated, so XLA inserts the gradient all-reduce. Multi-host runs only need
`jax.distributed.initialize()` first (train.py --distributed).

The loop resumes from the workdir's newest checkpoint, saves periodically, each epoch and on
SIGINT or SIGTERM (after the step in flight, at the same step on every process), validates,
keeps the best checkpoint by top-1, and writes metrics.jsonl (and TensorBoard event files when
tensorboardX is installed).
"""

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitnet_jax import neuron
from bitnet_jax import checkpointing
from bitnet_jax import datasets
from bitnet_jax import engines
from bitnet_jax import evaluate as evaluate_lib
from bitnet_jax import input_pipeline
from bitnet_jax import losses
from bitnet_jax import models
from bitnet_jax import spike_conv
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


def validate_config(config: ml_collections.ConfigDict):
  """Rejects impossible settings before anything is built or compiled."""
  def need(ok, msg):
    if not ok:
      raise ValueError(f"config: {msg}")
  need(config.variant in models.VARIANTS,
       f"variant must be one of {tuple(models.VARIANTS)}, got {config.variant!r}")
  need(config.fs > 0, f"fs must be > 0, got {config.fs}")
  neuron.get_surrogate(config.surrogate)
  twin.check_neuron(config.get("neuron", "bddi"))
  need(config.compute_dtype in models.COMPUTE_DTYPES,
       f"compute_dtype must be one of {tuple(models.COMPUTE_DTYPES)}, got "
       f"{config.compute_dtype!r}")
  precision = config.get("matmul_precision", "highest")  # configs older than the field
  need(isinstance(precision, str) and precision in models.PRECISIONS,
       f"matmul_precision must be one of {tuple(models.PRECISIONS)}, got {precision!r}")
  need(config.synapses in ("dense", "sparse"),
       f"synapses must be dense or sparse, got {config.synapses!r}")
  if config.synapses == "sparse":
    need(config.compute_dtype == "float32",
         f"synapses=sparse computes in float32, got compute_dtype={config.compute_dtype!r}")
    spike_conv.check_available()
  for field in ("time_steps", "eval_time_steps", "batch_size", "eval_batch_size", "num_epochs",
                "log_every", "checkpoint_every", "keep_checkpoints"):
    need(isinstance(config[field], int) and config[field] >= 1,
         f"{field} must be an int >= 1, got {config[field]!r}")
  engines.parse_remat(config.engine, config.remat, config.surrogate)
  need(config.chunk >= 0, f"chunk must be >= 0, got {config.chunk}")
  need(config.loss in losses.LOSSES, f"loss must be one of {losses.LOSSES}, got {config.loss!r}")
  need(config.optimizer in ("adamw", "sgd"),
       f"optimizer must be adamw or sgd, got {config.optimizer!r}")
  need(config.schedule in ("cosine", "constant"),
       f"schedule must be cosine or constant, got {config.schedule!r}")
  need(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
  need(config.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {config.grad_clip}")
  need(config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
  n = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    need(config[field] % n == 0, f"{field}={config[field]} does not divide over the {n} "
         f"devices; use a multiple of {n}")


def make_module(config, info: datasets.DatasetInfo) -> models.BITnet6:
  h, w, c = info.image_shape
  if h != w:
    raise ValueError(f"images must be square, dataset {info.name} has {h}x{w}")
  return models.VARIANTS[config.variant](
      fs=config.fs, num_classes=info.num_classes, img_size=h, in_channels=c,
      surrogate=config.surrogate, sparse=config.synapses == "sparse",
      precision=config.get("matmul_precision", "highest"),  # configs older than the field
      **models.compute_dtype(config.compute_dtype))


def make_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                            max(total_steps, warmup + 1))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                               optax.constant_schedule(config.learning_rate)], [warmup])
  if config.optimizer == "adamw":
    opt = optax.adamw(lr, weight_decay=config.weight_decay)
  else:
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay),
                      optax.sgd(lr, momentum=config.momentum, nesterov=True))
  if config.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
  return opt


def make_train_step(module, config, tx, info, mesh):
  """Builds `train_step(state, batch) -> (state, metrics)`, jitted with donation."""
  mean, std = info.mean, info.std

  relu_twin = config.get("neuron", "bddi") == "relu"

  def loss_fn(params, batch):
    images = input_pipeline.normalize(batch["image"], mean, std)          # (B, H, W, C)
    if relu_twin:  # the seed's baseline: one pass, softmax cross-entropy on the logits
      logits, _ = twin.forward(module, params, images)                    # (B, K)
      return twin.per_example_loss(logits, batch["label"]).mean(), logits
    trace = engines.run(module, params, images, config.time_steps, engine=config.engine,
                        chunk=config.chunk, remat=config.remat)
    counts = trace.out_spikes.sum(0)                                      # (B, K)
    loss = losses.per_example_loss(config.loss, counts, batch["label"], config.time_steps,
                                   config.logit_scale).mean()
    return loss, counts

  def train_step(state, batch):
    (loss, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(counts, -1) == batch["label"])}
    if not relu_twin:
      metrics["output_rate"] = jnp.mean(counts) / config.time_steps
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


def standalone_train_step(config, info: datasets.DatasetInfo):
  """The real jitted train step of `config` outside the training loop (benchmarks, compile
  tests), on a `data` mesh over all devices, with a schedule of 100 steps per epoch.

  Returns:
    (step, init): `step(state, batch)` as in training, and `init(rng) -> TrainState`.
  """
  module = make_module(config, info)
  tx = make_optimizer(config, 100, 1000)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return make_train_step(module, config, tx, info, mesh), functools.partial(init_state, module, tx)


def compile_train_step(config, info: datasets.DatasetInfo):
  """`standalone_train_step` compiled for abstract inputs (a batch of `config.batch_size`):
  nothing is allocated, so full-size models compile on a small machine; the result's
  `memory_analysis()` gives the step's memory."""
  step, init = standalone_train_step(config, info)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + tuple(info.image_shape),
                                         np.uint8),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32)}
  return step.lower(state, batch).compile()


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl, and to TensorBoard when tensorboardX exists."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self.tb = None
    if self.enabled:
      try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f"{kind}/{k}", v, step)
      self.tb.flush()


class _Preemption:
  """Turns SIGINT and SIGTERM into a request to save and stop after the current step.

  Colab's interrupt button sends SIGINT (a KeyboardInterrupt, which would lose everything since
  the last checkpoint), schedulers send SIGTERM. Both only set a flag here; the loop finishes the
  step in flight, saves it and returns. A second SIGINT raises KeyboardInterrupt as usual, for
  a user who wants out at once. With several processes, `agreed()` takes the flag of every
  process (a host all-gather per step), so all of them stop and save at the same step.
  """

  def __init__(self):
    self.signal = None  # name of the first signal received, e.g. "SIGINT"
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal == "SIGINT" and signum == signal.SIGINT:
      signal.default_int_handler(signum, frame)  # second Ctrl-C: KeyboardInterrupt
    self.signal = self.signal or signal.Signals(signum).name

  def agreed(self) -> bool:
    """Whether any process was asked to stop; the same answer on every process."""
    if jax.process_count() == 1:
      return self.signal is not None
    asked = multihost_utils.process_allgather(np.int32(self.signal is not None))
    if asked.max() and self.signal is None:
      self.signal = "a signal to another process"
    return bool(asked.max())

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _progress(total: int, initial: int):
  try:
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if jax.process_index() != 0:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` when it holds a checkpoint) and returns the final metrics."""
  validate_config(config)
  info = datasets.get_dataset_info(config)
  module = make_module(config, info)
  arch = checkpointing.architecture(module)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_train_steps > 0:
    total_steps = min(total_steps, config.max_train_steps)
  tx = make_optimizer(config, steps_per_epoch, total_steps)

  state = jax.jit(functools.partial(init_state, module, tx), out_shardings=replicated)(
      jax.random.PRNGKey(config.seed))
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  train_iter = input_pipeline.create_train_iter(config, info)
  restored = ckpts.restore_latest(jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state), arch)
  best_top1 = -1.0
  if restored is not None:
    state, data_state, meta = restored
    train_iter.set_state(data_state)
    best_top1 = meta.get("best_top1", -1.0)
  start = int(state.step)
  meta = {"config": config.to_dict(), "arch": arch, "dataset": info.name}

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  if jax.process_index() == 0:
    print(f"BITnet {arch} | {n_params:,} parameters | {info.name}: {info.num_train} train / "
          f"{info.num_test} test | devices: {jax.device_count()} x {jax.devices()[0].platform} "
          f"({jax.process_count()} process(es)) | {steps_per_epoch} steps/epoch, "
          f"{total_steps} total" + (f" | resumed at step {start}" if start else ""), flush=True)

  relu_twin = twin.check_neuron(config.get("neuron", "bddi")) == "relu"
  train_step = make_train_step(module, config, tx, info, mesh)
  eval_step = evaluate_lib.make_eval_step(
      module, time_steps=config.eval_time_steps, mean=info.mean, std=info.std, loss=config.loss,
      logit_scale=config.logit_scale, engine=config.engine, chunk=config.chunk,
      neuron=config.get("neuron", "bddi"))
  writer = MetricWriter(workdir)
  preempt = _Preemption()
  bar = _progress(total_steps, start)
  window, window_start, t0, last_good = None, start, time.perf_counter(), start
  result = {}

  def check_window(step):
    """Fetches the metrics summed since the last check; raises if the loss went non-finite."""
    nonlocal window, window_start, t0, last_good
    if window is None:
      return None
    values = {k: float(v) / (step - window_start) for k, v in jax.device_get(window).items()}
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(
          f"non-finite training loss between optimizer steps {window_start + 1} and {step}; "
          f"the last good checkpoint (step {last_good}) in {workdir} is kept. Lower "
          "learning_rate or set grad_clip")
    values["images_per_s"] = (step - window_start) * config.batch_size / (
        time.perf_counter() - t0)
    window, window_start, t0, last_good = None, step, time.perf_counter(), step
    return values

  def save(step, best=False):
    ckpts.save(step, state, train_iter.get_state(), dict(meta, best_top1=best_top1), best=best)

  try:
    for step in range(start + 1, total_steps + 1):
      batch = input_pipeline.shard_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      stop = preempt.agreed()
      window = metrics if window is None else jax.tree_util.tree_map(jnp.add, window, metrics)
      end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
      if step % config.log_every == 0 or end_of_epoch or stop:
        values = check_window(step)
        writer.write(step, "train", values)
        if bar is not None:
          bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                          img_s=f"{values['images_per_s']:.0f}")
      if bar is not None:
        bar.update(1)
      epoch = step // steps_per_epoch
      validate = step == total_steps or (end_of_epoch and config.eval_every_epochs > 0 and
                                         epoch % config.eval_every_epochs == 0)
      is_best = False
      if validate:
        result = evaluate_lib.summarize(
            evaluate_lib.evaluate(eval_step, state.params,
                                  input_pipeline.create_eval_iter(config, info), mesh),
            module, 1 if relu_twin else config.eval_time_steps)
        result["epoch"] = step / steps_per_epoch
        writer.write(step, "eval", {k: v for k, v in result.items() if k != "sparsity"})
        is_best = result["top1"] > best_top1
        best_top1 = max(best_top1, result["top1"])
        if jax.process_index() == 0:
          msg = (f"step {step} (epoch {result['epoch']:.2f}): top-1 {result['top1']:.4f}, "
                 f"top-5 {result['top5']:.4f}, loss {result['loss']:.4f} "
                 f"({'ReLU twin' if relu_twin else f'T={config.eval_time_steps}'}, "
                 f"{result['n']} test images)")
          (bar.write if bar is not None else print)(msg)
      if step % config.checkpoint_every == 0 or end_of_epoch or stop:
        check_window(step)  # never checkpoint a non-finite state
        save(step, best=is_best)
      if window is None:  # images/s of the next window: training time only, not eval/saving
        t0 = time.perf_counter()
      if stop:
        ckpts.wait()
        result = dict(result, preempted=preempt.signal, saved_step=step)
        if jax.process_index() == 0:
          print(f"{preempt.signal}: saved step {step} to {workdir}; rerun the same command "
                "to resume", flush=True)
        break
  finally:
    ckpts.wait()
    ckpts.close()
    preempt.restore()
    if bar is not None:
      bar.close()
  return result
