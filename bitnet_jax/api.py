"""The public entry points: build a model, count its parameters, get its class scores."""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import engines
from bitnet_jax import models


class Model(flax.struct.PyTreeNode):
  """A BITnet module (architecture, static) with its parameters (a pytree)."""
  module: models.BITnet6 = flax.struct.field(pytree_node=False)
  params: dict


def create_model(variant: str = "BITnet6", *, fs: float, num_classes: int, img_size: int = 32,
                 in_channels: int = 3, surrogate: str = "ste", dtype=jnp.float32,
                 kernel_parts: int = 1, sparse: bool = False, precision="highest",
                 seed: int = 0, params=None) -> Model:
  """Builds a BITnet with freshly initialised parameters (PyTorch's default init) or given ones.

  Args:
    variant: "BITnet6" or "BITnet6_v101".
    fs: feature scale; channels are int(64*fs), int(128*fs), int(256*fs), int(512*fs).
    num_classes: number of classes.
    img_size: 32 or 64.
    in_channels: 1 or 3.
    surrogate: surrogate gradient name, e.g. "ste" or "atan:2".
    dtype: compute dtype of the convolutions (parameters stay float32).
    kernel_parts: with a bfloat16 `dtype`, bf16 parts per kernel (3: float32's spikes; see
      `models.BITnet6`).
    sparse: convolutions on spikes by the zero-skipping CPU kernel (`spike_conv.py`).
    precision: "highest" (true float32: the release's spikes on every platform), "high" or
      "default" (faster on GPU/TPU, less exact; no change on CPU), or a `jax.lax.Precision`;
      used by every convolution and matmul, forward and backward (see `models.PRECISIONS`).
    seed: PRNG seed of the initialisation.
    params: use these parameters instead (checked against the architecture's shapes).

  Returns:
    A `Model`.
  """
  module = models.create_module(variant, fs=fs, num_classes=num_classes, img_size=img_size,
                                in_channels=in_channels, surrogate=surrogate, dtype=dtype,
                                kernel_parts=kernel_parts, sparse=sparse, precision=precision)
  dummy = jnp.zeros((1, img_size, img_size, in_channels), jnp.float32)
  if params is None:
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), dummy)["params"]
    return Model(module, params)
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(seed), dummy)["params"]
  shapes = lambda tree: {jax.tree_util.keystr(k): v.shape
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = shapes(expected), shapes(params)
  if want != got:
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    raise ValueError("params do not fit the architecture: " + "; ".join(
        f"{k}: expected {want.get(k)}, found {got.get(k)}" for k in bad))
  return Model(module, jax.tree_util.tree_map(jnp.asarray, params))


def count_params(model_or_params) -> int:
  """Number of scalars in the parameters (weights + biases)."""
  params = model_or_params.params if isinstance(model_or_params, Model) else model_or_params
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


@functools.partial(jax.jit, static_argnames=("module", "time_steps", "engine", "chunk"))
def _counts(module, params, images, time_steps, engine, chunk):
  return engines.run(module, params, images, time_steps, engine=engine,
                     chunk=chunk).out_spikes.sum(0)


def spike_counts(model: Model, images, time_steps: int, *, engine: str = "parallel",
                 chunk: int = engines.EVAL_CHUNK) -> jax.Array:
  """The release's class scores: spikes of the last layer summed over `time_steps` steps.

  Args:
    model: a `Model`.
    images: (B, H, W, C) normalised images (NHWC).
    time_steps: number of time steps T >= 1.
    engine: "parallel" (default) or "scan"; both give the same counts.
    chunk: time steps per chunk of the parallel engine (default `engines.EVAL_CHUNK`: the same
      compiled chunk for every T, the last one padded; 0 = all T at once).

  Returns:
    (B, num_classes) float32 spike counts in [0, T]; prediction = argmax (first maximum).
  """
  images = jnp.asarray(images)
  engines.check_inputs(model.module, images, time_steps)
  engines.parse_remat(engine, "none")
  images = images.astype(model.module.state_dtype)
  return _counts(model.module, model.params, images, time_steps, engine, chunk)
