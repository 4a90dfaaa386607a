"""Our trained weights as a checkpoint of the original PyTorch release.

`export_workdir` reads a checkpoint of a training workdir and writes its parameters as a PyTorch
Lightning ``.ckpt`` in the release's layout (`release.py`): a ``torch.save`` zip holding
``{'state_dict': {'model.<layer>.layer.weight|bias': tensor}, 'epoch', 'global_step',
'hyper_parameters'}``, written without PyTorch (`torch_writer.py`). So the release's own code
(or `benchmarks/torch_baseline.py`, a copy of its structure) can evaluate a model trained here,
and `eval.py --torch_checkpoint` reads it back. The command is `python -m bitnet_jax.cli.export`.
"""

import jax
import numpy as np

from bitnet_jax import checkpointing
from bitnet_jax import errors
from bitnet_jax.interop import release
from bitnet_jax.interop import torch_writer


def export_workdir(workdir: str, out: str, *, variant: str, fs: float, dataset: str,
                   time_steps: int, eval_time_steps: int, which: str = "latest",
                   checkpoint_step: int | None = None) -> dict:
  """Writes the parameters of a workdir's checkpoint to `out` in the release's layout.

  Args:
    workdir: the training workdir.
    out: the .ckpt to write (atomically).
    variant, fs: the run's architecture, checked against the checkpoint's.
    dataset: recorded in the hyper-parameters when the checkpoint does not name its dataset.
    time_steps, eval_time_steps: the run's time steps T, recorded in the hyper-parameters.
    which, checkpoint_step: which checkpoint (see `checkpointing.load_params`).

  Returns:
    The checkpoint's meta (with "arch", "step" and "source").

  Raises:
    CheckpointError: no workdir, or no readable checkpoint in it.
    ConfigError: the checkpoint's variant or fs differs from the given ones (a ValueError).
  """
  params, meta = checkpointing.load_params(workdir, which, checkpoint_step)
  arch = meta["arch"]
  for field, value in (("variant", variant), ("fs", fs)):
    if arch[field] != value:
      raise errors.ConfigError(
          f"the checkpoint in {meta['source']} has {field}={arch[field]!r}, the config "
          f"{field}={value!r}; give the config it was trained with")
  state_dict = release.to_torch_state_dict(jax.tree_util.tree_map(np.asarray, params))
  hyper = dict(arch, dataset=meta.get("dataset", dataset), time_steps=time_steps,
               eval_time_steps=eval_time_steps, exported_by="bitnet_jax.cli.export",
               source=meta["source"])
  torch_writer.write_checkpoint(out, state_dict, {"epoch": 0, "global_step": int(meta["step"]),
                                                  "hyper_parameters": hyper})
  return meta
