"""The config of a run, read once: its checks, its `auto` fields resolved, and what it builds.

Both the trainer and evaluation (`evaluate.run_evaluation`) start here: `resolve` fills the
fields that old configs lack (`upgrade`), checks every field (`validate_config`, the one place
that does), resolves the `auto` fields for this platform (`defaults.py`), and the functions below
turn the result into the plain arguments of the libraries (the module, the optimizer, the train
step, the data). No library module below reads a config. The device mesh is
`sharding.data_mesh()`.
"""

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bitnet_jax import data
from bitnet_jax import defaults
from bitnet_jax import errors
from bitnet_jax import engines
from bitnet_jax import losses
from bitnet_jax import models
from bitnet_jax import neuron
from bitnet_jax import sharding
from bitnet_jax import train_step as train_step_lib
from bitnet_jax import twin
from bitnet_jax.kernels import spike_conv

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
  """Upgrades and validates `config`, resolves its "auto" fields for this platform
  (`defaults.resolve`) and validates the result.

  Args:
    config: the run's config.
    stored: the config a resumed run started with (its checkpoint's), or None.
    fidelity: evaluating the original release's weights (float32 at `highest`).

  Returns:
    (the config with explicit values, the `defaults.Resolution`).
  """
  config = upgrade(config)
  validate_config(config)
  stored = None if stored is None else upgrade(stored)
  resolution = defaults.resolve(
      {field: config[field] for field in defaults.FIELDS}, engine=config.engine,
      surrogate=config.surrogate, neuron=config.neuron, stored=stored, fidelity=fidelity)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.update(resolution.values)
  validate_config(config)
  return config, resolution


def validate_config(config: ml_collections.ConfigDict):
  """Rejects impossible settings before anything is built or compiled (the only place that
  checks a config; fields old configs lack are filled first, `upgrade`).

  Raises:
    errors.ConfigError (a ValueError): naming the field, what it must be and what it is.
  """
  try:
    _validate(upgrade(config))
  except errors.ConfigError:
    raise
  except (ValueError, RuntimeError) as e:  # the checks of neuron, engines, spike_conv
    raise errors.ConfigError(f"config: {e}") from None


def _validate(config):
  def need(ok, msg):
    if not ok:
      raise errors.ConfigError(f"config: {msg}")
  data_spec(config)
  _pipeline_args(config)
  need(config.variant in models.VARIANTS,
       f"variant must be one of {tuple(models.VARIANTS)}, got {config.variant!r}")
  need(config.fs > 0, f"fs must be > 0, got {config.fs}")
  neuron.get_surrogate(config.surrogate)
  twin.check_neuron(config.neuron)
  auto = defaults.AUTO
  need(config.compute_dtype in (auto, *models.COMPUTE_DTYPES),
       f"compute_dtype must be one of {(auto, *models.COMPUTE_DTYPES)}, got "
       f"{config.compute_dtype!r}")
  need(isinstance(config.matmul_precision, str) and
       config.matmul_precision in (auto, *models.PRECISIONS),
       f"matmul_precision must be one of {(auto, *models.PRECISIONS)}, got "
       f"{config.matmul_precision!r}")
  need(config.synapses in (auto, "dense", "sparse"),
       f"synapses must be auto, dense or sparse, got {config.synapses!r}")
  if config.synapses == "sparse":
    need(config.compute_dtype in (auto, "float32"),
         f"synapses=sparse computes in float32, got compute_dtype={config.compute_dtype!r}")
    need(config.neuron == "bddi", "synapses=sparse needs spikes, but neuron=relu (the ReLU "
         "twin) has real-valued activations; use synapses=dense or auto")
    spike_conv.check_available()
  for field in ("time_steps", "eval_time_steps", "batch_size", "eval_batch_size", "num_epochs",
                "log_every", "checkpoint_every", "keep_checkpoints"):
    need(isinstance(config[field], int) and config[field] >= 1,
         f"{field} must be an int >= 1, got {config[field]!r}")
  if config.remat != auto:
    engines.parse_remat(config.engine, config.remat, config.surrogate)
  need(config.chunk >= 0, f"chunk must be >= 0, got {config.chunk}")
  need(isinstance(config.eval_chunk, int) and config.eval_chunk >= 0,
       f"eval_chunk must be an int >= 0 (0 = all T at once), got {config.eval_chunk!r}")
  need(config.loss in losses.LOSSES, f"loss must be one of {losses.LOSSES}, got {config.loss!r}")
  need(config.optimizer in ("adamw", "sgd"),
       f"optimizer must be adamw or sgd, got {config.optimizer!r}")
  need(config.schedule in ("cosine", "constant"),
       f"schedule must be cosine or constant, got {config.schedule!r}")
  need(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
  need(config.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {config.grad_clip}")
  need(config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
  if config.init_from:
    need(os.path.isdir(config.init_from), f"init_from must be the workdir of a trained ReLU twin, "
         f"got {config.init_from!r}, which is not a directory")
    need(config.neuron == "bddi", "init_from starts a BITnet (neuron=bddi) from a ReLU twin, "
         "got neuron=relu")
    need(config.balance_examples >= 1, f"balance_examples must be >= 1, got "
         f"{config.balance_examples}")
    need(0 < config.balance_percentile <= 100, f"balance_percentile must be in (0, 100], got "
         f"{config.balance_percentile}")
  n = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    need(config[field] % n == 0, f"{field}={config[field]} does not divide over the {n} "
         f"devices; use a multiple of {n}")


# ------------------------------------------------------------------------------------------
# The model, the optimizer and the train step: the config's fields as explicit arguments.


def make_module(config, info: data.DatasetInfo) -> models.BITnet6:
  """The module of a resolved `config` (no "auto" left: `resolve`) for the images and classes of
  `info`."""
  if not defaults.is_resolved({field: config.get(field) for field in defaults.FIELDS}):
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


def optimizer(config, steps_per_epoch: int, total_steps: int):
  """`train_step.make_optimizer` with the config's optimisation fields."""
  return train_step_lib.make_optimizer(
      learning_rate=config.learning_rate,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)), total_steps=total_steps,
      schedule=config.schedule, optimizer=config.optimizer, weight_decay=config.weight_decay,
      momentum=config.momentum, grad_clip=config.grad_clip)


def train_step(config, module, tx, info: data.DatasetInfo, mesh):
  """`train_step.make_train_step` with the config's time steps, engine, remat and loss."""
  return train_step_lib.make_train_step(
      module, tx, mesh, mean=info.mean, std=info.std, time_steps=config.time_steps,
      engine=config.engine, chunk=config.chunk, remat=config.remat, loss=config.loss,
      logit_scale=config.logit_scale, relu_twin=config.neuron == "relu")


def standalone_train_step(config, info: data.DatasetInfo):
  """The real jitted train step of `config` outside the training loop (benchmarks, compile
  tests), on a `data` mesh over all devices, with a schedule of 100 steps per epoch; its "auto"
  fields resolved for this platform.

  Returns:
    (step, init): `step(state, batch)` as in training, and `init(rng) -> TrainState`.
  """
  config, _ = resolve(config)
  module = make_module(config, info)
  tx = optimizer(config, 100, 1000)
  step = train_step(config, module, tx, info, sharding.data_mesh())
  return step, functools.partial(train_step_lib.init_state, module, tx)


def compile_train_step(config, info: data.DatasetInfo):
  """`standalone_train_step` compiled for abstract inputs (a batch of `config.batch_size`):
  nothing is allocated, so full-size models compile on a small machine; the result's
  `memory_analysis()` gives the step's memory."""
  step, init = standalone_train_step(config, info)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  split = NamedSharding(sharding.data_mesh(), PartitionSpec("data"))  # as shard_batch places it
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + tuple(info.image_shape),
                                         np.uint8, sharding=split),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=split)}
  return step.lower(state, batch).compile()


# ------------------------------------------------------------------------------------------
# Data: the config's fields as the data package's arguments.

_SYNTHETIC_FIELDS = tuple(f.name for f in dataclasses.fields(data.DataSpec)
                          if f.name.startswith("synthetic_"))


def data_spec(config) -> data.DataSpec:
  """The dataset of `config`: its `dataset`, `data_dir` and `synthetic_*` fields."""
  return data.DataSpec(config.get("dataset", None), data_dir=config.get("data_dir", None),
                       **{f: config[f] for f in _SYNTHETIC_FIELDS if f in config})


def dataset_info(config) -> data.DatasetInfo:
  """`data.get_dataset_info` of the dataset of `config`."""
  return data.get_dataset_info(data_spec(config))


def source(config, split: str) -> data.Source:
  """Split `split` ('train' or 'test') of the dataset of `config`, for random access."""
  return data.get_source(data_spec(config), split)


def num_examples(config, info: data.DatasetInfo, split: str) -> int:
  """Examples of `split` used: the whole split, or its first `config.max_*_examples`."""
  return data.num_examples(info, split, _max_examples(config, split))


def steps_per_epoch(config, info: data.DatasetInfo) -> int:
  """Training steps per epoch of `config.batch_size` (incomplete last batch dropped)."""
  return data.steps_per_epoch(info, config.batch_size, _max_examples(config, "train"))


def num_eval_batches(config, info: data.DatasetInfo, split: str = "test") -> int:
  """Padded batches of `config.eval_batch_size` that cover `split`."""
  return data.num_eval_batches(info, config.eval_batch_size, split, _max_examples(config, split))


def train_iter(config, info: data.DatasetInfo | None = None):
  """`data.train_iter` over the training split, with the config's batch_size, seed, augment,
  max_train_examples and num_workers; `info` is computed if None."""
  args = _pipeline_args(config)
  return data.train_iter(source(config, "train"), info or dataset_info(config),
                         batch_size=config.batch_size, seed=args["seed"], augment=args["augment"],
                         max_examples=args["max_train_examples"],
                         num_workers=args["num_workers"])


def eval_iter(config, info: data.DatasetInfo | None = None, split: str = "test"):
  """`data.eval_iter` over `split` ('test': Tiny-ImageNet's val/; or 'train'), with the
  config's eval_batch_size, max_eval_examples and num_workers; `info` is computed if None."""
  args = _pipeline_args(config)
  return data.eval_iter(source(config, split), info or dataset_info(config),
                        batch_size=config.eval_batch_size,
                        max_examples=_max_examples(config, split), num_workers=args["num_workers"])


def _max_examples(config, split: str) -> int:
  """`config.max_train_examples` for the 'train' split, else `config.max_eval_examples`."""
  field = "max_train_examples" if split == "train" else "max_eval_examples"
  return _pipeline_args(config)[field]


def _pipeline_args(config) -> dict:
  """The pipeline's optional fields, checked: {augment, seed, max_train_examples,
  max_eval_examples, num_workers}.

  Raises:
    errors.ConfigError: naming the field, what it must be and what it is.
  """
  augment = config.get("augment", "none")
  if augment not in data.AUGMENTATIONS:
    raise errors.ConfigError(f"Unknown config.augment {augment!r}; expected one of "
                             f"{data.AUGMENTATIONS}.")
  seed = config.get("seed", 0)
  if not 0 <= seed < 2**32:
    raise errors.ConfigError(f"config.seed must be in [0, 2**32), found {seed}.")
  args = {"augment": augment, "seed": seed}
  for field in ("max_train_examples", "max_eval_examples"):
    args[field] = config.get(field, -1)
    if args[field] != -1 and args[field] < 1:
      raise errors.ConfigError(f"config.{field} must be -1 (whole split) or >= 1, found "
                               f"{args[field]}.")
  args["num_workers"] = config.get("num_workers", 0)
  if args["num_workers"] < 0:
    raise errors.ConfigError(f"config.num_workers must be >= 0, found {args['num_workers']}.")
  return args
