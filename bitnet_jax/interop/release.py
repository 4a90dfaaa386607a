"""The release's checkpoint layout, and its mapping from and to our Flax parameters.

The release (a PyTorch LightningModule holding the network as ``self.model``) stores conv
weights OIHW and ``mlp1``'s weight as ``(num_classes, C*H*W)`` over a ``(C, H, W)`` flattening,
under keys ``model.<layer>.layer.weight|bias``; our Flax parameters are HWIO and
``(H*W*C, num_classes)`` over an ``(H, W, C)`` flattening (docs/INTERFACES.md).

Reading the file safely is `torch_reader.py`; writing one is `torch_writer.py`.

Example:
  >>> model = load_torch_checkpoint('cifar10_bitnet6.ckpt', fs=4, num_classes=10)
  >>> counts = bitnet_jax.spike_counts(model, images_nhwc, 50)
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bitnet_jax import api
from bitnet_jax import errors
from bitnet_jax import models
from bitnet_jax.interop import torch_reader
from bitnet_jax.interop.safe_pickle import CheckpointFormatError

LAYERS = models.LAYERS
CONV_LAYERS = LAYERS[:-1]
PREFIX = "model."  # the LightningModule holds the network as `self.model`


def expected_torch_shapes(*, fs: float, num_classes: int, img_size: int = 32,
                          in_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """The release's state-dict shapes (without the ``model.`` prefix).

  Args:
    fs: feature scale; channels int(64*fs), int(128*fs), int(256*fs), int(512*fs).
    num_classes: size of mlp1.
    img_size: 32 or 64 (the last pooled map is 4x4 for both).
    in_channels: image channels.

  Returns:
    ``{'begin.layer.weight': (c1, in_channels, 3, 3), ..., 'mlp1.layer.bias': (classes,)}``.

  Raises:
    ConfigError: an unknown img_size, or an empty layer (a ValueError).
  """
  if img_size not in models.IMG_SIZES:
    raise errors.ConfigError(f"img_size must be one of {models.IMG_SIZES}, got {img_size!r}")
  c1, c2, c3, c4 = models.channels(fs)
  if min(c1, num_classes, in_channels) < 1:
    raise errors.ConfigError(f"fs={fs}, num_classes={num_classes}, in_channels={in_channels} "
                             "give an empty layer")
  io_ = {"begin": (in_channels, c1), "layer1": (c1, c1), "layer2": (c1, c2),
         "layer3": (c2, c3), "layer4": (c3, c4)}
  shapes = {}
  for name in CONV_LAYERS:
    i, o = io_[name]
    shapes[f"{name}.layer.weight"] = (o, i, 3, 3)
    shapes[f"{name}.layer.bias"] = (o,)
  shapes["mlp1.layer.weight"] = (num_classes, c4 * 4 * 4)
  shapes["mlp1.layer.bias"] = (num_classes,)
  return shapes


def _architecture_hint(sd: Mapping[str, np.ndarray]) -> str:
  """What architecture the found shapes suggest, for error messages."""
  try:
    c1, in_ch = sd["begin.layer.weight"].shape[:2]
    classes = sd["mlp1.layer.weight"].shape[0]
    return (f" The checkpoint looks like fs={c1 / 64:g}, num_classes={classes}, "
            f"in_channels={in_ch}.")
  except (KeyError, AttributeError, ValueError):
    return ""


def to_flax_params(state_dict: Mapping[str, Any], *, variant: str = "BITnet6", fs: float,
                   num_classes: int, img_size: int = 32, in_channels: int = 3
                   ) -> dict[str, dict[str, np.ndarray]]:
  """Converts a release state dict to our Flax parameters (docs/INTERFACES.md).

  Args:
    state_dict: ``{'model.<layer>.layer.weight'|'bias': array}`` (the ``model.`` prefix is
      optional), conv weights OIHW, ``mlp1`` weight ``(num_classes, C*H*W)`` over a
      ``(C, H, W)`` flattening.
    variant: 'BITnet6' or 'BITnet6_v101' (same parameter shapes; only checked).
    fs: feature scale of the checkpoint.
    num_classes: number of classes of the checkpoint.
    img_size: 32 or 64.
    in_channels: image channels.

  Returns:
    ``{'begin': {'kernel': (3, 3, in, c1), 'bias': (c1,)}, ..., 'mlp1': {'kernel':
    (4*4*c4, num_classes), 'bias': (num_classes,)}}`` as float32 NumPy arrays, ``mlp1``'s
    kernel rows in ``(h, w, c)`` order.

  Raises:
    ConfigError: an unknown variant, or shape mismatches: the weights are of another
      architecture (the message names each key with the expected and the found shape).
    CheckpointFormatError: missing or unexpected keys, non-floating tensors.
    (Both are ValueErrors.)
  """
  if variant not in models.VARIANTS:
    raise errors.ConfigError(f"variant must be one of {tuple(models.VARIANTS)}, got {variant!r}")
  expected = expected_torch_shapes(fs=fs, num_classes=num_classes, img_size=img_size,
                                   in_channels=in_channels)
  sd: dict[str, Any] = {}
  for key, value in state_dict.items():
    short = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if short in sd:
      raise CheckpointFormatError(f"state dict has both '{short}' and '{PREFIX}{short}'")
    sd[short] = value
  missing = [PREFIX + k for k in expected if k not in sd]
  unexpected = [PREFIX + k for k in sd if k not in expected]
  if missing or unexpected:
    raise CheckpointFormatError(
        f"state dict does not match a {variant} (fs={fs}, num_classes={num_classes}): "
        f"missing keys {missing}, unexpected keys {unexpected}.")
  mismatched = [f"{PREFIX}{k}: expected {expected[k]}, found {tuple(np.shape(sd[k]))}"
                for k in expected if tuple(np.shape(sd[k])) != expected[k]]
  if mismatched:
    raise errors.ConfigError(
        f"state dict shapes do not match a {variant} with fs={fs}, num_classes={num_classes}, "
        f"img_size={img_size}, in_channels={in_channels}: " + "; ".join(mismatched) + "."
        + _architecture_hint(sd))
  params = {}
  for name in LAYERS:
    w = np.asarray(sd[f"{name}.layer.weight"])
    b = np.asarray(sd[f"{name}.layer.bias"])
    for key, arr in (("weight", w), ("bias", b)):
      if arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16":
        raise CheckpointFormatError(
            f"{PREFIX}{name}.layer.{key} must be floating point, found {arr.dtype}")
    w, b = w.astype(np.float32), b.astype(np.float32)
    if name == "mlp1":
      c4 = w.shape[1] // 16
      kernel = w.reshape(num_classes, c4, 4, 4)  # (out, C, H, W)
      kernel = kernel.transpose(2, 3, 1, 0).reshape(16 * c4, num_classes)  # (H*W*C, out)
    else:
      kernel = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    params[name] = {"kernel": np.ascontiguousarray(kernel), "bias": b}
  return params


def _unwrap_params(params) -> Mapping[str, Any]:
  if hasattr(params, "params") and hasattr(params, "module"):  # a bitnet_jax Model
    params = params.params
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  if not isinstance(params, Mapping) or set(params) != set(LAYERS):
    found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"params must have exactly the layers {list(LAYERS)}, found {found}")
  return params


def to_torch_state_dict(params) -> dict[str, np.ndarray]:
  """Converts our Flax parameters to the release's state dict (inverse of `to_flax_params`).

  Args:
    params: our parameters (docs/INTERFACES.md), a ``{'params': ...}`` wrapper or a `Model`.

  Returns:
    ``{'model.<layer>.layer.weight'|'bias': np.ndarray}`` in the release's order and layout
    (conv OIHW, ``mlp1`` ``(num_classes, C*H*W)``), in the parameters' dtype.
  """
  params = _unwrap_params(params)
  out = {}
  for name in LAYERS:
    kernel = np.asarray(params[name]["kernel"])
    bias = np.asarray(params[name]["bias"])
    if name == "mlp1":
      c4 = np.shape(params["layer4"]["kernel"])[-1]
      hw, rem = divmod(kernel.shape[0], c4)
      side = math.isqrt(hw)
      if kernel.ndim != 2 or rem or side * side != hw:
        raise ValueError(f"mlp1 kernel must be (H*W*{c4}, classes) with H == W, found "
                         f"{kernel.shape}")
      w = kernel.reshape(side, side, c4, -1).transpose(3, 2, 0, 1)  # (out, C, H, W)
      w = w.reshape(w.shape[0], -1)
    else:
      if kernel.ndim != 4:
        raise ValueError(f"{name} kernel must be HWIO, found shape {kernel.shape}")
      w = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    out[f"{PREFIX}{name}.layer.weight"] = np.ascontiguousarray(w)
    out[f"{PREFIX}{name}.layer.bias"] = bias
  return out


def to_reference_weights(params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Our Flax parameters as ``{'begin': (W_oihw, b), ..., 'mlp1': (W, b)}`` for `reference.run`."""
  sd = to_torch_state_dict(params)
  return {name: (sd[f"{PREFIX}{name}.layer.weight"], sd[f"{PREFIX}{name}.layer.bias"])
          for name in LAYERS}


def load_torch_checkpoint(path, *, variant: str = "BITnet6", fs: float, num_classes: int,
                          img_size: int = 32, in_channels: int = 3, surrogate: str = "ste",
                          strict: bool = True, **create_kwargs):
  """Builds a `bitnet_jax.Model` with the weights of a release checkpoint.

  Args:
    path: the release's ``.ckpt`` file.
    variant: 'BITnet6' or 'BITnet6_v101' (the checkpoint does not record it).
    fs: feature scale (4 standard, 5 "Max").
    num_classes: 10, 100 or 200 for the released models.
    img_size: 32 (CIFAR) or 64 (Tiny-ImageNet).
    in_channels: image channels.
    surrogate: surrogate gradient for fine-tuning (does not change the forward pass).
    strict: see `torch_reader.load_checkpoint`.
    **create_kwargs: passed on to `bitnet_jax.create_model` (e.g. ``dtype``).

  Returns:
    ``create_model(variant, fs=..., ..., params=params)``: a `bitnet_jax.Model`.

  Raises:
    CheckpointError, CheckpointFormatError, UnsafeCheckpointError: see
      `torch_reader.read_state_dict`.
    ConfigError, CheckpointFormatError: the weights do not fit the requested architecture (see
      `to_flax_params`).
  """
  state_dict = torch_reader.read_state_dict(path, strict=strict)
  params = to_flax_params(state_dict, variant=variant, fs=fs, num_classes=num_classes,
                          img_size=img_size, in_channels=in_channels)
  # create_model checks the converted tree against the module's own shapes (no random init).
  return api.create_model(variant, fs=fs, num_classes=num_classes, img_size=img_size,
                          in_channels=in_channels, surrogate=surrogate, params=params,
                          **create_kwargs)
