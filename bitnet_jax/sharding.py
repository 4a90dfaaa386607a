"""The device mesh and the batch sharding of data parallelism.

Training and evaluation split every global batch over a 1-D mesh (axis "data") of every device
of every process; parameters and optimizer state are replicated on it. Each process feeds its
own slice of the batch (`data.pipeline`), and `shard_batch` assembles the slices into global
arrays.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def data_mesh() -> jax.sharding.Mesh:
  """The 1-D mesh (axis 'data') over every device of every process that batches are split on."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' local batches into global arrays split over mesh axis 'data'.

  Args:
    batch: this process's batch, arrays with leading dimension b (the local batch).
    mesh: a mesh with an axis named 'data'.

  Returns:
    The same keys, as `jax.Array`s of leading dimension b * jax.process_count(), sharded along
    'data' on that dimension.
  """
  if "data" not in mesh.axis_names:
    raise ValueError(f"The mesh needs an axis named 'data', found {mesh.axis_names}.")
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  out = {}
  for key, value in batch.items():
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    if global_shape[0] % mesh.shape["data"]:
      raise ValueError(f"The global batch ({global_shape[0]}) of {key!r} must be divisible by "
                       f"the {mesh.shape['data']} devices of mesh axis 'data'.")
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


