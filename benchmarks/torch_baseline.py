"""PyTorch baseline for the bitnet-jax benchmark.

A faithful re-creation of the *structure* of the original BITnet release (PyTorch): one
``nn.Module`` per spiking layer holding ``.layer`` (Conv2d 3x3/1/1 or Linear), a Python loop over
time steps, the whole batch at every step, the first layer recomputed at every step (the release
does not cache it), and the count of the last layer's spikes as the class score.  The release has
no backward for its neuron; here training uses autograd through all steps with a straight-through
estimator for the spike (see ``SpikeSTE``) and the release's training signal
``MSE(clamp(counts, max=steps) / steps, one_hot(label))``.

Run ``python benchmarks/torch_baseline.py --help``; it prints one JSON line with the throughput
and the peak resident memory of the process.  ``--device cuda`` runs it on the GPU (timers read
after ``torch.cuda.synchronize()``; the JSON adds the GPU's name, ``cuda_max_memory_gib`` and
whether cuDNN may use TF32 for float32 convolutions, PyTorch's default).  ``--dtype bfloat16``
runs the layers under ``torch.autocast(device, bfloat16)``; weights and membranes stay float32.
Importable API: ``build_model``, ``train_step``, ``eval_counts``, ``load_npz_weights``,
``synthetic_batch``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("BITnet6", "BITnet6_v101")

# Per-dataset normalisation of the release (CIFAR-10/100 share theirs; 64x64 is Tiny-ImageNet).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)


# ----------------------------------------------------------------------------------------------
# Neuron
# ----------------------------------------------------------------------------------------------
class SpikeSTE(torch.autograd.Function):
    """Forward: ``(c >= 1).float()``.  Backward: the gradient passes through unchanged.

    With reset by subtraction (``state' = c - spike``) this gives d state'/dc = 0, so the gradient
    of the spike count wrt each step's ``pred`` is 1 inside the clamp window (the "rate view").
    """

    @staticmethod
    def forward(ctx, c):
        return (c >= 1.0).to(c.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out


spike_fn = SpikeSTE.apply


class SpikingLayer(nn.Module):
    """``.layer`` followed by the integrate-and-fire neuron of the release (threshold 1)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, state):
        pred = torch.clamp(self.layer(x), 0.0, 1.0)
        # state starts at 0: ``None`` means zero.  The membrane is kept in float32 even when the
        # layer runs under bf16 autocast (bf16 + fp32 promotes to fp32; spikes 0/1 are exact in
        # bf16 when they feed the next layer).
        # (float64, for the exactness tests, stays float64.)
        if state is None:
            c = pred if pred.dtype == torch.float64 else pred.float()
        else:
            c = state + pred
        spike = spike_fn(c)
        return spike, c - spike


def _conv(cin, cout):
    return SpikingLayer(nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1))


class BITnet6(nn.Module):
    """BITnet6 / BITnet6_v101 of the release; ``forward(images, steps)`` returns the counts."""

    def __init__(self, fs=4.0, num_classes=10, img_size=32, in_channels=3, variant="BITnet6"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        c1, c2, c3, c4 = int(64 * fs), int(128 * fs), int(256 * fs), int(512 * fs)
        self.variant = variant
        self.img_size = img_size
        self.pool_begin = img_size == 64  # extra 2x2 maxpool right after ``begin`` at 64x64
        side = img_size // 2 if self.pool_begin else img_size
        side //= 8  # three more 2x2 pools
        if side < 1:
            raise ValueError(f"img_size {img_size} too small")
        self.begin = _conv(in_channels, c1)
        self.layer1 = _conv(c1, c1)
        self.layer2 = _conv(c1, c2)
        self.layer3 = _conv(c2, c3)
        self.layer4 = _conv(c3, c4)
        self.mlp1 = SpikingLayer(nn.Linear(c4 * side * side, num_classes))
        # Where the 2x2 maxpools on spikes go (besides the optional one after ``begin``).
        if variant == "BITnet6":
            self.pool_after = ("layer1", "layer2", "layer4")
        else:  # BITnet6_v101: the 2nd pool moves from after layer2 to after layer3
            self.pool_after = ("layer1", "layer3", "layer4")

    def forward(self, images, steps):
        names = ("begin", "layer1", "layer2", "layer3", "layer4", "mlp1")
        states = dict.fromkeys(names)
        counts = None
        for _ in range(steps):
            x = images  # the release recomputes ``begin`` on the same image at every step
            for name in names:
                if name == "mlp1":
                    x = torch.flatten(x, 1)  # (C, H, W) channel-major, as the release
                x, states[name] = getattr(self, name)(x, states[name])
                if (name == "begin" and self.pool_begin) or name in self.pool_after:
                    x = F.max_pool2d(x, 2)
            counts = x if counts is None else counts + x
        return counts


def build_model(fs=4.0, classes=10, img_size=32, variant="BITnet6", in_channels=3):
    return BITnet6(fs=fs, num_classes=classes, img_size=img_size, in_channels=in_channels,
                   variant=variant)


def count_params(model):
    return int(sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def _autocast(dtype, device_type="cpu"):
    """``torch.autocast(device_type, dtype)``, or nothing for float32 (``None`` means float32)."""
    if dtype in (None, torch.float32, "float32"):
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        dtype = torch.bfloat16
    return torch.autocast(device_type, dtype=dtype)


def release_loss(counts, labels, steps, num_classes):
    """The release's training signal: MSE(clamp(counts, max=steps)/steps, one_hot(label))."""
    target = F.one_hot(labels, num_classes).to(torch.float32)
    rate = torch.clamp(counts.float(), max=float(steps)) / steps
    return F.mse_loss(rate, target)


def train_step(model, optimizer, images, labels, steps, autocast_dtype=None):
    """One optimizer step on one batch; returns the loss as a Python float."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(autocast_dtype, images.device.type):
        counts = model(images, steps)
    loss = release_loss(counts, labels, steps, counts.shape[-1])
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def eval_counts(model, images, steps, autocast_dtype=None):
    """Spike counts (B, classes) of the last layer summed over ``steps`` time steps."""
    model.eval()
    with torch.inference_mode(), _autocast(autocast_dtype, images.device.type):
        counts = model(images, steps)
    return counts.float()


def make_optimizer(model, name="sgd", lr=0.01):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


# ----------------------------------------------------------------------------------------------
# Data and weights
# ----------------------------------------------------------------------------------------------
def synthetic_batch(batch, classes, img_size, seed=0, in_channels=3):
    """A fixed seeded batch: uint8-like images normalised as the release, and labels."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, in_channels, img_size, img_size), generator=g)
    mean, std = (TINY_MEAN, TINY_STD) if img_size == 64 else (CIFAR_MEAN, CIFAR_STD)
    mean = torch.tensor(mean[:in_channels]).view(1, -1, 1, 1)
    std = torch.tensor(std[:in_channels]).view(1, -1, 1, 1)
    images = ((raw.float() / 255.0) - mean) / std
    labels = torch.randint(0, classes, (batch,), generator=g)
    return images.contiguous(), labels


def load_npz_weights(model, path):
    """Load a .npz of arrays named by the torch state_dict keys (optional ``model.`` prefix)."""
    own = model.state_dict()
    new = {}
    with np.load(path) as data:
        for key in data.files:
            name = key[len("model."):] if key.startswith("model.") else key
            if name not in own:
                raise KeyError(f"{path}: unexpected array {key!r}")
            arr = np.asarray(data[key], dtype=np.float32)
            if tuple(arr.shape) != tuple(own[name].shape):
                raise ValueError(f"{path}: {key!r} has shape {arr.shape}, model expects "
                                 f"{tuple(own[name].shape)}")
            new[name] = torch.from_numpy(arr.copy())
    missing = sorted(set(own) - set(new))
    if missing:
        raise KeyError(f"{path}: missing arrays {missing}")
    model.load_state_dict(new, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cuda_report(device):
    """The JSON keys of a CUDA run: GPU name, peak allocated memory, TF32 use of float32 convs."""
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(),
        "cuda_max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--variant", choices=VARIANTS, default="BITnet6")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: the layers under torch.autocast(device, bfloat16); weights and "
                        "membrane state stay float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weights", default=None, help=".npz with torch state_dict keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels_last", action="store_true",
                   help="NHWC memory format (not what the release does; off by default)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")

    threads = args.threads or _default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    model = build_model(args.fs, args.classes, args.img_size, args.variant)
    if args.weights:
        load_npz_weights(model, args.weights)
    images, labels = synthetic_batch(args.batch, args.classes, args.img_size, seed=args.seed)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    model, images, labels = model.to(args.device), images.to(args.device), labels.to(args.device)
    amp = None if args.dtype == "float32" else torch.bfloat16

    if args.mode == "train":
        opt = make_optimizer(model, args.optimizer, args.lr)

        def run():
            return train_step(model, opt, images, labels, args.steps, amp)
    else:
        def run():
            return float(eval_counts(model, images, args.steps, amp).sum())

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        run()
    sync()
    t0 = time.perf_counter()
    last = None
    for _ in range(args.iters):
        last = run()
    sync()
    elapsed = time.perf_counter() - t0
    per_iter = elapsed / max(args.iters, 1)

    out = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "mode": args.mode,
        "variant": args.variant,
        "fs": args.fs,
        "steps": args.steps,
        "batch": args.batch,
        "classes": args.classes,
        "img_size": args.img_size,
        "dtype": args.dtype,
        "precision": ("float32" if amp is None else
                      f"torch.autocast('{args.device}', bfloat16) for layers; membrane state "
                      "float32"),
        "optimizer": args.optimizer if args.mode == "train" else None,
        "threads": threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "images_per_s": args.batch / per_iter if per_iter > 0 else None,
        "seconds_per_iter": per_iter,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": count_params(model),
        "weights": args.weights,
        ("last_loss" if args.mode == "train" else "last_count_sum"): last,
    }
    if args.device == "cuda":
        out.update(_cuda_report(args.device))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
