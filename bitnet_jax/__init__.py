"""bitnet-jax: BITnet spiking CNNs with the bddi activation, in JAX/Flax."""

from bitnet_jax.api import Model, count_params, create_model, spike_counts
from bitnet_jax.neuron import SURROGATES, Surrogate, bddi, get_surrogate
from bitnet_jax.engines import ENGINES, Trace, run
from bitnet_jax.models import BITnet6, BITnet6_v101
from bitnet_jax.interop import load_torch_checkpoint
