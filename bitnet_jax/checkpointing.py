"""Orbax checkpoints of a training run.

A workdir holds two orbax CheckpointManagers:
  workdir/checkpoints/<step>/  the latest `keep` checkpoints (periodic, each epoch, on SIGTERM);
                               a rerun resumes from the newest one
  workdir/best/<step>/         the one with the best validation top-1 so far
Each checkpoint has three items: `state` (params, optimizer state, step), `data` (the training
iterator's position, so a resumed run sees exactly the batches it would have seen) and `meta`
(the config and the architecture, so a checkpoint can be rebuilt and checked on its own).
Orbax writes a step to a temporary folder and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact.

A damaged checkpoint (a truncated, overwritten or missing file: a full disk, a copy cut short) is
skipped: resuming and evaluating `--which latest|best` use the newest *readable* step, and say
which step was unreadable, which file, and which step was used instead. Nothing is deleted: a
resumed run moves the unreadable step to workdir/unreadable/<manager>/<step> (it would
otherwise collide with the step the run is about to save again).
"""

import dataclasses
import gc
import logging
import os
import re
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from bitnet_jax import errors
from bitnet_jax import sharding

ARCH_FIELDS = ("variant", "fs", "num_classes", "img_size", "in_channels")


def architecture(module) -> dict:
  """The fields that fix the parameter shapes."""
  return {"variant": type(module).__name__, "fs": float(module.fs),
          "num_classes": int(module.num_classes), "img_size": int(module.img_size),
          "in_channels": int(module.in_channels)}


def check_architecture(found: dict, expected: dict, where: str):
  """Raises ConfigError naming every field where a checkpoint's architecture differs."""
  diff = {k: (found.get(k), expected[k]) for k in ARCH_FIELDS if found.get(k) != expected[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise errors.ConfigError(f"the checkpoint in {where} is of another architecture ({lines}); "
                             "use another --workdir, or the config it was trained with")


@dataclasses.dataclass(frozen=True)
class Unreadable:
  """A checkpoint step that could not be read: where, and why, in a few words."""
  step: int
  path: str      # the file (or item folder) that failed
  reason: str    # "missing", "truncated", "corrupt", or the error's first line

  def describe(self) -> str:
    return f"step {self.step} ({self.path}: {self.reason})"


def _unreadable(step: int, step_dir: str, item: str, e: Exception) -> Unreadable:
  """What went wrong reading `item` of a step, from orbax's or tensorstore's exception."""
  text = "\n".join(str(x) for x in _chain(e))
  files = re.findall(r'local file "([^"]+)"', text) or re.findall(
      r"(/\S+?)(?: not found|\.$| does not exist)", text)
  path = files[-1] if files else os.path.join(step_dir, item)
  name = os.path.join(step_dir, item, "_METADATA") if "_METADATA" in text else path
  if isinstance(e, FileNotFoundError) or "NOT_FOUND" in text or "does not exist" in text:
    reason = "missing"
  elif "OUT_OF_RANGE" in text or "Unterminated" in text or "Length in header" in text:
    reason = "truncated"
  elif "DATA_LOSS" in text or "Expecting value" in text or "JSONDecodeError" in type(e).__name__:
    reason = "corrupt (not what orbax wrote)"
  else:
    reason = (text.strip().splitlines() or [type(e).__name__])[0][:160]
  return Unreadable(step, name.rstrip("/"), reason)


def _chain(e: BaseException):
  """`e` and the exceptions it was raised from."""
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _restore(manager, step: int, items: dict):
  """`manager.restore` of `items` ({name: args}); an `Unreadable` if any of them fails. Items
  are read one at a time, so the failing one is named."""
  step_dir = os.path.join(str(manager.directory), str(step))
  out = {}
  for name, args in items.items():
    try:
      out[name] = getattr(manager.restore(step, args=ocp.args.Composite(**{name: args})), name)
    except Exception as e:  # pylint: disable=broad-except; orbax/tensorstore raise many kinds
      _drop_failed_reads()
      return _unreadable(step, step_dir, name, e)
  return out


def _drop_failed_reads():
  """Collects the coroutines and tasks of a failed orbax restore quietly.

  When one array of a damaged checkpoint fails to read, orbax abandons the reads of the others:
  collected later, each would print "Task exception was never retrieved" (asyncio's logger) or
  "Exception ignored in: <coroutine ...>" (sys.unraisablehook) with a TensorStore spec of ~60
  lines. The failure itself is reported once, by the caller.
  """
  logger = logging.getLogger("asyncio")
  level, hook = logger.level, sys.unraisablehook
  logger.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    gc.collect()
  finally:
    logger.setLevel(level)
    sys.unraisablehook = hook


def _warn_skipped(log, skipped: list[Unreadable], used: int | None, action: str,
                  kept: str = "left in place"):
  for bad in skipped:
    log(f"warning: checkpoint {bad.describe()} is unreadable; {action} step {used} instead "
        f"(the damaged step is {kept}, nothing was deleted)")


def _replicated_abstract(manager, step: int, mesh):
  """The state item's abstract arrays, replicated on this run's devices: without a target
  orbax would rebuild the saving run's sharding, whose devices need not exist here."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      manager.item_metadata(step)["state"])


def stored_config(workdir: str) -> dict | None:
  """The config a run in `workdir` was started with (its "auto" fields resolved), from the
  newest checkpoint whose meta is readable; None when there is none. Creates nothing."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    return None
  manager = ocp.CheckpointManager(path, item_handlers={"meta": ocp.JsonCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(create=False,
                                                                       read_only=True))
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      out = _restore(manager, step, {"meta": ocp.args.JsonRestore()})
      if not isinstance(out, Unreadable):
        return out["meta"]["config"]
  finally:
    manager.close()
  return None


class Checkpoints:
  """The latest and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    # With several processes every save ends at a barrier named after its step; the two managers
    # save the same step at the end of an epoch, so their barriers need distinct names (else the
    # second fails with "Barrier _async_write_complete.<step> is already ongoing").
    self.latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="latest")))
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")))

  @staticmethod
  def _save(manager, step, state, data_state, meta):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def save(self, step: int, state, data_state, meta: dict, best: bool = False):
    """Saves `state` as the latest checkpoint (and as the best one if `best`)."""
    if self.latest.latest_step() != step:
      self._save(self.latest, step, state, data_state, meta)
    if best:
      self._save(self.best, step, state, data_state, meta)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def restore_latest(self, abstract_state, arch: dict, log=print):
    """(state, data_state, meta) of the newest readable checkpoint, or None if there is none.

    Unreadable newer steps are named (`log`, one line each) and moved to
    workdir/unreadable/checkpoints/<step>, so that saving that step again cannot collide with
    them; nothing is deleted.

    Raises:
      ConfigError: the checkpoint is of another architecture.
      CheckpointError: there are checkpoints, and none of them is readable.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      out = _restore(self.latest, step, {"meta": ocp.args.JsonRestore()})
      if not isinstance(out, Unreadable):
        check_architecture(out["meta"]["arch"], arch, str(self.latest.directory))
        meta = out["meta"]
        out = _restore(self.latest, step, {"data": ocp.args.JsonRestore(),
                                           "state": ocp.args.StandardRestore(abstract_state)})
      if isinstance(out, Unreadable):
        skipped.append(out)
        continue
      _warn_skipped(log, skipped, step, "resumed from",
                    kept=f"moved to {os.path.join(self.workdir, 'unreadable', 'checkpoints')}")
      self._set_aside(skipped)
      return out["state"], out["data"], meta
    if skipped:
      raise errors.CheckpointError(
          f"no readable checkpoint in {self.latest.directory}: "
          + "; ".join(bad.describe() for bad in skipped)
          + ". Move that folder away to start afresh, or use another --workdir")
    return None

  def _set_aside(self, skipped: list[Unreadable]):
    """Moves unreadable steps out of the manager's folder (process 0), keeping their files."""
    if not skipped:
      return
    if jax.process_index() == 0:
      for bad in skipped:
        source = os.path.join(str(self.latest.directory), str(bad.step))
        target = os.path.join(self.workdir, "unreadable", "checkpoints", str(bad.step))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target if not os.path.exists(target) else f"{target}.{os.getpid()}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("bitnet_jax: unreadable checkpoints set aside")
    self.latest.reload()

  def close(self):
    self.latest.close()
    self.best.close()


def load_params(workdir: str, which: str = "best", step: int | None = None, log=print):
  """Reads the parameters and meta of a workdir's checkpoint, for evaluation.

  Args:
    workdir: the training workdir.
    which: "best" (falls back to "latest" when no best exists yet, or none is readable) or
      "latest": the newest readable step; unreadable newer ones are named on `log`.
    step: a specific step in workdir/checkpoints (overrides `which`); an error if unreadable.
    log: where the lines about unreadable checkpoints go.

  Returns:
    (params, meta): params as a nested dict of arrays replicated on every device of every
    process, meta with "config", "arch", "step", "source".

  Raises:
    CheckpointError: no workdir, no such step, an unreadable `step`, or nothing readable.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise errors.CheckpointError(f"workdir {workdir} does not exist; train first with `python "
                                 "train.py --config ... --workdir` pointing there")
  names = ["checkpoints"] if step is not None or which == "latest" else ["best", "checkpoints"]
  skipped = []
  for name in names:
    path = os.path.join(workdir, name)
    if not os.path.isdir(path):
      continue
    manager = ocp.CheckpointManager(path, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    try:
      steps = sorted(manager.all_steps(), reverse=True)
      if step is not None and step not in steps:
        raise errors.CheckpointError(f"no checkpoint of step {step} in {path}; found steps "
                                     f"{sorted(steps)}")
      for chosen in [step] if step is not None else steps:
        out = _read_params(manager, chosen, sharding.data_mesh())
        if isinstance(out, Unreadable):
          if step is not None:
            good = _newest_readable(manager, [s for s in steps if s != step])
            raise errors.CheckpointError(
                f"checkpoint {out.describe()} is unreadable; the newest readable step is "
                + (f"{good} (--checkpoint_step {good})" if good is not None else "none"))
          skipped.append(out)
          continue
        _warn_skipped(log, skipped, chosen, "using")
        params, meta = out
        return params, dict(meta, step=int(chosen), source=os.path.join(path, str(chosen)))
    finally:
      manager.close()
  if skipped:
    raise errors.CheckpointError(f"no readable checkpoint in {workdir}: "
                                 + "; ".join(bad.describe() for bad in skipped))
  raise errors.CheckpointError(f"no checkpoint in {workdir} (looked in {', '.join(names)}); "
                               "train first with `python train.py --config ... --workdir` "
                               "pointing there")


def _read_params(manager, step: int, mesh):
  """(params, meta) of `step`, or an `Unreadable`."""
  try:
    abstract = _replicated_abstract(manager, step, mesh)
  except Exception as e:  # pylint: disable=broad-except; a damaged _METADATA, etc.
    return _unreadable(step, os.path.join(str(manager.directory), str(step)), "state", e)
  out = _restore(manager, step, {"meta": ocp.args.JsonRestore(),
                                 "state": ocp.args.StandardRestore(abstract)})
  if isinstance(out, Unreadable):
    return out
  return jax.tree_util.tree_map(lambda x: x, out["state"]["params"]), out["meta"]


def _newest_readable(manager, steps) -> int | None:
  for step in sorted(steps, reverse=True):
    if not isinstance(_read_params(manager, step, sharding.data_mesh()), Unreadable):
      return step
  return None
