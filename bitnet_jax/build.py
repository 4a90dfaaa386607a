"""What a run is built from its config: the checks, and the module.

Both the trainer and evaluation build their model here (and the benchmarks too), so neither
imports the other for it. The device mesh is `input_pipeline.data_mesh()`.
"""

import os

import jax
import ml_collections

from bitnet_jax import datasets
from bitnet_jax import engines
from bitnet_jax import losses
from bitnet_jax import models
from bitnet_jax import neuron
from bitnet_jax import spike_conv
from bitnet_jax import twin


def validate_config(config: ml_collections.ConfigDict):
  """Rejects impossible settings before anything is built or compiled."""
  def need(ok, msg):
    if not ok:
      raise ValueError(f"config: {msg}")
  need(config.variant in models.VARIANTS,
       f"variant must be one of {tuple(models.VARIANTS)}, got {config.variant!r}")
  need(config.fs > 0, f"fs must be > 0, got {config.fs}")
  neuron.get_surrogate(config.surrogate)
  twin.check_neuron(twin.neuron_of(config))
  need(config.compute_dtype in models.COMPUTE_DTYPES,
       f"compute_dtype must be one of {tuple(models.COMPUTE_DTYPES)}, got "
       f"{config.compute_dtype!r}")
  precision = config.get("matmul_precision", "highest")  # configs older than the field
  need(isinstance(precision, str) and precision in models.PRECISIONS,
       f"matmul_precision must be one of {tuple(models.PRECISIONS)}, got {precision!r}")
  need(config.synapses in ("dense", "sparse"),
       f"synapses must be dense or sparse, got {config.synapses!r}")
  if config.synapses == "sparse":
    need(config.compute_dtype == "float32",
         f"synapses=sparse computes in float32, got compute_dtype={config.compute_dtype!r}")
    spike_conv.check_available()
  for field in ("time_steps", "eval_time_steps", "batch_size", "eval_batch_size", "num_epochs",
                "log_every", "checkpoint_every", "keep_checkpoints"):
    need(isinstance(config[field], int) and config[field] >= 1,
         f"{field} must be an int >= 1, got {config[field]!r}")
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
  """The module of `config` for the images and classes of `info`."""
  h, w, c = info.image_shape
  if h != w:
    raise ValueError(f"images must be square, dataset {info.name} has {h}x{w}")
  return models.create_module(
      config.variant, fs=config.fs, num_classes=info.num_classes, img_size=h, in_channels=c,
      surrogate=config.surrogate, sparse=config.synapses == "sparse",
      precision=config.get("matmul_precision", "highest"),  # configs older than the field
      **models.compute_dtype(config.compute_dtype))
