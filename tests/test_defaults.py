"""`auto` settings (bitnet_jax/defaults.py): each platform's rule, explicit values win, a resumed
run keeps what it started with, and the release's weights are evaluated at float32 `highest`."""

import json
import os

import pytest

from bitnet_jax import run_config
from bitnet_jax import defaults
from bitnet_jax import trainer
from bitnet_jax.kernels import spike_conv
from tests.helpers import tiny_config


def _ok():
  return True, ""


def _settings(config):
  """defaults.resolve's arguments from a config, as run_config.resolve passes them."""
  config = run_config.upgrade(config)
  return ({field: config[field] for field in defaults.FIELDS},
          {"engine": config.engine, "surrogate": config.surrogate, "neuron": config.neuron})


def _fields(**overrides):
  """The four auto fields of the tiny config (its engine, surrogate and neuron are
  defaults.resolve's defaults)."""
  return _settings(tiny_config(**overrides))[0]


def _resolve(platform, sparse=_ok, **overrides):
  settings, model = _settings(tiny_config(**overrides))
  return defaults.resolve(settings, **model, platform=platform, device_kind="a device",
                          sparse_available=sparse)


@pytest.mark.parametrize("platform, expected", [
    ("cpu", {"compute_dtype": "float32", "matmul_precision": "highest", "synapses": "sparse",
             "remat": "stream"}),
    ("gpu", {"compute_dtype": "bfloat16", "matmul_precision": "default", "synapses": "dense",
             "remat": "stream"}),
    ("tpu", {"compute_dtype": "bfloat16", "matmul_precision": "default", "synapses": "dense",
             "remat": "stream"}),
])
def test_each_platform_gets_its_rule(platform, expected):
  resolution = _resolve(platform)
  assert resolution.values == expected
  assert resolution.auto == defaults.FIELDS and not resolution.stored and not resolution.notes
  line = resolution.describe()
  assert line.startswith(f"compute: {expected['compute_dtype']} synapses, float32 state and "
                         "parameters")
  assert line.endswith(f"(auto on {platform}: a device)"), line


def test_the_platform_comes_from_the_backend(monkeypatch):
  """Without arguments the platform is this process's backend (here the CPU), and the device
  kind is what jax reports (the CPU's model name where /proc/cpuinfo has one)."""
  platform, kind = defaults.platform_and_kind()
  assert platform == "cpu" and kind
  monkeypatch.setattr(defaults, "platform_and_kind", lambda: ("gpu", "NVIDIA H200"))
  resolution = defaults.resolve(_fields(), sparse_available=_ok)
  assert resolution.values["compute_dtype"] == "bfloat16"
  assert resolution.describe() == ("compute: bfloat16 synapses, float32 state and parameters, "
                                   "dense synapses (XLA), remat=stream (auto on gpu: NVIDIA H200)")


def test_explicit_values_win():
  resolution = _resolve("gpu", compute_dtype="float32", synapses="dense", remat="chunk")
  assert resolution.values == {"compute_dtype": "float32", "matmul_precision": "high",
                               "synapses": "dense", "remat": "chunk"}
  assert resolution.auto == ("matmul_precision",)
  assert "(auto on gpu: a device, for matmul_precision)" in resolution.describe()
  cpu = _resolve("cpu", compute_dtype="bfloat16x3", matmul_precision="default")
  assert cpu.values == {"compute_dtype": "bfloat16x3", "matmul_precision": "default",
                        "synapses": "dense", "remat": "stream"}  # sparse computes float32 only


def test_rules_follow_the_model():
  """stream only where it is exact (parallel engine, ste); sparse only for spikes."""
  assert _resolve("cpu", surrogate="atan").values["remat"] == "none"
  assert _resolve("cpu", engine="scan").values["remat"] == "none"
  twin = _resolve("cpu", neuron="relu").values
  assert twin["synapses"] == "dense" and twin["remat"] == "none"


def test_a_cpu_without_the_kernel_says_why():
  resolution = _resolve("cpu", sparse=lambda: (False, "no C++ compiler found"))
  assert resolution.values["synapses"] == "dense"
  assert resolution.notes == ("note: dense synapses, since the sparse kernel cannot run here: no "
                              "C++ compiler found",)


def test_explicit_highest_on_an_accelerator_warns_with_its_cost():
  resolution = _resolve("gpu", compute_dtype="float32", matmul_precision="highest")
  assert len(resolution.notes) == 1
  assert resolution.notes[0].startswith("warning: matmul_precision=highest with float32 compute")
  assert "48.7 against 468.8 images/s" in resolution.notes[0]
  assert not _resolve("cpu", compute_dtype="float32", matmul_precision="highest").notes


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_release_weights_are_evaluated_in_float32_highest(platform):
  resolution = defaults.resolve(_fields(), platform=platform, device_kind="x", fidelity=True,
                                sparse_available=_ok)
  assert resolution.values["compute_dtype"] == "float32"
  assert resolution.values["matmul_precision"] == "highest"
  assert resolution.values["synapses"] == ("sparse" if platform == "cpu" else "dense")
  assert not resolution.notes  # the fidelity default is no explicit choice: no warning


def test_stored_values_replace_auto_unless_they_cannot_run_here():
  stored = {"compute_dtype": "float32", "matmul_precision": "highest", "synapses": "sparse",
            "remat": "none"}
  cpu = defaults.resolve(_fields(), platform="cpu", device_kind="x", stored=stored,
                         sparse_available=_ok)
  assert cpu.values == stored and cpu.stored
  assert "as this run started" in cpu.describe()
  gpu = defaults.resolve(_fields(remat="chunk"), platform="gpu", device_kind="x",
                         stored=stored, sparse_available=_ok)
  assert gpu.values == {"compute_dtype": "float32", "matmul_precision": "highest",
                        "synapses": "dense", "remat": "chunk"}  # explicit remat wins
  assert "continues with the platform's auto rule" in gpu.notes[0]


def test_old_configs_are_upgraded_to_what_they_ran():
  """A stored config from before `matmul_precision` existed ran at highest: a resume keeps it,
  even where auto would pick another precision."""
  stored = {"compute_dtype": "float32", "synapses": "dense", "remat": "none"}
  upgraded = run_config.upgrade(stored)
  assert upgraded["matmul_precision"] == "highest" and upgraded["neuron"] == "bddi"
  resolution = defaults.resolve(_fields(), platform="gpu", device_kind="x", stored=upgraded)
  assert resolution.values["matmul_precision"] == "highest"


@pytest.mark.slow
def test_a_resumed_run_keeps_the_resolution_it_started_with(tmp_path, capsys):
  """Started with explicit dense synapses and remat=none, resumed with the defaults (auto): the
  resumed run keeps dense/none (header and stored config), where a fresh run would go sparse."""
  trainer.train_and_evaluate(tiny_config(synapses="dense", remat="none", max_train_steps=2),
                             str(tmp_path))
  capsys.readouterr()
  trainer.train_and_evaluate(tiny_config(max_train_steps=4), str(tmp_path))
  out = capsys.readouterr().out
  assert ("compute: float32 synapses, float32 state and parameters, dense synapses (XLA), "
          "remat=none (as this run started; on cpu: ") in out, out
  meta = json.load(open(os.path.join(tmp_path, "checkpoints", "4", "meta", "metadata")))
  assert meta["config"]["synapses"] == "dense" and meta["config"]["remat"] == "none"
  fresh, resolution = run_config.resolve(tiny_config())
  sparse = spike_conv.available()[0]  # where the kernel cannot build, auto says dense, and why
  assert (fresh.synapses, fresh.remat) == ("sparse" if sparse else "dense", "stream")
  assert not resolution.stored
