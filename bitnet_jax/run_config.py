"""The config of a run, read once: its checks, its `auto` fields resolved, and what it builds.

Both the trainer and evaluation build their model here (and the benchmarks too), so neither
imports the other for it. The device mesh is `sharding.data_mesh()`.
"""

import os

import jax
import ml_collections

from bitnet_jax import datasets
from bitnet_jax import defaults
from bitnet_jax import errors
from bitnet_jax import engines
from bitnet_jax import losses
from bitnet_jax import models
from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv
from bitnet_jax import twin


def validate_config(config: ml_collections.ConfigDict):
  """Rejects impossible settings before anything is built or compiled.

  Raises:
    errors.ConfigError (a ValueError): naming the field, what it must be and what it is.
  """
  try:
    _validate(config)
  except errors.ConfigError:
    raise
  except (ValueError, RuntimeError) as e:  # the checks of neuron, engines, spike_conv
    raise errors.ConfigError(f"config: {e}") from None


def _validate(config):
  def need(ok, msg):
    if not ok:
      raise errors.ConfigError(f"config: {msg}")
  need(config.variant in models.VARIANTS,
       f"variant must be one of {tuple(models.VARIANTS)}, got {config.variant!r}")
  need(config.fs > 0, f"fs must be > 0, got {config.fs}")
  neuron.get_surrogate(config.surrogate)
  twin.check_neuron(twin.neuron_of(config))
  auto = defaults.AUTO
  need(config.compute_dtype in (auto, *models.COMPUTE_DTYPES),
       f"compute_dtype must be one of {(auto, *models.COMPUTE_DTYPES)}, got "
       f"{config.compute_dtype!r}")
  precision = config.get("matmul_precision", auto)
  need(isinstance(precision, str) and precision in (auto, *models.PRECISIONS),
       f"matmul_precision must be one of {(auto, *models.PRECISIONS)}, got {precision!r}")
  need(config.synapses in (auto, "dense", "sparse"),
       f"synapses must be auto, dense or sparse, got {config.synapses!r}")
  if config.synapses == "sparse":
    need(config.compute_dtype in (auto, "float32"),
         f"synapses=sparse computes in float32, got compute_dtype={config.compute_dtype!r}")
    need(twin.neuron_of(config) == "bddi", "synapses=sparse needs spikes, but neuron=relu (the "
         "ReLU twin) has real-valued activations; use synapses=dense or auto")
    spike_conv.check_available()
  for field in ("time_steps", "eval_time_steps", "batch_size", "eval_batch_size", "num_epochs",
                "log_every", "checkpoint_every", "keep_checkpoints"):
    need(isinstance(config[field], int) and config[field] >= 1,
         f"{field} must be an int >= 1, got {config[field]!r}")
  if config.remat != auto:
    engines.parse_remat(config.engine, config.remat, config.surrogate)
  need(config.chunk >= 0, f"chunk must be >= 0, got {config.chunk}")
  eval_chunk = config.get("eval_chunk", 0)
  need(isinstance(eval_chunk, int) and eval_chunk >= 0,
       f"eval_chunk must be an int >= 0 (0 = all T at once), got {eval_chunk!r}")
  need(config.loss in losses.LOSSES, f"loss must be one of {losses.LOSSES}, got {config.loss!r}")
  need(config.optimizer in ("adamw", "sgd"),
       f"optimizer must be adamw or sgd, got {config.optimizer!r}")
  need(config.schedule in ("cosine", "constant"),
       f"schedule must be cosine or constant, got {config.schedule!r}")
  need(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
  need(config.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {config.grad_clip}")
  need(config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
  if config.get("init_from"):
    need(os.path.isdir(config.init_from), f"init_from must be the workdir of a trained ReLU twin, "
         f"got {config.init_from!r}, which is not a directory")
    need(twin.neuron_of(config) == "bddi", "init_from starts a BITnet (neuron=bddi) from a "
         "ReLU twin, got neuron=relu")
    need(config.balance_examples >= 1, f"balance_examples must be >= 1, got "
         f"{config.balance_examples}")
    need(0 < config.balance_percentile <= 100, f"balance_percentile must be in (0, 100], got "
         f"{config.balance_percentile}")
  n = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    need(config[field] % n == 0, f"{field}={config[field]} does not divide over the {n} "
         f"devices; use a multiple of {n}")


def make_module(config, info: datasets.DatasetInfo) -> models.BITnet6:
  """The module of a resolved `config` (no "auto" left: `resolve`) for the images and classes of
  `info`."""
  if not defaults.is_resolved(config):
    raise ValueError("make_module needs explicit compute_dtype, matmul_precision, synapses and "
                     "remat: resolve the config's 'auto' fields first (run_config.resolve)")
  h, w, c = info.image_shape
  if h != w:
    raise errors.DataError(f"images must be square, dataset {info.name} has {h}x{w}")
  try:
    return models.create_module(
        config.variant, fs=config.fs, num_classes=info.num_classes, img_size=h, in_channels=c,
        surrogate=config.surrogate, sparse=config.synapses == "sparse",
        precision=config.matmul_precision, **models.compute_dtype(config.compute_dtype))
  except ValueError as e:
    raise errors.ConfigError(f"config: {e} (dataset {info.name}: {h}x{w}x{c} images, "
                             f"{info.num_classes} classes)") from None


# Fields added after the first runs, with the value that runs written before them had.
_ADDED_FIELDS = {"neuron": "bddi", "matmul_precision": "highest",
                 "eval_chunk": engines.EVAL_CHUNK, "init_from": "", "balance_examples": 2000,
                 "balance_percentile": 99.9}


def upgrade(config):
  """A copy of `config` (a ConfigDict or a dict: a stored run's) with the fields that configs
  written before them lack, at the value such runs had (e.g. matmul_precision "highest")."""
  if isinstance(config, dict):
    return {**_ADDED_FIELDS, **config}
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field, value in _ADDED_FIELDS.items():
      if field not in config:
        config[field] = value
  return config


def resolve(config, *, stored: dict | None = None, fidelity: bool = False):
  """Validates `config`, resolves its "auto" fields for this platform (`defaults.resolve`) and
  validates the result.

  Returns:
    (the config with explicit values, the `defaults.Resolution`).
  """
  config = upgrade(config)
  validate_config(config)
  stored = None if stored is None else upgrade(stored)
  resolution = defaults.resolve(config, stored=stored, fidelity=fidelity)
  config = defaults.apply(config, resolution)
  validate_config(config)
  return config, resolution
