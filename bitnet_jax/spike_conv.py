"""Convolutions of 0/1 spikes that skip the zeros, for XLA:CPU (`csrc/spike_conv.cc`).

- `conv(spikes, kernel)` equals the 3x3 'SAME' convolution of `models._linear` (up to summation
  order): per output position it adds only the kernel rows of the active inputs around it, so
  its cost scales with the number of spikes instead of the number of inputs.
- `layer(spikes, kernel, bias, state, pool, surrogate, valid=None)` runs a spiking conv layer over
  the T time steps of its input spikes (T, N, H, W, Ci) in one call: at each step that synapse,
  the bias and the bddi neuron (`neuron.bddi`), then the 2x2 max pool and the per-image spike
  count. `valid`, a runtime int32 operand, masks the steps past it (a padded last chunk).
  The membranes stay in the L1 cache across steps and no float32 pre-activation is stored. Both
  engines run sparse models through it (`scan` with T = 1, `parallel` once per chunk);
- `neuron(pred, state, steps, pool, surrogate, valid=None)`: the same without the synapse, for a
  constant pred (the first layer, whose input is the image).

They differentiate as the dense computations do (`jax.custom_vjp`), so a model that uses them
trains, and the backward skips zeros too: `layer` recomputes its synapse with `conv` (the same
sums as the forward, so the same spikes), whose vjp is

- `input_grad(g, kernel)`: the convolution of the output's cotangent with the flipped kernel,
  adding per position only the rows of g's nonzero entries, each times its value (under the
  `ste` clip window and the max pool's routing, most of g is zero);
- `kernel_grad(x, g)`: per active input, the cotangent rows of the outputs it feeds, added into
  the kernel's gradient; rows of g that are zero are skipped.

`neuron`'s backward is elementwise (jnp). Under a jit whose batch is sharded over several
devices (data parallelism), each device's kernel runs on its own images only
(`custom_partitioning`, see "Sharding" below); `kernel_grad` then adds the devices' sums.

The kernel is C++ built on first use with the host's compiler (`$CXX`, else `c++`/`g++`;
`-O3 -march=native`) against the XLA FFI headers that jaxlib ships, and cached in
`$BITNET_JAX_CACHE` (default `~/.cache/bitnet_jax`) under a hash of its source, jaxlib's version
and the flags. `available()` says whether it can be used here and why not.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from bitnet_jax import neuron as bitnet_neuron  # this module's `neuron` is the fused op

SOURCE = Path(__file__).parent / "csrc" / "spike_conv.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cache_dir() -> Path:
  default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitnet_jax"
  return Path(os.environ.get("BITNET_JAX_CACHE", default))


def _build(compiler: str) -> Path:
  """Compiles the kernel (once per source, jaxlib and flags); returns the shared library."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  source = SOURCE.read_bytes()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(_FLAGS).encode())
  lib = _cache_dir() / f"spike_conv-{key.hexdigest()[:16]}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = Path(tmp) / lib.name
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"building the spike_conv kernel failed ({' '.join(cmd)}):\n"
                         f"{done.stderr[-4000:]}")
    os.replace(out, lib)  # atomic: a concurrent build never sees half a file
  return lib


@functools.cache
def _register() -> str | None:
  """Builds, loads and registers the kernel; returns None on success, else why it cannot run."""
  if jax.default_backend() != "cpu":
    return f"it runs on CPU only (the default backend is {jax.default_backend()!r})"
  if not hasattr(jax, "ffi"):
    return f"it needs jax.ffi (jax >= 0.5.0), found jax {jax.__version__}"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found (set $CXX, or install g++)"
  try:
    lib = _build(compiler)
  except (OSError, RuntimeError) as e:
    return str(e)
  import ctypes  # pylint: disable=import-outside-toplevel
  handle = ctypes.cdll.LoadLibrary(str(lib))
  for op, symbol in (("conv", "BitnetSpikeConv"), ("layer", "BitnetSpikeLayer"),
                     ("neuron", "BitnetSpikeNeuron"), ("sparse_conv", "BitnetSparseConv"),
                     ("kernel_grad", "BitnetSpikeKernelGrad")):
    for suffix in ("f32", "f64"):
      jax.ffi.register_ffi_target(f"bitnet_spike_{op}_{suffix}",
                                  jax.ffi.pycapsule(getattr(handle, symbol + suffix.upper())),
                                  platform="cpu")
  return None


def available() -> tuple[bool, str]:
  """(True, "") when `conv` can run here, else (False, the reason)."""
  why = _register()
  return why is None, why or ""


def check_available():
  """Raises RuntimeError saying why `conv` cannot run here."""
  ok, why = available()
  if not ok:
    raise RuntimeError(f"sparse synapses (spike_conv) are not available: {why}. "
                       "Use synapses=dense, or auto (sparse where the kernel runs).")


def _dense(x, kernel):
  """The dense convolution that `conv` equals, at `HIGHEST` like the kernel's float32 sums (sparse
  synapses run on CPU only, where the module's `precision` changes nothing)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------
# Sharding: the kernels see one device's share of the batch.
#
# XLA cannot look inside a custom call, so by default it gathers a batch-sharded input onto every
# device and runs the whole batch there. Each op is therefore wrapped in `custom_partitioning`:
# the images of a batch are independent, so with the batch dimension sharded over some mesh axes
# every device calls the kernel on its own images, and everything else (spatial dims, channels,
# time, the kernel, the bias) is replicated. Outside a sharded jit it is the plain call.

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
}


def _ffi(op: str, dtype: np.dtype, pool: bool | None, steps: int | None):
  """`f(*operands)` calling the kernel of `op` on whatever (per-device) shapes it is given."""
  name = f"bitnet_spike_{op}_{_SUFFIX[dtype]}"

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
def _batch_partitioned(op: str, dtype: np.dtype, pool: bool | None = None,
                       steps: int | None = None):
  """The kernel of `op` as an op that XLA's SPMD partitioner splits over the batch.

  Args:
    op: "conv", "layer" or "neuron".
    dtype: float32 or float64.
    pool, steps: the static settings of `layer` / `neuron`.

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


def _over_steps(op: str, x: jax.Array, other: jax.Array) -> jax.Array:
  """The partitioned `op` of x, (N, ...) or (T, N, ...), and `other` (the kernel; for
  `kernel_grad` the cotangent, shaped like x); its result for x's shape."""
  steps = x.ndim == 5
  if not steps:  # one step
    x, other = x[None], other[None] if op == "kernel_grad" else other
  out = _batch_partitioned(op, np.dtype(other.dtype))(x, other)
  return out if steps or op == "kernel_grad" else out[0]


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution (no bias) of 0/1 spikes, skipping the zeros.

  Args:
    x: (N, H, W, Ci) spikes, values 0 or 1, float32 or float64; or (T, N, H, W, Ci), T steps
      of them (the same as (T * N, H, W, Ci), but a device of a batch-sharded jit gets its own
      images of every step).
    kernel: (3, 3, Ci, Co) HWIO kernel of x's dtype.

  Returns:
    (N, H, W, Co) (or (T, N, H, W, Co)) in x's dtype.
  """
  _check("conv", x, kernel)
  return _over_steps("conv", x, kernel)


def _check(op, x, kernel, *more):
  """Raises ValueError unless x, kernel (and `more`) are a valid float32/float64 input."""
  if x.ndim not in (4, 5) or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"spike_conv.{op}: expected (N, H, W, Ci) (or (T, N, H, W, Ci)) spikes and "
                     f"a (3, 3, Ci, Co) kernel, got {x.shape} and {kernel.shape}")
  dtypes = {jnp.dtype(a.dtype) for a in (x, kernel, *more)}
  if len(dtypes) != 1 or dtypes.pop() not in _SUFFIX:
    raise ValueError(f"spike_conv.{op}: all inputs must be float32, or all float64, got "
                     f"{', '.join(str(a.dtype) for a in (x, kernel, *more))}")
  check_available()


def _conv_fwd(x, kernel):
  return conv(x, kernel), (x.astype(jnp.bool_), kernel)


def _conv_bwd(residual, g):
  """The dense convolution's gradients (up to summation order), skipping zeros: the input
  gradient through `input_grad` (g is mostly zeros under the ste window and the max pool's
  routing), the kernel gradient through `kernel_grad` (the inputs are mostly zeros)."""
  x, kernel = residual
  g = g.astype(kernel.dtype)
  return input_grad(g, kernel), kernel_grad(x, g)


conv.defvjp(_conv_fwd, _conv_bwd)


def input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """The input gradient of a 3x3 'SAME' convolution, adding only the rows of g's nonzeros.

  It is the convolution of g with the kernel flipped in space, its channel axes swapped,
  computed by the kernel of `conv` on real values: per output position, the rows of the nonzero
  entries of g around it, each times its value.

  Args:
    g: (N, H, W, Co) (or (T, N, H, W, Co), as in `conv`) cotangent of the convolution's
      output, float32 or float64.
    kernel: (3, 3, Ci, Co) HWIO kernel of g's dtype.

  Returns:
    (N, H, W, Ci) (or (T, N, H, W, Ci)): what autodiff of the dense convolution gives, up to
    summation order.
  """
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (3, 3, Co, Ci)
  _check("input_grad", g, flipped)
  return _over_steps("sparse_conv", g, flipped)


def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The kernel gradient of the 3x3 'SAME' convolution of 0/1 spikes x, visiting active inputs.

  dK[dy, dx, c, :] = the sum of g[n, y, x, :] over the positions where x[n, y + dy - 1,
  x + dx - 1, c] is 1; rows of g that are zero are skipped too.

  Args:
    x: (N, H, W, Ci) (or (T, N, H, W, Ci), as in `conv`) spikes, bool (or 0/1 values of any
      dtype, made bool here).
    g: (N, H, W, Co) (or (T, N, H, W, Co)) cotangent of the convolution's output, float32 or
      float64.

  Returns:
    (3, 3, Ci, Co) in g's dtype: what autodiff of the dense convolution gives, up to summation
    order. Under a batch-sharded jit, each device sums its own images and the sums are added.
  """
  if x.ndim not in (4, 5) or g.ndim != x.ndim or x.shape[:-1] != g.shape[:-1]:
    raise ValueError(f"spike_conv.kernel_grad: expected (N, H, W, Ci) (or (T, N, H, W, Ci)) "
                     f"spikes and a cotangent of the same shape but its channels, got {x.shape} "
                     f"and {g.shape}")
  if np.dtype(g.dtype) not in _SUFFIX:
    raise ValueError(f"spike_conv.kernel_grad: the cotangent must be float32 or float64, got "
                     f"{g.dtype}")
  check_available()
  return _over_steps("kernel_grad", x.astype(jnp.bool_), g)


def _layer_over_time(state, pool, surrogate, valid, **preds):
  """`neuron.layer_over_time` (the dense engine's layer) with the bddi neuron of `surrogate`."""
  return bitnet_neuron.layer_over_time(state, bitnet_neuron.get_surrogate(surrogate), pool,
                                       valid=valid, **preds)


def _dense_steps(x, kernel):
  """`_dense` of (T, N, H, W, Ci) spikes: (T, N, H, W, Co)."""
  out = _dense(x.reshape((-1,) + x.shape[2:]), kernel)
  return out.reshape(x.shape[:2] + out.shape[1:])


def _layer_dense(x, kernel, bias, state, pool, surrogate, valid=None, synapse=_dense_steps):
  """What `layer` computes, with the dense convolution. `synapse` (of (T, N, ...) spikes)
  chooses the convolution: `layer`'s backward differentiates this with `conv`, whose sums are
  those of `layer`'s kernel (so the recomputed spikes are the forward's) and whose gradients
  skip zeros."""
  pred = synapse(x, kernel) + bias  # (T, N, H, W, Co)
  return _layer_over_time(state, pool, surrogate, valid, preds=pred)


def _neuron_dense(pred, state, steps, pool, surrogate, valid=None):
  """What `neuron` computes, in jnp (its backward differentiates this)."""
  return _layer_over_time(state, pool, surrogate, valid, const=pred, length=steps)


def _outputs(steps, state, pool):
  """Shapes of a layer call's (spikes, state, count) for its (N, H, W, C) state."""
  n, h, w, c = state.shape
  if pool and (h % 2 or w % 2):
    raise ValueError(f"spike_conv: pooling needs an even height and width, got {h}x{w}")
  spikes = (steps, n, h // 2, w // 2, c) if pool else (steps, n, h, w, c)
  return tuple(jax.ShapeDtypeStruct(shape, state.dtype) for shape in (spikes, state.shape, (n,)))


def _check_valid(op: str, valid):
  """Raises ValueError unless `valid` is None or an integer scalar."""
  if valid is not None and (jnp.ndim(valid) != 0 or
                            not jnp.issubdtype(jnp.result_type(valid), jnp.integer)):
    raise ValueError(f"spike_conv.{op}: valid (the number of steps that run) must be None or an "
                     f"integer scalar, got {getattr(valid, 'shape', ())} "
                     f"{jnp.result_type(valid)}")


def _valid_operand(valid, steps: int) -> jax.Array:
  """The kernels' int32 scalar operand: the steps that run (all of them when `valid` is None)."""
  return jnp.asarray(steps if valid is None else valid, jnp.int32)


def layer(x, kernel, bias, state, pool: bool, surrogate: str, valid=None):
  """A spiking 3x3 conv layer over the time steps of its 0/1 input spikes, skipping the zeros.

  Args:
    x: (T, N, H, W, Ci) input spikes (0/1), float32 or float64.
    kernel: (3, 3, Ci, Co) HWIO kernel; bias: (Co,); state: (N, H, W, Co) membranes before the
      first step; all of x's dtype.
    pool: apply the 2x2 max pool to the output spikes.
    surrogate: the bddi surrogate (only the backward uses it).
    valid: None (all T steps run), or an integer scalar, a runtime operand (the compiled call
      does not depend on its value): only the first `valid` steps run; a later step leaves the
      membranes unchanged, emits no spike, counts nothing and has zero gradient
      (`neuron.over_time`). The kernel skips those steps' work.

  Returns:
    (spikes, state, count): (T, N, H/2, W/2, Co) or (T, N, H, W, Co) spikes, the (N, H, W, Co)
    membranes after the last step, (N,) spikes per image over the T steps, before pooling.
  """
  if x.ndim != 5:
    raise ValueError(f"spike_conv.layer: expected (T, N, H, W, Ci) spikes, got {x.shape}")
  _check("layer", jax.ShapeDtypeStruct(x.shape[1:], x.dtype), kernel, bias, state)
  co = kernel.shape[3]
  if state.shape != x.shape[1:4] + (co,) or bias.shape != (co,):
    raise ValueError(f"spike_conv.layer: expected a ({co},) bias and an {x.shape[1:4] + (co,)} "
                     f"state for spikes {x.shape} and kernel {kernel.shape}, got {bias.shape} "
                     f"and {state.shape}")
  _check_valid("layer", valid)
  return _layer(x, kernel, bias, state, valid, pool, surrogate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _layer(x, kernel, bias, state, valid, pool, surrogate):
  """`layer` after its checks; `valid` may be None (a pytree without leaves)."""
  del surrogate  # the forward does not depend on it
  operands = (x, kernel, bias, state, _valid_operand(valid, x.shape[0]))
  return tuple(_batch_partitioned("layer", np.dtype(x.dtype), pool)(*operands))


def _layer_fwd(x, kernel, bias, state, valid, pool, surrogate):
  out = _layer(x, kernel, bias, state, valid, pool, surrogate)
  return out, (x.astype(jnp.bool_), kernel, bias, state, valid)


def _layer_bwd(pool, surrogate, residual, g):
  x, kernel, bias, state, valid = residual
  f = lambda *args: _layer_dense(*args, pool, surrogate, valid, synapse=conv)
  _, vjp = jax.vjp(f, x.astype(kernel.dtype), kernel, bias, state)
  return vjp(g) + (None,)  # valid: an integer, no cotangent


_layer.defvjp(_layer_fwd, _layer_bwd)


def neuron(pred, state, steps: int, pool: bool, surrogate: str, valid=None):
  """`steps` bddi steps of a layer whose pred is constant (the first layer).

  Args:
    pred: (N, H, W, C) synaptic input (before the clip), float32 or float64.
    state: (N, H, W, C) membranes, pred's dtype.
    steps, pool, surrogate: time steps T; as in `layer`.
    valid: as in `layer`.

  Returns:
    (spikes, state, count) as in `layer`.
  """
  if pred.ndim != 4 or pred.shape != state.shape or pred.dtype != state.dtype or (
      np.dtype(pred.dtype) not in _SUFFIX):
    raise ValueError(f"spike_conv.neuron: expected (N, H, W, C) pred and state of one dtype, "
                     f"float32 or float64, got {pred.shape} {pred.dtype} and {state.shape} "
                     f"{state.dtype}")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"spike_conv.neuron: steps must be an int >= 1, got {steps!r}")
  _check_valid("neuron", valid)
  check_available()
  return _neuron(pred, state, valid, steps, pool, surrogate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _neuron(pred, state, valid, steps, pool, surrogate):
  """`neuron` after its checks."""
  del surrogate  # the forward does not depend on it
  return tuple(_batch_partitioned("neuron", np.dtype(pred.dtype), pool, steps)(
      pred, state, _valid_operand(valid, steps)))


def _neuron_fwd(pred, state, valid, steps, pool, surrogate):
  return _neuron(pred, state, valid, steps, pool, surrogate), (pred, state, valid)


def _neuron_bwd(steps, pool, surrogate, residual, g):
  pred, state, valid = residual
  _, vjp = jax.vjp(lambda *args: _neuron_dense(*args, steps, pool, surrogate, valid), pred, state)
  return vjp(g) + (None,)  # valid: an integer, no cotangent


_neuron.defvjp(_neuron_fwd, _neuron_bwd)
