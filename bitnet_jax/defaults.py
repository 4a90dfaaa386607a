"""`auto`: the fast, accurate settings for the platform a run executes on, resolved once.

Four config fields default to "auto": `compute_dtype`, `matmul_precision`, `synapses` and
`remat`. At startup the trainer and evaluation turn them into explicit values (`resolve`) from the
platform (cpu, gpu, tpu) and, on a CPU, from whether the sparse C++ kernel builds:

| platform | compute_dtype | matmul_precision | synapses | remat (parallel engine, `ste`) |
|---|---|---|---|---|
| cpu | float32 | highest (no effect on CPU) | sparse (dense if the kernel cannot build) | stream |
| gpu | bfloat16 | default (no effect on bf16 operands) | dense | stream |
| tpu | bfloat16 | default | dense | stream |

- An explicit value always wins. With an explicit `compute_dtype=float32` on a GPU or TPU, `auto`
  precision is `high` (TF32 on a GPU, 3 bf16 passes on a TPU).
- `remat` is `stream` only where it is exact: the `parallel` engine and the `ste` surrogate;
  otherwise `none`. The sparse synapses need float32 spikes on a CPU and a spiking neuron (the
  ReLU twin's activations are real-valued), otherwise `dense`.
- A resumed run keeps what it started with: the trainer passes the config stored in the
  workdir's checkpoint as `stored`, whose values replace `auto` (unless they cannot run here,
  e.g. sparse synapses on a GPU; then the platform's rule applies, and a note says so).
- `fidelity=True` (evaluating a checkpoint of the original release) resolves to float32 at
  `highest` on every platform: there the point is the release's spikes. The sparse synapses
  compute exact float32 spikes too (up to summation order), so a CPU still uses them.

The evidence that each rule trains as well as float32 at `highest` is in the README ("Defaults:
auto") and docs/auto_study.md.
"""

import dataclasses
import functools

import jax

AUTO = "auto"
FIELDS = ("compute_dtype", "matmul_precision", "synapses", "remat")

# Measured on one NVIDIA H200 (2026-12-04, `bash benchmarks/gpu.sh` at c45494f, fs=4, batch 128,
# training at T=50): float32 at `highest` trained at 48.7 images/s, bfloat16 at 468.8.
_HIGHEST_COST = ("true float32 on a GPU or TPU: it trained 9.6x slower than bfloat16 (48.7 "
                 "against 468.8 images/s, and 0.24x the original release) on an NVIDIA H200")


@dataclasses.dataclass(frozen=True)
class Resolution:
  """What `auto` became.

  Attributes:
    values: the explicit value of each of `FIELDS`.
    auto: the fields that were "auto".
    platform: "cpu", "gpu" or "tpu".
    device_kind: e.g. "NVIDIA H200", or the CPU's model name.
    stored: whether the values of `auto` fields came from the workdir's stored config.
    notes: one-line notes to print (why a rule did not apply, warnings).
  """
  values: dict
  auto: tuple[str, ...]
  platform: str
  device_kind: str
  stored: bool = False
  notes: tuple[str, ...] = ()

  def describe(self) -> str:
    """One line in words, e.g. "compute: bfloat16 synapses, float32 state and parameters, dense
    synapses, remat=stream (auto on gpu: NVIDIA H200)"."""
    v = self.values
    synapses = ("sparse synapses (zero-skipping CPU kernel)" if v["synapses"] == "sparse"
                else "dense synapses (XLA)")
    precision = ("" if v["compute_dtype"] != "float32" or self.platform == "cpu"
                 else f", matmul precision {v['matmul_precision']}")
    where = f"{self.platform}: {self.device_kind}"
    fields = "" if len(self.auto) == len(FIELDS) else f", for {', '.join(self.auto)}"
    if not self.auto:
      origin = f"all set explicitly; on {where}"
    elif self.stored:
      origin = f"as this run started{fields}; on {where}"
    else:
      origin = f"auto on {where}{fields}"
    return (f"compute: {v['compute_dtype']} synapses, float32 state and parameters{precision}, "
            f"{synapses}, remat={v['remat']} ({origin})")


def platform_and_kind() -> tuple[str, str]:
  """("cpu" | "gpu" | "tpu" | ..., a device kind in words) of this process's default backend."""
  device = jax.devices()[0]
  platform = device.platform
  kind = getattr(device, "device_kind", platform)
  if platform == "cpu":
    kind = _cpu_model() or kind
  return platform, kind


@functools.cache
def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _sparse_available() -> tuple[bool, str]:
  from bitnet_jax.kernels import spike_conv  # pylint: disable=import-outside-toplevel
  return spike_conv.available()


def rules(platform: str, *, compute_dtype: str, engine: str, surrogate: str, neuron: str,
          fidelity: bool = False, sparse_available=_sparse_available) -> tuple[dict, list]:
  """The platform's value of each field, given the explicit (or already resolved) ones.

  Args:
    platform: "cpu", "gpu" or "tpu" (anything else is treated as an accelerator).
    compute_dtype: the config's value ("auto" or explicit): precision and synapses depend on it.
    engine, surrogate, neuron: the config's (remat=stream needs parallel + ste; sparse synapses
      need spikes).
    fidelity: the release's spikes: float32 at `highest` everywhere.
    sparse_available: `() -> (ok, why not)` for the C++ kernel (only asked on a CPU).

  Returns:
    ({field: value}, notes).
  """
  notes = []
  accelerator = platform != "cpu"
  if compute_dtype == AUTO:
    compute_dtype = "bfloat16" if accelerator and not fidelity else "float32"
  if compute_dtype != "float32" or fidelity:
    precision = "highest" if fidelity or not accelerator else "default"
  else:
    precision = "high" if accelerator else "highest"
  synapses = "dense"
  if platform == "cpu" and compute_dtype == "float32" and neuron == "bddi":
    ok, why = sparse_available()
    if ok:
      synapses = "sparse"
    else:
      notes.append(f"note: dense synapses, since the sparse kernel cannot run here: {why}")
  stream = engine == "parallel" and surrogate == "ste" and neuron == "bddi"
  values = {"compute_dtype": compute_dtype, "matmul_precision": precision,
            "synapses": synapses, "remat": "stream" if stream else "none"}
  return values, notes


def resolve(settings, *, engine: str = "parallel", surrogate: str = "ste", neuron: str = "bddi",
            platform: str | None = None, device_kind: str | None = None,
            stored: dict | None = None, fidelity: bool = False,
            sparse_available=_sparse_available) -> Resolution:
  """Turns the "auto" values of `settings` into explicit ones for this platform.

  Args:
    settings: {field: value} of `FIELDS` (a missing field counts as "auto").
    engine, surrogate, neuron: the run's (remat=stream needs parallel + ste; sparse synapses need
      spikes).
    platform, device_kind: default: this process's default backend (`platform_and_kind`).
    stored: the config a resumed run started with (the workdir's checkpoint meta), or None.
    fidelity: evaluating the original release's weights: float32 at `highest`.
    sparse_available: see `rules`.

  Returns:
    A `Resolution`.
  """
  if platform is None or device_kind is None:
    here, kind = platform_and_kind()
    platform, device_kind = platform or here, device_kind or kind
  given = {field: settings.get(field, AUTO) for field in FIELDS}
  auto = tuple(f for f in FIELDS if given[f] == AUTO)
  notes, from_store = [], False
  if stored is not None:
    for field in auto:
      value = stored.get(field, AUTO)
      if value == AUTO:
        continue
      if field == "synapses" and value == "sparse" and platform != "cpu":
        notes.append(f"note: this run started with sparse synapses (CPU only); on {platform} "
                     "it continues with the platform's auto rule")
        continue
      given[field], from_store = value, True
  values, rule_notes = rules(
      platform, compute_dtype=given["compute_dtype"], engine=engine, surrogate=surrogate,
      neuron=neuron, fidelity=fidelity, sparse_available=sparse_available)
  resolved = {f: values[f] if given[f] == AUTO else given[f] for f in FIELDS}
  if "synapses" in auto and resolved["synapses"] == "dense":
    notes += rule_notes
  explicit_slow = (platform != "cpu" and not fidelity and resolved["compute_dtype"] == "float32"
                   and resolved["matmul_precision"] == "highest" and
                   "matmul_precision" not in auto)
  if explicit_slow:
    notes.append(f"warning: matmul_precision=highest with float32 compute is {_HIGHEST_COST}; "
                 "leave compute_dtype and matmul_precision at auto for the fast path")
  return Resolution(resolved, auto, platform, device_kind, from_store, tuple(notes))


def is_resolved(settings) -> bool:
  """Whether no field of `FIELDS` is "auto" (or missing) in `settings` ({field: value})."""
  return all(settings.get(field, AUTO) not in (AUTO, None) for field in FIELDS)
