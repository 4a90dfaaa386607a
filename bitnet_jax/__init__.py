"""bitnet-jax: BITnet spiking CNNs with the bddi activation, in JAX/Flax."""

from bitnet_jax.api import Model, count_params, create_model, spike_counts
from bitnet_jax.neuron import SURROGATES, Surrogate, bddi, get_surrogate
from bitnet_jax.engines import ENGINES, Trace, run
from bitnet_jax.models import BITnet6, BITnet6_v101


def load_torch_checkpoint(path, **kwargs):
  """Loads a checkpoint of the original PyTorch release; see `torch_checkpoint.py`."""
  from bitnet_jax import torch_checkpoint  # pylint: disable=import-outside-toplevel
  return torch_checkpoint.load_torch_checkpoint(path, **kwargs)
