"""`matmul_precision`: every convolution and matmul of the real train and eval steps, forward and
backward, carries the requested `jax.lax.Precision` (read from the lowered StableHLO, so nothing
is compiled), bad values fail clearly, and on CPU the setting does not change the spikes.

Why: float32 is not float32 on a TPU (one bfloat16 pass by default) nor on Ampere+ GPUs (TF32)
unless each op asks for `HIGHEST`; the release's spikes are only reproduced there with it.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import run_config
from bitnet_jax import evaluate
from bitnet_jax import models
from bitnet_jax.kernels import spike_conv
from configs import default

STEPS = 3  # time steps of the lowered steps: the stream engine runs chunks of 2 (one partial)
BATCH = 2
NAMES = {"highest": "HIGHEST", "high": "HIGH", "default": "DEFAULT"}
# (engine, remat, chunk): the plain parallel engine (autodiff's transposed convs), the streaming
# backward (its hand-written input-gradient conv and weight-gradient matmuls) and the scan engine.
ENGINES = [("parallel", "none", 0), ("parallel", "stream", 2), ("scan", "none", 0)]


# ------------------------------------------------------------------------------------------
# Reading the StableHLO text.


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str                   # convolution | dot_general | dot
  precision: tuple[str, ...]  # per operand, e.g. ("HIGHEST", "HIGHEST"); () when absent
  lhs_rank: int | None        # rank of the first operand
  line: str


_OP = re.compile(r"stablehlo\.(convolution|dot_general|dot)\b")
_CONV_PRECISION = re.compile(r"#stablehlo<precision (\w+)>")
_DOT_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")
_LHS_TYPE = re.compile(r":\s*\(tensor<([^>]*)>")


def matmul_ops(text: str) -> list[Op]:
  """Every convolution and dot of a StableHLO module's text (one op per line)."""
  ops = []
  for line in text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    kind = match.group(1)
    if kind == "convolution":
      precision = tuple(_CONV_PRECISION.findall(line))
    else:
      found = _DOT_PRECISION.search(line)
      precision = found.groups() if found else ()
    lhs = _LHS_TYPE.search(line)
    lhs_rank = len(lhs.group(1).split("x")) - 1 if lhs else None
    ops.append(Op(kind, precision, lhs_rank, line.strip()))
  return ops


def test_parser_reads_conv_and_dot_lines():
  """The parser on two lines as jax 0.10 prints them (shortened), and on a dot without the
  attribute, which must show as missing rather than pass."""
  text = "\n".join([
      "%1 = stablehlo.convolution(%0, %arg2) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, "
      "f], window = {stride = [1, 1]} {batch_group_count = 1 : i64, precision_config = "
      "[#stablehlo<precision HIGH>, #stablehlo<precision HIGH>]} : (tensor<2x32x32x3xf32>, "
      "tensor<3x3x3x16xf32>) -> tensor<2x32x32x16xf32>",
      "%2 = stablehlo.dot_general %3, %4, contracting_dims = [0] x [0], precision = [HIGHEST, "
      "HIGHEST] : (tensor<16xf32>, tensor<16x8xf32>) -> tensor<8xf32>",
      "%5 = stablehlo.dot_general %3, %4, contracting_dims = [1] x [0] : (tensor<2x8xf32>, "
      "tensor<8x4xf32>) -> tensor<2x4xf32>",
      "%6 = stablehlo.add %5, %5 : tensor<2x4xf32>"])
  ops = matmul_ops(text)
  assert [(op.kind, op.precision, op.lhs_rank) for op in ops] == [
      ("convolution", ("HIGH", "HIGH"), 4), ("dot_general", ("HIGHEST", "HIGHEST"), 1),
      ("dot_general", (), 2)]


def check_precision(ops: list[Op], name: str) -> dict:
  """Asserts the precision of every op; returns the op counts by kind.

  Every convolution and dot must carry `name`'s precision on both operands, except the sums
  over a leading axis that `lean._sum_leading` writes as a product with a ones vector (a
  rank-1 first operand): those stay HIGHEST whatever the setting.
  """
  want = NAMES[name]
  bad = []
  for op in ops:
    expected = "HIGHEST" if op.kind != "convolution" and op.lhs_rank == 1 else want
    if op.precision != (expected, expected):
      bad.append(f"expected precision {expected}, found {op.precision or 'none'}: {op.line}")
  assert not bad, f"{len(bad)} of {len(ops)} ops:\n" + "\n".join(bad)
  counts = {}
  for op in ops:
    key = "sum" if op.kind != "convolution" and op.lhs_rank == 1 else op.kind
    counts[key] = counts.get(key, 0) + 1
  return counts


# ------------------------------------------------------------------------------------------
# The real steps of a tiny model, lowered on abstract inputs (no compilation).


def tiny_config(**overrides):
  config = default.get_config()
  config.update(dataset="synthetic", fs=0.25, time_steps=STEPS, eval_time_steps=STEPS,
                batch_size=BATCH, eval_batch_size=BATCH)
  config.update(**overrides)
  return config


def _abstract_batch(info, train: bool) -> dict:
  batch = {"image": jax.ShapeDtypeStruct((BATCH,) + tuple(info.image_shape), np.uint8),
           "label": jax.ShapeDtypeStruct((BATCH,), np.int32)}
  if not train:
    batch["mask"] = jax.ShapeDtypeStruct((BATCH,), np.bool_)
  return batch


@functools.cache
def lowered_train_step(precision, compute, engine, remat, chunk) -> str:
  config = tiny_config(matmul_precision=precision, compute_dtype=compute, engine=engine,
                       remat=remat, chunk=chunk, synapses="dense")
  run_config.validate_config(config)
  info = run_config.dataset_info(config)
  step, init = run_config.standalone_train_step(config, info)
  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  return step.lower(state, _abstract_batch(info, train=True)).as_text()


@functools.cache
def lowered_eval_step(precision, compute, engine, chunk) -> str:
  config = tiny_config(matmul_precision=precision, compute_dtype=compute, engine=engine,
                       chunk=chunk, synapses="dense")
  config, _ = run_config.resolve(config)
  info = run_config.dataset_info(config)
  module = run_config.make_module(config, info)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]
  step = evaluate.make_eval_step(module, time_steps=STEPS, mean=info.mean, std=info.std,
                                 engine=engine, chunk=chunk)
  return step.lower(params, _abstract_batch(info, train=False)).as_text()


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["float32", "bfloat16x3"])
@pytest.mark.parametrize("engine,remat,chunk", ENGINES)
@pytest.mark.parametrize("precision", ["highest", "high", "default"])
def test_train_step_every_conv_and_dot_has_the_precision(precision, engine, remat, chunk,
                                                         compute):
  counts = check_precision(
      matmul_ops(lowered_train_step(precision, compute, engine, remat, chunk)), precision)
  parts = 3 if compute == "bfloat16x3" else 1
  # Forward: `begin` once, layer1..layer4 once per kernel part; backward: at least a weight
  # gradient per forward conv. The matmuls: mlp1 forward and its two gradients.
  assert counts.get("convolution", 0) >= 2 * (1 + 4 * parts), counts
  assert counts.get("dot_general", 0) + counts.get("dot", 0) >= 3 * parts, counts


@pytest.mark.parametrize("compute", ["float32", "bfloat16x3"])
@pytest.mark.parametrize("engine,chunk", [("parallel", 0), ("parallel", 2), ("scan", 0)])
@pytest.mark.parametrize("precision", ["highest", "high", "default"])
def test_eval_step_every_conv_and_dot_has_the_precision(precision, engine, chunk, compute):
  counts = check_precision(matmul_ops(lowered_eval_step(precision, compute, engine, chunk)),
                           precision)
  parts = 3 if compute == "bfloat16x3" else 1
  assert counts.get("convolution", 0) >= 1 + 4 * parts, counts
  assert counts.get("dot_general", 0) + counts.get("dot", 0) >= parts, counts
  assert "sum" not in counts, counts  # no backward: no gradient sums


def test_stream_backward_takes_the_setting_not_the_default():
  """Regression: the streaming backward's input-gradient conv and weight-gradient matmuls were
  written without a precision (so DEFAULT: TF32 on Ampere+ GPUs, bf16 on TPU) while the rest ran
  at the requested one. Under "high" (printed apart from DEFAULT) none may be DEFAULT."""
  ops = matmul_ops(lowered_train_step("high", "float32", "parallel", "stream", 2))
  assert not [op.line for op in ops if "DEFAULT" in op.precision]
  assert sum(op.kind == "dot_general" and op.lhs_rank == 3 for op in ops) >= 4  # the taps


def test_sparse_dense_reference_is_highest():
  """`spike_conv._dense`, whose vjp is the sparse synapses' gradient, asks for HIGHEST."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 4, 5), jnp.float32)
  grad = jax.jit(jax.value_and_grad(lambda x, k: spike_conv._dense(x, k).sum(), (0, 1)))  # pylint: disable=protected-access
  counts = check_precision(matmul_ops(grad.lower(x, k).as_text()), "highest")
  assert counts == {"convolution": 3}  # forward, input gradient, kernel gradient


# ------------------------------------------------------------------------------------------
# Settings, errors and old configs.


def test_default_is_auto_and_highest_on_cpu():
  """The config's default is `auto` (README, "Defaults: auto"): `highest` on a CPU (where it
  changes nothing); the module's and the API's default is `highest` everywhere."""
  assert default.get_config().matmul_precision == "auto"
  assert models.BITnet6().lax_precision == jax.lax.Precision.HIGHEST
  config, _ = run_config.resolve(tiny_config())
  module = run_config.make_module(config, run_config.dataset_info(config))
  assert module.lax_precision == jax.lax.Precision.HIGHEST


def test_config_without_the_field_means_highest():
  """Configs saved before `matmul_precision` existed still validate and build, at HIGHEST."""
  config = tiny_config()
  del config["matmul_precision"]
  assert "matmul_precision" not in config
  config, resolution = run_config.resolve(config, stored=None)
  assert "matmul_precision" not in resolution.auto  # filled by run_config.upgrade, not auto
  module = run_config.make_module(config, run_config.dataset_info(config))
  assert module.lax_precision == jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("name", ["highest", "high", "default"])
def test_names_map_to_lax_precision(name):
  assert models.lax_precision(name) == jax.lax.Precision(name) == models.PRECISIONS[name]
  assert models.lax_precision(models.PRECISIONS[name]) == models.PRECISIONS[name]
  assert models.BITnet6(fs=0.25, precision=name).lax_precision == models.PRECISIONS[name]


@pytest.mark.parametrize("bad", ["float32", "HIGHEST", "tensorfloat32", None])
def test_config_rejects_unknown_precision(bad):
  with pytest.raises(ValueError, match=re.escape(
      f"config: matmul_precision must be one of ('auto', 'highest', 'high', 'default'), got "
      f"{bad!r}")):
    run_config.validate_config(tiny_config(matmul_precision=bad))


@pytest.mark.parametrize("bad", ["fastest", "bfloat16_3x", None, 2])
def test_module_and_create_model_reject_unknown_precision(bad):
  msg = re.escape(f"precision must be one of ('highest', 'high', 'default') or a "
                  f"jax.lax.Precision, got {bad!r}")
  with pytest.raises(ValueError, match=msg):
    models.BITnet6(fs=0.25, precision=bad)
  with pytest.raises(ValueError, match=msg):
    bitnet_jax.create_model(fs=0.25, num_classes=10, precision=bad)


# ------------------------------------------------------------------------------------------
# On CPU the setting changes nothing.


def test_cpu_spike_counts_equal_for_highest_and_default(tiny_model, images):
  """CPU computes float32 whatever the precision: the same counts, bitwise. The `default` model
  is given as a `jax.lax.Precision` member (hashable, as a static jit argument must be)."""
  assert jax.default_backend() == "cpu"
  steps = 10
  highest = bitnet_jax.spike_counts(tiny_model, images, steps)
  fast = tiny_model.replace(module=tiny_model.module.clone(precision=jax.lax.Precision.DEFAULT))
  assert hash(fast.module) and fast.module != tiny_model.module  # two jit cache entries
  counts = bitnet_jax.spike_counts(fast, images, steps)
  assert 0 < float(highest.mean()) < steps  # the output layer fires, not always
  np.testing.assert_array_equal(counts, highest)
