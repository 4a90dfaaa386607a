"""Plain NumPy reference of the original BITnet release's per-step loop.

This module is the ground truth that the fast JAX engines are tested against. It is written
only from the description of the PyTorch release (``docs/ORIGINAL.md``) and deliberately shares no
code with the rest of ``bitnet_jax``: it uses the release's own layout (NCHW images, OIHW conv
weights, ``(out, in)`` linear weights, ``(C, H, W)`` flattening) and simulates the network one
time step at a time, exactly like the release.

Per time step, for each layer ``l`` (``begin, layer1, ..., layer4, mlp1``)::

  pred   = clip(layer_l(input), 0, 1)   # conv 3x3 stride 1 pad 1, or linear
  c      = state_l + pred                # state_l starts at 0
  spike  = (c >= 1)                      # threshold 1, spike value 1
  state_l = c - spike                    # reset by subtraction
  input  = maxpool2x2(spike) if layer l is followed by a pool else spike

Pools: ``begin`` (only for 64x64 images), ``layer1``, ``layer4`` and ``layer2`` (``BITnet6``) or
``layer3`` (``BITnet6_v101``). The input of ``mlp1`` is the last pooled map flattened in
``(C, H, W)`` order. The class score is the sum over steps of ``mlp1``'s spikes.

Only the first layer's convolution is hoisted out of the loop (its input, the image, is the same
at every step); everything else is recomputed at every step as in the release.

Example:
  >>> out = run(weights, images_nchw, steps=50)
  >>> predict(out['counts'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

LAYERS = ("begin", "layer1", "layer2", "layer3", "layer4", "mlp1")
VARIANTS = ("BITnet6", "BITnet6_v101")
IMAGE_SIZES = (32, 64)

__all__ = [
    "LAYERS",
    "VARIANTS",
    "conv3x3_nchw",
    "if_step",
    "maxpool2x2_nchw",
    "pool_after",
    "predict",
    "run",
]


def pool_after(variant: str, img_size: int) -> dict[str, bool]:
  """Which layers of the release are followed by a 2x2 max-pool on their spikes.

  Args:
    variant: 'BITnet6' (pools after layer1, layer2, layer4) or 'BITnet6_v101' (pools after
      layer1, layer3, layer4).
    img_size: 32 or 64; a 64x64 image adds a pool right after ``begin``.

  Returns:
    ``{layer_name: bool}`` for every name in ``LAYERS``.

  Raises:
    ValueError: unknown variant or image size.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  if img_size not in IMAGE_SIZES:
    raise ValueError(f"img_size must be one of {IMAGE_SIZES}, got {img_size!r}.")
  return {
      "begin": img_size == 64,
      "layer1": True,
      "layer2": variant == "BITnet6",
      "layer3": variant == "BITnet6_v101",
      "layer4": True,
      "mlp1": False,
  }


def conv3x3_nchw(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """PyTorch ``Conv2d(kernel_size=3, stride=1, padding=1)`` in NumPy (im2col + tensordot).

  Args:
    x: input, ``(B, C, H, W)``.
    w: weight, OIHW ``(O, C, 3, 3)``.
    b: bias, ``(O,)``.

  Returns:
    ``(B, O, H, W)`` in the result dtype of ``x`` and ``w``.

  Raises:
    ValueError: shapes that do not fit together.
  """
  if x.ndim != 4:
    raise ValueError(f"conv input must be (B, C, H, W), got shape {x.shape}.")
  if w.ndim != 4 or w.shape[2:] != (3, 3) or w.shape[1] != x.shape[1]:
    raise ValueError(
        f"conv weight must be (O, {x.shape[1]}, 3, 3) for an input with {x.shape[1]} "
        f"channels, got shape {w.shape}.")
  if b.shape != (w.shape[0],):
    raise ValueError(f"conv bias must be ({w.shape[0]},), got shape {b.shape}.")
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))  # (B, C, H+2, W+2), zero padding
  # cols[b, c, h, w, i, j] = xp[b, c, h + i, w + j]: a view, no copy.
  cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # (B,C,H,W,3,3)
  out = np.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3]))  # (B, H, W, O)
  return out.transpose(0, 3, 1, 2) + b[None, :, None, None]  # (B, O, H, W)


def maxpool2x2_nchw(x: np.ndarray) -> np.ndarray:
  """``MaxPool2d(2, 2)`` on ``(B, C, H, W)`` with even H and W -> ``(B, C, H/2, W/2)``."""
  bsz, ch, h, w = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"maxpool 2x2 needs an even height and width, got shape {x.shape}.")
  return x.reshape(bsz, ch, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def if_step(state: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One integrate-and-fire step of the release (threshold 1, reset by subtraction).

  Args:
    state: membrane before the step, any shape; 0 at the first step.
    pred: the clamped layer output ``clip(layer(input), 0, 1)``, same shape.

  Returns:
    ``(spike, new_state)``: ``spike = (state + pred >= 1)`` as 0/1 in the dtype of the sum,
    ``new_state = state + pred - spike``.
  """
  c = state + pred
  spike = (c >= 1).astype(c.dtype)
  return spike, c - spike


def _check_weights(weights: Mapping[str, Any], in_channels: int, dtype) -> dict:
  """Validates the release-layout weights and casts them to ``dtype``."""
  missing = [k for k in LAYERS if k not in weights]
  unexpected = [k for k in weights if k not in LAYERS]
  if missing or unexpected:
    raise ValueError(
        f"weights must have exactly the keys {list(LAYERS)}; missing {missing}, "
        f"unexpected {unexpected}.")
  out = {}
  prev = in_channels
  for name in LAYERS:
    try:
      w, b = weights[name]
    except (TypeError, ValueError) as e:
      raise ValueError(f"weights[{name!r}] must be a pair (W, b).") from e
    w = np.asarray(w, dtype=dtype)
    b = np.asarray(b, dtype=dtype)
    if name == "mlp1":
      if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(
            f"weights['mlp1'] must be W (out, in) and b (out,), got W {w.shape} and "
            f"b {b.shape}.")
    else:
      if w.ndim != 4 or w.shape[1:] != (prev, 3, 3) or b.shape != (w.shape[0],):
        raise ValueError(
            f"weights[{name!r}] must be W OIHW (O, {prev}, 3, 3) and b (O,), got W "
            f"{w.shape} and b {b.shape}.")
      prev = w.shape[0]
    out[name] = (w, b)
  return out


def run(weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
        images_nchw: np.ndarray,
        steps: int,
        variant: str = "BITnet6",
        dtype=np.float64,
        return_spike_trains: bool = False) -> dict[str, np.ndarray]:
  """Runs the release's per-step loop for ``steps`` time steps.

  Args:
    weights: ``{'begin': (W, b), 'layer1': ..., 'layer4': ..., 'mlp1': (W, b)}``; conv W
      OIHW ``(O, I, 3, 3)``, linear W ``(num_classes, C*H*W)`` over the ``(C, H, W)``
      flattening of the last pooled map (release layout).
    images_nchw: normalised images, ``(B, C, H, W)`` with H = W = 32 or 64.
    steps: number of time steps T (>= 0).
    variant: 'BITnet6' or 'BITnet6_v101'.
    dtype: floating dtype of every computation (float64 by default).
    return_spike_trains: also return every layer's spikes at every step (before pooling).

  Returns:
    A dict with
      'counts': ``(B, num_classes)`` int64, sum over steps of ``mlp1``'s spikes;
      'layer_spikes': ``(B, 6)`` int64, total spikes of each layer (before pooling) per
        image, in the order of ``LAYERS``;
      'final_state': ``(B, num_classes)`` ``dtype``, residual membrane of ``mlp1``;
      'spike_trains' (only if requested): list of 6 arrays ``(T, B, C, H, W)`` for the
        convs and ``(T, B, num_classes)`` for ``mlp1``, in ``dtype``.

  Raises:
    ValueError: bad variant, image shape, step count or weight shapes.
  """
  x = np.asarray(images_nchw, dtype=dtype)
  if x.ndim != 4 or x.shape[2] != x.shape[3]:
    raise ValueError(f"images must be (B, C, H, W) with H == W, got shape {x.shape}.")
  pools = pool_after(variant, x.shape[2])
  if not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
  w = _check_weights(weights, x.shape[1], dtype)
  bsz = x.shape[0]
  num_classes = w["mlp1"][0].shape[0]

  # The image is the same at every step, so the first conv is computed once.
  pred_begin = np.clip(conv3x3_nchw(x, *w["begin"]), 0, 1)  # (B, c1, H, W)
  states = {name: None for name in LAYERS}  # lazily zeros of the right shape
  counts = np.zeros((bsz, num_classes), dtype=np.int64)
  layer_spikes = np.zeros((bsz, len(LAYERS)), dtype=np.int64)
  trains = {name: [] for name in LAYERS}

  for _ in range(steps):
    inp = None
    for li, name in enumerate(LAYERS):
      if name == "begin":
        pred = pred_begin
      elif name == "mlp1":
        flat = inp.reshape(bsz, -1)  # (B, C*H*W) in (C, H, W) order
        wm, bm = w["mlp1"]
        if flat.shape[1] != wm.shape[1]:
          raise ValueError(
              f"mlp1 weight expects {wm.shape[1]} inputs but the last pooled map "
              f"{inp.shape[1:]} has {flat.shape[1]}.")
        pred = np.clip(flat @ wm.T + bm, 0, 1)  # (B, num_classes)
      else:
        pred = np.clip(conv3x3_nchw(inp, *w[name]), 0, 1)  # (B, O, H, W)
      if states[name] is None:
        states[name] = np.zeros_like(pred)
      spike, states[name] = if_step(states[name], pred)
      layer_spikes[:, li] += spike.reshape(bsz, -1).sum(axis=1).astype(np.int64)
      if return_spike_trains:
        trains[name].append(spike)
      inp = maxpool2x2_nchw(spike) if pools[name] else spike
    counts += inp.astype(np.int64)  # inp is mlp1's spikes, (B, num_classes)

  final_state = states["mlp1"]
  if final_state is None:  # steps == 0
    final_state = np.zeros((bsz, num_classes), dtype=dtype)
  out = {"counts": counts, "layer_spikes": layer_spikes, "final_state": final_state}
  if return_spike_trains:
    out["spike_trains"] = [_stack(trains[n], steps) for n in LAYERS]
  return out


def _stack(arrays: list[np.ndarray], steps: int) -> np.ndarray:
  if steps == 0:
    return np.zeros((0,))
  return np.stack(arrays)


def predict(counts: np.ndarray) -> np.ndarray:
  """Class prediction from spike counts: argmax, the first maximum on ties (as the release).

  Args:
    counts: ``(..., num_classes)``.

  Returns:
    ``(...,)`` int64 class indices.
  """
  return np.argmax(np.asarray(counts), axis=-1)
