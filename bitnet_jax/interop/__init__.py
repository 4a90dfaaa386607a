"""The original PyTorch release's checkpoints: read safely, mapped to our parameters, written.

Rooms:
  safe_pickle    the one restricted unpickler and its allow-list (also for the CIFAR pickles)
  torch_tensors  torch's storages, dtypes and tensor rebuilds, as stand-ins for it
  torch_reader   ``torch.save`` zip archives -> NumPy: `load_checkpoint`, `read_state_dict`
  torch_writer   our arrays -> a ``torch.save`` zip, without torch: `write_checkpoint`
  release        the release's layout <-> our Flax parameters; `load_torch_checkpoint`
  export         a training workdir's weights -> a release ``.ckpt`` (reads orbax checkpoints,
                 so it is imported on its own: ``from bitnet_jax.interop import export``)
"""

from bitnet_jax.interop.release import (expected_torch_shapes, load_torch_checkpoint,
                                        to_flax_params, to_reference_weights,
                                        to_torch_state_dict)
from bitnet_jax.interop.safe_pickle import (CheckpointFormatError, HParams, UnknownObject,
                                            UnsafeCheckpointError, load_pickle)
from bitnet_jax.interop.torch_reader import load_checkpoint, read_state_dict
from bitnet_jax.interop.torch_writer import write_checkpoint
