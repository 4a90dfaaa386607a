"""Each kernel op under a batch-sharded jit runs on its own device's images.

XLA cannot look inside a custom call, so by default it gathers a batch-sharded input onto every
device and runs the whole batch there. Each op is therefore wrapped in `custom_partitioning`: the
images of a batch are independent, so with the batch dimension sharded over some mesh axes every
device calls the kernel on its own images, and everything else (spatial dims, channels, time, the
kernel, the bias) is replicated. Outside a sharded jit it is the plain call. `kernel_grad` sums
over the batch: each device's call gives the sum over its images, and the partitioned op adds
them up (psum) into the replicated result.
"""

import functools

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

# Per op: the einsum-like Shardy rule (n = the batch, the only factor that may stay sharded; an
# empty operand is the int32 scalar `valid`), the batch dimension of each operand and of each
# result (None: replicated). The convolutions take a leading axis of time steps (t), so that
# the batch of a (T, N, ...) input stays a dimension of its own, which a device can own; the
# kernel sees the T * N images. `kernel_grad` sums over the batch: each device's call gives the
# sum over its images, and the partitioned op adds them up (psum) into the replicated result.
_RULES = {
    "conv": ("t n h w i, a b i o -> t n h w o", (1, None), (1,)),
    "sparse_conv": ("t n h w i, a b i o -> t n h w o", (1, None), (1,)),
    "kernel_grad": ("t n h w i, t n h w o -> a b i o", (1, 1), (None,)),
    "layer": ("t n h w i, a b i o, o, n h w o, -> t n p q o, n h w o, n",
              (1, None, None, 0, None), (1, 0, 0)),
    "neuron": ("n h w c, n h w c, -> t n p q c, n h w c, n", (0, 0, None), (1, 0, 0)),
    "neuron_steps": ("t n h w c, n h w c, -> t n p q c, n h w c, n", (1, 0, None), (1, 0, 0)),
}


def _outputs(steps, state, pool):
  """Shapes of a layer call's (spikes, state, count) for its (N, H, W, C) state."""
  n, h, w, c = state.shape
  if pool and (h % 2 or w % 2):
    raise ValueError(f"spike_conv: pooling needs an even height and width, got {h}x{w}")
  spikes = (steps, n, h // 2, w // 2, c) if pool else (steps, n, h, w, c)
  return tuple(jax.ShapeDtypeStruct(shape, state.dtype) for shape in (spikes, state.shape, (n,)))


def _ffi(op: str, dtype: np.dtype, pool: bool | None, steps: int | None):
  """`f(*operands)` calling the kernel of `op` on whatever (per-device) shapes it is given."""
  name = f"bitnet_spike_{op}_{SUFFIX[dtype]}"

  def call(*args):
    if op in ("conv", "sparse_conv"):
      x, kernel = args                                                   # (T, N, H, W, Ci)
      flat = x.reshape((-1,) + x.shape[2:])                              # (T * N, H, W, Ci)
      out = jax.ShapeDtypeStruct(flat.shape[:3] + kernel.shape[3:], x.dtype)
      out = jax.ffi.ffi_call(name, out, vmap_method="sequential")(flat, kernel)
      return out.reshape(x.shape[:4] + kernel.shape[3:])                # (T, N, H, W, Co)
    if op == "kernel_grad":
      x, g = (a.reshape((-1,) + a.shape[2:]) for a in args)             # (T * N, H, W, C)
      out = jax.ShapeDtypeStruct((3, 3, x.shape[3], g.shape[3]), g.dtype)
      return jax.ffi.ffi_call(name, out, vmap_method="sequential")(x, g)
    if op == "neuron_steps":
      preds, state = args[0], args[1]
      return tuple(jax.ffi.ffi_call(name, _outputs(preds.shape[0], state, pool),
                                    vmap_method="sequential",
                                    input_output_aliases={1: 1})(*args, pool=pool))
    if op == "layer":
      x, state = args[0], args[3]
      return tuple(jax.ffi.ffi_call(name, _outputs(x.shape[0], state, pool),
                                    vmap_method="sequential",
                                    input_output_aliases={3: 1})(*args, pool=pool))
    state = args[1]
    return tuple(jax.ffi.ffi_call(name, _outputs(steps, state, pool), vmap_method="sequential",
                                  input_output_aliases={1: 1})(
                                      *args, pool=pool, steps=np.int64(steps)))
  return call


def _batch_spec(sharding, dim: int):
  """`sharding`'s mesh axes of dimension `dim` (None: unsharded or not a NamedSharding)."""
  spec = getattr(sharding, "spec", None)
  if spec is None or dim >= len(spec):
    return None
  return spec[dim]


def _shardings(mesh, axes, shapes, dims):
  """NamedShardings that shard dimension `dims[k]` of `shapes[k]` over `axes`, nothing else."""
  out = []
  for shape, dim in zip(shapes, dims):
    spec = [None] * len(shape.shape)
    if dim is not None:
      spec[dim] = axes
    out.append(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  return tuple(out)


@functools.cache
def batch_partitioned(op: str, dtype: np.dtype, pool: bool | None = None,
                       steps: int | None = None):
  """The kernel of `op` as an op that XLA's SPMD partitioner splits over the batch.

  Args:
    op: a key of `_RULES`.
    dtype: float32 or float64.
    pool, steps: the static settings of `layer`, `neuron` and `neuron_steps`.

  Returns:
    `f(*operands)` with the operands and results of the op; under a jit whose batch is sharded,
    each device's kernel call gets only its shard of the batch (one image per device of a
    4-image batch on 4 devices), and the results stay sharded the same way; under `jax.vmap`,
    one call per vmapped element.
  """
  rule, in_dims, out_dims = _RULES[op]
  call = _ffi(op, dtype, pool, steps)
  partitioned = custom_partitioning(call)
  single = len(out_dims) == 1  # an op with one result returns it bare, not in a tuple

  def batch_axes(arg_shapes):
    return _batch_spec(arg_shapes[0].sharding, in_dims[0])

  def results(result_shape):
    return result_shape if isinstance(result_shape, (tuple, list)) else (result_shape,)

  def infer(mesh, arg_shapes, result_shape):
    out = _shardings(mesh, batch_axes(arg_shapes), results(result_shape), out_dims)
    return out[0] if single else out

  def partition(mesh, arg_shapes, result_shape):
    axes = batch_axes(arg_shapes)
    out = _shardings(mesh, axes, results(result_shape), out_dims)
    lower = call
    if op == "kernel_grad" and axes is not None:
      lower = lambda *args: jax.lax.psum(call(*args), axes)  # the devices' sums, added
    return (mesh, lower, out[0] if single else out, _shardings(mesh, axes, arg_shapes, in_dims))

  # Every factor but the batch, in order of first appearance (Shardy wants them sorted so).
  factors = tuple(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
  partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                            need_replication_factors=tuple(f for f in factors if f != "n"))

  # custom_partitioning has no batching rule: under jax.vmap, call it once per vmapped element
  # (what the plain ffi_call's vmap_method="sequential" did).
  op_fn = jax.custom_batching.custom_vmap(lambda *args: partitioned(*args))

  @op_fn.def_vmap
  def _sequential(axis_size, in_batched, *args):
    del axis_size
    def one(batched):
      it = iter(batched)
      return op_fn(*[next(it) if b else a for a, b in zip(args, in_batched)])
    out = jax.lax.map(one, [a for a, b in zip(args, in_batched) if b])
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return op_fn
