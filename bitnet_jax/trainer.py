"""Training: the loop around the pure train step (`train_step.py`).

`train_and_evaluate(config, workdir)` reads the config once (`run_config`) and passes plain
arguments down. Multi-host runs only need `jax.distributed.initialize()` first (train.py
--distributed).

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax import run_config
from bitnet_jax import checkpointing
from bitnet_jax import console as console_lib
from bitnet_jax import data
from bitnet_jax import errors
from bitnet_jax import evaluate as evaluate_lib
from bitnet_jax import losses
from bitnet_jax import sharding
from bitnet_jax import train_step as train_step_lib
from bitnet_jax import twin


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl, and to TensorBoard when tensorboardX exists."""

  def __init__(self, workdir: str, log=print):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    self.tb = None
    if self.enabled:
      try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log("TensorBoard: off, tensorboardX is not installed (pip install tensorboardX); "
            "metrics.jsonl has every logged value")

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


class _Window:
  """The training metrics summed since the last log line, and the time they took."""

  def __init__(self, step: int):
    self.sums, self.start, self.t0 = None, step, time.perf_counter()

  def add(self, metrics: dict):
    self.sums = metrics if self.sums is None else jax.tree_util.tree_map(jnp.add, self.sums,
                                                                         metrics)

  def close(self, step: int, batch_size: int, workdir: str) -> dict | None:
    """The mean metrics and images/s since the last close (None if nothing was added).

    Raises:
      FloatingPointError: the loss went non-finite; the last good checkpoint is named.
    """
    if self.sums is None:
      return None
    values = {k: float(v) / (step - self.start) for k, v in jax.device_get(self.sums).items()}
    if not math.isfinite(values["loss"]):
      raise FloatingPointError(
          f"non-finite training loss between optimizer steps {self.start + 1} and {step}; "
          f"the last good checkpoint (step {self.start}) in {workdir} is kept. Lower "
          "learning_rate or set grad_clip")
    values["images_per_s"] = (step - self.start) * batch_size / (time.perf_counter() - self.t0)
    self.sums, self.start, self.t0 = None, step, time.perf_counter()
    return values

  def restart_clock(self):
    """Images/s count training time only: called after validating and saving."""
    if self.sums is None:
      self.t0 = time.perf_counter()


def _print0(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def _from_twin(config, info, module, tx, arch: dict, mesh, log):
  """A fresh state whose parameters are the ReLU twin's of `config.init_from`, balanced
  (`twin.balance`) on the first `config.balance_examples` training images."""
  params, meta = checkpointing.load_params(config.init_from, "latest")
  checkpointing.check_architecture(meta["arch"], arch, meta["source"])
  if run_config.upgrade(meta["config"])["neuron"] != "relu":
    raise errors.ConfigError(f"init_from={config.init_from!r} is a BITnet run, not a ReLU twin "
                             "(train one with python -m bitnet_jax.cli.twin)")
  n = min(config.balance_examples, info.num_train)
  images, _ = run_config.source(config, "train").read(np.arange(n))   # (n, H, W, C) uint8
  images = data.normalize(jnp.asarray(images), info.mean, info.std)
  params, lams = twin.balance(module, params, images, config.balance_percentile)
  log(f"init from the ReLU twin {meta['source']}: layer scales "
      + ", ".join(f"{lam:.3g}" for lam in lams))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return train_step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params))


def _restore_or_init(ckpts, train_iter, init, arch: dict, mesh, seed: int, log):
  """The newest checkpoint's state (and the iterator's position), or a fresh state.

  Returns:
    (state, best validation top-1 so far, -1 if none).
  """
  replicated = NamedSharding(mesh, P())
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(seed))
  restored = ckpts.restore_latest(jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state), arch, log)
  if restored is None:
    return state, -1.0
  state, data_state, meta = restored
  train_iter.set_state(data_state)
  return state, meta.get("best_top1", -1.0)


def _validate(eval_step, params, config, info, module, mesh, step: int, steps_per_epoch: int):
  """Evaluates on the whole test split; the summary of `evaluate.summarize` with the epoch."""
  relu_twin = config.neuron == "relu"
  sums = evaluate_lib.evaluate(eval_step, params, run_config.eval_iter(config, info),
                               mesh)
  result = evaluate_lib.summarize(sums, module, 1 if relu_twin else config.eval_time_steps)
  result["epoch"] = step / steps_per_epoch
  return result


def _header(config, info, module, state, resolution, steps_per_epoch, total_steps, start,
            workdir) -> list[str]:
  """The run's header lines, in words."""
  relu_twin = config.neuron == "relu"
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  steps = "" if relu_twin else (f" | T={config.time_steps} in training, "
                                f"{config.eval_time_steps} at evaluation")
  processes = jax.process_count()
  return [
      console_lib.describe_model(module, n_params, relu_twin) + steps,
      f"data: {info.name}, {run_config.num_examples(config, info, 'train'):,} training / "
      f"{run_config.num_examples(config, info, 'test'):,} test images, batch "
      f"{config.batch_size} | {steps_per_epoch:,} steps/epoch, {total_steps:,} in all | "
      f"devices: {jax.device_count()} x {jax.devices()[0].platform} ({processes} "
      f"process{'es' if processes > 1 else ''})",
      resolution.describe(), *resolution.notes,
      "loss: " + ("softmax cross-entropy of the logits (the ReLU twin)" if relu_twin else
                  f"{config.loss}, {losses.DESCRIPTIONS[config.loss]}"),
      f"workdir: {workdir}" + (f" | resumed at step {start}" if start else ""),
  ]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` when it holds a checkpoint) and returns the final metrics.

  Returns:
    The last validation's metrics; after SIGINT/SIGTERM also "preempted" (the signal) and
    "saved_step".
  """
  config, resolution = run_config.resolve(config, stored=checkpointing.stored_config(workdir))
  info = run_config.dataset_info(config)
  module = run_config.make_module(config, info)
  arch = checkpointing.architecture(module)
  mesh = sharding.data_mesh()
  steps_per_epoch = run_config.steps_per_epoch(config, info)
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_train_steps > 0:
    total_steps = min(total_steps, config.max_train_steps)
  tx = run_config.optimizer(config, steps_per_epoch, total_steps)

  train_iter = run_config.train_iter(config, info)
  os.makedirs(workdir, exist_ok=True)
  ckpts = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  init = functools.partial(train_step_lib.init_state, module, tx)
  state, best_top1 = _restore_or_init(ckpts, train_iter, init, arch, mesh, config.seed, _print0)
  start = int(state.step)
  if start >= total_steps:
    ckpts.close()
    _print0(f"already trained to step {start} (workdir {workdir}); nothing to do")
    return {"already_trained": start}
  if start == 0 and config.init_from:
    state = _from_twin(config, info, module, tx, arch, mesh, _print0)
  meta = {"config": config.to_dict(), "arch": arch, "dataset": info.name}
  for line in _header(config, info, module, state, resolution, steps_per_epoch, total_steps,
                      start, workdir):
    _print0(line)

  train_step = run_config.train_step(config, module, tx, info, mesh)
  eval_step = evaluate_lib.make_eval_step(
      module, time_steps=config.eval_time_steps, mean=info.mean, std=info.std, loss=config.loss,
      logit_scale=config.logit_scale, engine=config.engine, chunk=config.eval_chunk,
      neuron=config.neuron)
  eval_label = "ReLU twin" if config.neuron == "relu" else f"T={config.eval_time_steps}"
  writer = MetricWriter(workdir, _print0)
  preempt = _Preemption()
  console = console_lib.Console(total_steps, start)
  window = _Window(start)
  result = {}
  try:
    for step in range(start + 1, total_steps + 1):
      state, metrics = train_step(state, sharding.shard_batch(next(train_iter), mesh))
      window.add(metrics)
      stop = preempt.agreed()
      end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
      values = None
      if step % config.log_every == 0 or end_of_epoch or stop:
        values = window.close(step, config.batch_size, workdir)
        writer.write(step, "train", values)
      console.step(step, values, step / steps_per_epoch)
      is_best = False
      if step == total_steps or (end_of_epoch and config.eval_every_epochs > 0 and
                                 (step // steps_per_epoch) % config.eval_every_epochs == 0):
        result = _validate(eval_step, state.params, config, info, module, mesh, step,
                           steps_per_epoch)
        writer.write(step, "eval", {k: v for k, v in result.items() if k != "sparsity"})
        is_best, best_top1 = result["top1"] > best_top1, max(best_top1, result["top1"])
        console.print(f"step {step} (epoch {result['epoch']:.2f}): test top-1 "
                      f"{100 * result['top1']:.2f} %, top-5 {100 * result['top5']:.2f} %, loss "
                      f"{result['loss']:.4f} ({eval_label}, {result['n']:,} test images)")
      if step % config.checkpoint_every == 0 or end_of_epoch or stop:
        window.close(step, config.batch_size, workdir)  # never checkpoint a non-finite state
        ckpts.save(step, state, train_iter.get_state(), dict(meta, best_top1=best_top1),
                   best=is_best)
      window.restart_clock()
      if stop:
        ckpts.wait()
        result = dict(result, preempted=preempt.signal, saved_step=step)
        console.print(f"{preempt.signal}: saved step {step} to {workdir}; rerun the same "
                      "command to resume")
        break
  finally:
    console.close()
    ckpts.wait()
    ckpts.close()
    preempt.restore()
  return result
