"""A convolution of 0/1 spikes that skips the zeros, for XLA:CPU (`csrc/spike_conv.cc`).

`conv(spikes, kernel)` equals the 3x3 'SAME' convolution of `models._linear` (up to summation
order): per output position it adds only the kernel rows of the active inputs around it, so its
cost scales with the number of spikes instead of the number of inputs. Its gradient is the dense
convolution's (`jax.custom_vjp`), so a model that uses it still trains.

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

SOURCE = Path(__file__).parent / "csrc" / "spike_conv.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {np.dtype(np.float32): "bitnet_spike_conv_f32",
            np.dtype(np.float64): "bitnet_spike_conv_f64"}


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
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found (set $CXX, or install g++)"
  try:
    lib = _build(compiler)
  except (OSError, RuntimeError) as e:
    return str(e)
  import ctypes  # pylint: disable=import-outside-toplevel
  handle = ctypes.cdll.LoadLibrary(str(lib))
  for symbol, target in (("BitnetSpikeConvF32", "bitnet_spike_conv_f32"),
                         ("BitnetSpikeConvF64", "bitnet_spike_conv_f64")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
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
                       "Use the dense synapses (the default) instead.")


def _dense(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution (no bias) of 0/1 spikes, skipping the zeros.

  Args:
    x: (N, H, W, Ci) spikes, values 0 or 1, float32 or float64.
    kernel: (3, 3, Ci, Co) HWIO kernel of x's dtype.

  Returns:
    (N, H, W, Co) in x's dtype.
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"spike_conv.conv: expected (N, H, W, Ci) spikes and a (3, 3, Ci, Co) "
                     f"kernel, got {x.shape} and {kernel.shape}")
  if x.dtype != kernel.dtype or np.dtype(x.dtype) not in _TARGETS:
    raise ValueError(f"spike_conv.conv: spikes and kernel must both be float32 or float64, "
                     f"got {x.dtype} and {kernel.dtype}")
  check_available()
  out = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[3:], x.dtype)
  return jax.ffi.ffi_call(_TARGETS[np.dtype(x.dtype)], out, vmap_method="sequential")(x, kernel)


def _conv_fwd(x, kernel):
  return conv(x, kernel), (x.astype(jnp.bool_), kernel)


def _conv_bwd(residual, g):
  x, kernel = residual
  _, vjp = jax.vjp(_dense, x.astype(kernel.dtype), kernel)
  return vjp(g)


conv.defvjp(_conv_fwd, _conv_bwd)
