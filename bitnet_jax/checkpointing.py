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
"""

import os

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from bitnet_jax import input_pipeline

ARCH_FIELDS = ("variant", "fs", "num_classes", "img_size", "in_channels")


def architecture(module) -> dict:
  """The fields that fix the parameter shapes."""
  return {"variant": type(module).__name__, "fs": float(module.fs),
          "num_classes": int(module.num_classes), "img_size": int(module.img_size),
          "in_channels": int(module.in_channels)}


def check_architecture(found: dict, expected: dict, where: str):
  """Raises ValueError naming every field where a checkpoint's architecture differs."""
  diff = {k: (found.get(k), expected[k]) for k in ARCH_FIELDS if found.get(k) != expected[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"the checkpoint in {where} is of another architecture ({lines}); use "
                     "another --workdir, or the config it was trained with")


class Checkpoints:
  """The latest and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 2):
    workdir = os.path.abspath(workdir)
    # With several processes every save ends at a barrier named after its step; the two managers
    # save the same step at the end of an epoch, so their barriers need distinct names (else the
    # second fails with "Barrier _async_write_complete.<step> is already ongoing").
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="latest")))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"),
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

  def restore_latest(self, abstract_state, arch: dict):
    """Returns (state, data_state, meta) of the newest checkpoint, or None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_architecture(meta["arch"], arch, str(self.latest.directory))
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data, meta

  def close(self):
    self.latest.close()
    self.best.close()


def load_params(workdir: str, which: str = "best", step: int | None = None):
  """Reads the parameters and meta of a workdir's checkpoint, for evaluation.

  Args:
    workdir: the training workdir.
    which: "best" (falls back to "latest" when no best exists yet) or "latest".
    step: a specific step in workdir/checkpoints (overrides `which`).

  Returns:
    (params, meta): params as a nested dict of arrays replicated on every device of every
    process, meta with "config", "arch", "step".
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  names = ["checkpoints"] if step is not None or which == "latest" else ["best", "checkpoints"]
  for name in names:
    path = os.path.join(workdir, name)
    if not os.path.isdir(path):
      continue
    manager = ocp.CheckpointManager(path, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    steps = manager.all_steps()
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {path}; found steps {steps}")
    chosen = step if step is not None else manager.latest_step()
    if chosen is None:
      continue
    # Restored replicated on this run's devices: without a target orbax would rebuild the saving
    # run's sharding, whose devices need not exist here (another process or device count).
    replicated = NamedSharding(input_pipeline.data_mesh(), PartitionSpec())
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        manager.item_metadata(chosen)["state"])
    out = manager.restore(chosen, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    manager.close()
    params = jax.tree_util.tree_map(lambda x: x, out.state["params"])
    return params, dict(out.meta, step=int(chosen), source=os.path.join(path, str(chosen)))
  raise FileNotFoundError(f"no checkpoint in {workdir} (looked in {names}); train first with "
                          "`python train.py --config ... --workdir` pointing there")
