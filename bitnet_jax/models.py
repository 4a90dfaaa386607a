"""BITnet6 and BITnet6_v101 as Flax Linen modules.

Why Linen: the parameters are a plain pytree, separate from the code, so the time engines are pure
functions of `(params, images)` that `jax.jit`, `jax.lax.scan`, `jax.checkpoint`, `custom_vjp`,
optax, orbax and `NamedSharding` all take as they are. (NNX objects would have to be split and
merged at every one of those boundaries.)

A module here defines the architecture and the *synapses* (the conv and linear layers). The time
loop, i.e. how the neurons are stepped, lives in `engines.py`, which calls `synapse` one layer at
a time.

Architecture (docs/ORIGINAL.md), channels int(64*fs), int(128*fs), int(256*fs), int(512*fs):

    begin : conv in -> 64fs  + IF  [+ 2x2 maxpool when the image is 64x64]
    layer1: conv     -> 64fs  + IF, maxpool
    layer2: conv     -> 128fs + IF, maxpool      (BITnet6_v101: no pool here ...)
    layer3: conv     -> 256fs + IF               (... but here)
    layer4: conv     -> 512fs + IF, maxpool
    mlp1  : linear 4*4*512fs -> classes + IF
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import layers
from bitnet_jax import neuron
from bitnet_jax.kernels import spike_conv

LAYERS = ("begin", "layer1", "layer2", "layer3", "layer4", "mlp1")
IMG_SIZES = (32, 64)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One spiking layer: its name, whether a 2x2 maxpool follows, and its output shape."""
  name: str
  pool: bool
  shape: tuple[int, ...]  # per image: (H, W, C) for convs, (classes,) for mlp1


def channels(fs: float) -> tuple[int, int, int, int]:
  """Conv widths of the release: int(64*fs), int(128*fs), int(256*fs), int(512*fs)."""
  return int(64 * fs), int(128 * fs), int(256 * fs), int(512 * fs)


def _torch_default_bias(fan_in: int):
  """PyTorch's default bias init for Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# PyTorch's default weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), ...).
_torch_default_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class BITnet6(nn.Module):
  """BITnet6 of the release (see the module docstring).

  Attributes:
    fs: feature scale (4 standard, 5 "Max"); may be fractional, channels are int(64*fs) etc.
    num_classes: size of the output layer.
    img_size: input height = width, 32 or 64 (64 adds a maxpool after `begin`).
    in_channels: 1 (grayscale) or 3 (RGB).
    surrogate: surrogate gradient of the spike: a string such as "ste" or "atan:2", parsed once
      here into a `neuron.Surrogate` (which the field then holds), or that object.
    dtype: compute dtype of the synapses (float32, or bfloat16 on GPU/TPU); parameters and
      membrane states stay float32 (float64 models, for exact tests, keep float64 states).
    kernel_parts: with a low-precision `dtype`, each synapse sums this many products, one per
      `dtype` part of the float32 kernel (hi, then the rounding rest, ...), accumulated in
      float32; the first layer, whose input (images) is not exact in `dtype` and which runs once
      per image, then runs in float32. Spikes are exact in bfloat16, so 3 parts (24 significant
      bits, float32's) give float32's synapses up to summation order; 1 (default) is the plain
      one-product cast.
    sparse: compute the convolutions on spikes (every conv but `begin`) with
      `spike_conv.conv`, a C++ XLA:CPU kernel that adds only the kernel rows of the active
      inputs (float32/float64, CPU only; its gradients skip zeros too, `spike_conv.input_grad`
      and `kernel_grad`). Same results up to summation order; its cost scales with the spike
      count instead of the layer size.
    precision: matmul/conv precision of every synapse, forward and backward: "highest" (default),
      "high" or "default", or the `jax.lax.Precision` member (see `PRECISIONS`). It changes
      nothing on CPU; "highest" keeps the release's float32 spikes on TPUs and on GPUs with TF32.
      The sparse synapses compute in exact float32 whatever this says (CPU only).
  """
  fs: float = 4.0
  num_classes: int = 10
  img_size: int = 32
  in_channels: int = 3
  surrogate: "str | neuron.Surrogate" = "ste"  # a string is parsed into a Surrogate once
  dtype: Any = jnp.float32
  kernel_parts: int = 1
  sparse: bool = False
  precision: Any = "highest"  # str or jax.lax.Precision: both hashable (modules are static args)

  pools_after = ("layer1", "layer2", "layer4")  # the 2x2 maxpools, besides the 64x64 one

  def __post_init__(self):
    # The surrogate string is parsed here, once; clones (every `apply`) get the object.
    object.__setattr__(self, "surrogate", neuron.get_surrogate(self.surrogate))
    super().__post_init__()
    self.validate()

  def validate(self):
    """Raises ValueError when the architecture cannot be built."""
    if not (isinstance(self.fs, (int, float)) and self.fs > 0):
      raise ValueError(f"fs must be a number > 0, got {self.fs!r}")
    if min(channels(self.fs)) < 1:
      raise ValueError(f"fs={self.fs} gives a layer with int(64*fs)={channels(self.fs)[0]} "
                       "channels; fs must be >= 1/64")
    if self.img_size not in IMG_SIZES:
      raise ValueError(f"img_size must be one of {IMG_SIZES} (the final feature map must be "
                       f"4x4), got {self.img_size!r}")
    if self.in_channels not in (1, 3):
      raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
    if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
    lax_precision(self.precision)
    if self.kernel_parts not in (1, 2, 3):
      raise ValueError(f"kernel_parts must be 1, 2 or 3, got {self.kernel_parts!r}")
    if self.sparse and jnp.dtype(self.dtype) not in (jnp.float32, jnp.float64):
      raise ValueError(f"sparse synapses compute in float32 or float64 (exact spikes times "
                       f"float32 weights), got dtype {jnp.dtype(self.dtype).name}")

  @property
  def lax_precision(self) -> jax.lax.Precision:
    """`precision` as a `jax.lax.Precision` member."""
    return lax_precision(self.precision)

  @property
  def state_dtype(self):
    """dtype of pred and the membrane: float32, or float64 for a float64 model (exact tests)."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def plan(self) -> tuple[LayerSpec, ...]:
    """The six spiking layers in order, with pools and per-image output shapes."""
    c1, c2, c3, c4 = channels(self.fs)
    widths = {"begin": c1, "layer1": c1, "layer2": c2, "layer3": c3, "layer4": c4}
    size, specs = self.img_size, []
    for name in LAYERS[:-1]:
      pool = name in self.pools_after or (name == "begin" and self.img_size == 64)
      specs.append(LayerSpec(name, pool, (size, size, widths[name])))
      size //= 2 if pool else 1
    specs.append(LayerSpec("mlp1", False, (self.num_classes,)))
    return tuple(specs)

  def setup(self):
    c1, c2, c3, c4 = channels(self.fs)
    fan_in = {"begin": 9 * self.in_channels, "layer1": 9 * c1, "layer2": 9 * c1,
              "layer3": 9 * c2, "layer4": 9 * c3}
    out = {"begin": c1, "layer1": c1, "layer2": c2, "layer3": c3, "layer4": c4}
    for name in LAYERS[:-1]:
      setattr(self, name, nn.Conv(
          out[name], (3, 3), padding=1, dtype=self.dtype, param_dtype=jnp.float32,
          precision=self.lax_precision, kernel_init=_torch_default_kernel,
          bias_init=_torch_default_bias(fan_in[name]), name=name))
    self.mlp1 = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                         precision=self.lax_precision, kernel_init=_torch_default_kernel,
                         bias_init=_torch_default_bias(16 * c4), name="mlp1")

  def synapse(self, layer: str, x: jax.Array) -> jax.Array:
    """The layer's conv/linear on its input, in float32 (the neuron clips it into `pred`).

    Args:
      layer: one of LAYERS.
      x: (N, H, W, C) input of the layer: images for `begin`, pooled spikes otherwise.

    Returns:
      (N, H, W, C_out) for convs, (N, num_classes) for `mlp1`.
    """
    if layer == "mlp1":
      x = x.reshape(x.shape[0], -1)  # (N, 4*4*c4), NHWC order
    if self.sparse and layer not in ("begin", "mlp1") and not self.is_initializing():
      params = self.variables["params"][layer]
      kernel = params["kernel"].astype(self.dtype)
      return spike_conv.conv(x.astype(self.dtype), kernel) + params["bias"]
    if self.kernel_parts == 1 or self.is_initializing():
      return getattr(self, layer)(x.astype(self.dtype)).astype(self.state_dtype)
    params = self.variables["params"][layer]
    kernel, bias = params["kernel"], params["bias"]
    if layer == "begin":
      return _linear(x.astype(kernel.dtype), kernel, kernel.dtype, self.lax_precision) + bias
    x = x.astype(self.dtype)              # spikes: 0/1, exact
    out, rest = 0, kernel
    for _ in range(self.kernel_parts):    # kernel = hi + mid + lo (+ what 3 parts cannot hold)
      part = rest.astype(self.dtype)
      rest = rest - part.astype(kernel.dtype)
      out = out + _linear(x, part, self.state_dtype, self.lax_precision)
    return out + bias

  def __call__(self, images: jax.Array) -> jax.Array:
    """One time step from rest (all states 0), through the layer contract (`layers.py`); used to
    initialise the parameters.

    Args:
      images: (B, H, W, C) normalised images.

    Returns:
      (B, num_classes) spikes of the last layer at the first step.
    """
    plan = self.plan()
    runs = tuple(layers.dense(spec, self.synapse, self.surrogate) for spec in plan)
    rest = layers.rest(plan, images.shape[0], self.state_dtype)
    _, out, _ = layers.through(runs, self.synapse("begin", images), rest, 1)
    return out[0]


class BITnet6_v101(BITnet6):  # pylint: disable=invalid-name
  """The release's variant with the second maxpool after layer3 instead of layer2."""
  pools_after = ("layer1", "layer3", "layer4")


VARIANTS = {"BITnet6": BITnet6, "BITnet6_v101": BITnet6_v101}


def create_module(variant: str = "BITnet6", **fields) -> BITnet6:
  """The module of `variant` with `fields` (see `BITnet6`); the one place modules are built."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: expected one of {tuple(VARIANTS)}")
  return VARIANTS[variant](**fields)


# Config names of the synapses' compute: (dtype, kernel_parts). "bfloat16x3" gives float32's spikes
# (up to summation order) from bfloat16 products, but on an NVIDIA H200 it trained 16x slower than
# plain "bfloat16" (28.5 against 468.8 images/s, docs/benchmarks.md): not for a GPU. Plain
# "bfloat16" (the GPU/TPU default, `auto`) diverges from float32's spikes over time steps, yet
# trained as well as float32 (docs/auto_study.md).
COMPUTE_DTYPES = {"float32": (jnp.float32, 1), "bfloat16": (jnp.bfloat16, 1),
                  "bfloat16x2": (jnp.bfloat16, 2), "bfloat16x3": (jnp.bfloat16, 3)}


# Config names of the synapses' matmul/conv precision (`jax.lax.Precision`; see its docstring and
# https://docs.jax.dev/en/latest/201/precision.html). It changes float32 operands only, and only
# on accelerators: on CPU all three compute float32 (the same spikes). On GPU, "default" and "high"
# both use TF32 where the GPU has it (Ampere and newer: inputs rounded to a 10-bit mantissa, so the
# spikes drift as with bfloat16 compute), float32 on older GPUs; "highest" is float32. On TPU,
# "default" is one bfloat16 pass (8-bit mantissa), "high" three passes (bf16x3), "highest" six
# (float32's accuracy). Faster modes cost accuracy; "highest" keeps the release's spikes.
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
              "default": jax.lax.Precision.DEFAULT}


def lax_precision(precision) -> jax.lax.Precision:
  """The `jax.lax.Precision` of a `PRECISIONS` name or member.

  Raises:
    ValueError: anything else (other strings, None, dot-algorithm presets).
  """
  if isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision in PRECISIONS:
    return PRECISIONS[precision]
  raise ValueError(f"precision must be one of {tuple(PRECISIONS)} or a jax.lax.Precision, got "
                   f"{precision!r}")


def compute_dtype(name: str) -> dict:
  """The module fields of a compute-dtype name: {"dtype": ..., "kernel_parts": ...}."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {name!r}")
  dtype, parts = COMPUTE_DTYPES[name]
  return {"dtype": dtype, "kernel_parts": parts}


def _linear(x: jax.Array, kernel: jax.Array, out_dtype,
            precision: jax.lax.Precision) -> jax.Array:
  """The synapse without its bias: a 3x3 'SAME' conv of (N, H, W, Ci) with an HWIO kernel, or a
  matmul of (N, D) with (D, K), accumulated and returned in `out_dtype`, at `precision`."""
  if kernel.ndim == 2:
    return jnp.dot(x, kernel, precision=precision, preferred_element_type=out_dtype)
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=precision, preferred_element_type=out_dtype)
