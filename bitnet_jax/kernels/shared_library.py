"""The C++ kernels' shared library: built on first use, cached, registered with XLA.

`csrc/spike_conv.cc` is compiled with the host's compiler (`$CXX`, else `c++`/`g++`/`clang++`;
`-O3 -march=native`) against the XLA FFI headers that jaxlib ships, and cached in
`$BITNET_JAX_CACHE` (default `~/.cache/bitnet_jax`) under a hash of its source, jaxlib's version
and the flags, so a new source or jaxlib builds anew. `available()` says whether the kernels can
run here and why not; `register()` builds, loads and registers them once per process.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

SOURCE = Path(__file__).parent / "csrc" / "spike_conv.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


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
      raise RuntimeError(f"building the sparse-synapse kernels failed ({' '.join(cmd)}):\n"
                         f"{done.stderr[-4000:]}")
    os.replace(out, lib)  # atomic: a concurrent build never sees half a file
  return lib


@functools.cache
def register() -> str | None:
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
  handle = ctypes.cdll.LoadLibrary(str(lib))
  for op, symbol in (("conv", "BitnetSpikeConv"), ("layer", "BitnetSpikeLayer"),
                     ("neuron", "BitnetSpikeNeuron"), ("sparse_conv", "BitnetSparseConv"),
                     ("kernel_grad", "BitnetSpikeKernelGrad"),
                     ("neuron_steps", "BitnetSpikeNeuronSteps")):
    for suffix in ("f32", "f64"):
      jax.ffi.register_ffi_target(f"bitnet_spike_{op}_{suffix}",
                                  jax.ffi.pycapsule(getattr(handle, symbol + suffix.upper())),
                                  platform="cpu")
  return None


def available() -> tuple[bool, str]:
  """(True, "") when `conv` can run here, else (False, the reason)."""
  why = register()
  return why is None, why or ""


def check_available():
  """Raises RuntimeError saying why `conv` cannot run here."""
  ok, why = available()
  if not ok:
    raise RuntimeError(f"sparse synapses (spike_conv) are not available: {why}. "
                       "Use synapses=dense, or auto (sparse where the kernel runs).")
