"""Training end to end: train.py runs, resumes exactly after kill -9, SIGINT and SIGTERM, shards over
8 devices, rejects bad configs, and compiles the seed's full-size models."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bitnet_jax import run_config
from bitnet_jax import checkpointing
from bitnet_jax import evaluate
from bitnet_jax import trainer

from tests.helpers import ROOT, TINY, tiny_config


def _train(workdir, *extra, env=None, wait=True):
  cmd = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(workdir),
         *TINY, *extra]
  run_env = dict(os.environ, **(env or {}))
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)


def _records(workdir, kind):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _final_params(workdir):
  params, meta = checkpointing.load_params(str(workdir), "latest")
  return params, meta


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One full tiny run (2 epochs, 16 optimizer steps) that other tests compare against."""
  workdir = tmp_path_factory.mktemp("full")
  out = _train(workdir)
  assert out.returncode == 0, out.stdout + out.stderr
  return workdir, out


@pytest.mark.slow
def test_train_py_end_to_end(uninterrupted):
  workdir, out = uninterrupted
  assert "parameters" in out.stdout and "devices: 1 x cpu" in out.stdout
  train = _records(workdir, "train")
  evals = _records(workdir, "eval")
  assert [r["step"] for r in train] == list(range(2, 17, 2))
  assert len(evals) == 2 and evals[-1]["n"] == 20  # every test image, the last batch padded
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["14", "16"]  # keep_checkpoints = 2
  assert len(os.listdir(workdir / "best")) == 1
  params, meta = _final_params(workdir)
  assert meta["step"] == 16 and meta["arch"]["fs"] == 0.125 and meta["config"]["time_steps"] == 2
  assert params["begin"]["kernel"].shape == (3, 3, 3, 8)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  """A run killed with SIGKILL and rerun ends with exactly the uninterrupted run's parameters
  (CPU XLA is deterministic, and the data iterator resumes on the exact next batch)."""
  proc = _train(tmp_path, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    ckpts = tmp_path / "checkpoints"
    if ckpts.exists() and any(d.isdigit() and int(d) >= 4 for d in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert killed_at < 16, "the run finished before it could be killed"
  _resume_and_compare(tmp_path, killed_at, uninterrupted[0])


def _resume_and_compare(workdir, step, reference_workdir):
  """Reruns the interrupted run in `workdir`: it resumes at `step` and ends with the
  uninterrupted run's parameters, bitwise."""
  out = _train(workdir)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f"resumed at step {step}" in out.stdout
  resumed, _ = _final_params(workdir)
  reference, _ = _final_params(reference_workdir)
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(a, b)


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not path.exists():
    time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _train(tmp_path, "--config.num_epochs=50", wait=False)
  _wait_for(tmp_path / "metrics.jsonl", proc)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, stdout
  assert "SIGTERM: saved step" in stdout
  step = int(stdout.split("SIGTERM: saved step ")[1].split()[0])
  assert str(step) in os.listdir(tmp_path / "checkpoints")
  assert f"resume with: python train.py --config configs/default.py --workdir {tmp_path}" in stdout


@pytest.mark.slow
def test_sigint_saves_the_current_step_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  """Regression: Colab's interrupt is SIGINT, which raised KeyboardInterrupt and saved nothing
  (losing up to an epoch). Now the step in flight is finished and saved, and a rerun ends with
  exactly the uninterrupted run's parameters."""
  proc = _train(tmp_path, wait=False)
  _wait_for(tmp_path / "metrics.jsonl", proc)  # written at step 2 of 16
  proc.send_signal(signal.SIGINT)
  stdout, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, stdout
  assert "KeyboardInterrupt" not in stdout
  step = int(stdout.split("SIGINT: saved step ")[1].split()[0])
  assert 2 <= step < 16, "the run finished before it could be interrupted"
  assert max(int(d) for d in os.listdir(tmp_path / "checkpoints")) == step
  _resume_and_compare(tmp_path, step, uninterrupted[0])


@pytest.mark.slow
def test_one_vs_eight_devices_same_losses(uninterrupted, tmp_path):
  """The same global batch over 8 CPU devices gives the 1-device loss trajectory (the gradient
  all-reduce sums in another order: float rounding only, so a small tolerance)."""
  out = _train(tmp_path, "--config.num_epochs=1",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert out.returncode == 0, out.stdout + out.stderr
  assert "devices: 8 x cpu" in out.stdout
  eight = [r["loss"] for r in _records(tmp_path, "train")]
  one = [r["loss"] for r in _records(uninterrupted[0], "train")][:len(eight)]
  np.testing.assert_allclose(eight, one, rtol=2e-3)


@pytest.mark.slow
def test_steps_flag_and_overrides_reach_the_config(tmp_path):
  out = _train(tmp_path, "--steps", "3", "--config.max_train_steps=2")
  assert out.returncode == 0, out.stdout + out.stderr
  _, meta = _final_params(tmp_path)
  assert meta["config"]["eval_time_steps"] == 3 and meta["config"]["time_steps"] == 2
  assert _records(tmp_path, "eval")[-1]["time_steps"] == 3


def test_unknown_config_field_is_rejected(tmp_path):
  out = _train(tmp_path, "--config.fs_scale=2")
  assert out.returncode != 0 and "fs_scale" in out.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides,match", [
    (dict(remat="step"), "remat='step' is not valid for engine 'parallel'"),
    (dict(engine="loop"), "unknown engine 'loop'"),
    (dict(loss="hinge"), "loss must be one of"),
    (dict(time_steps=0), "time_steps must be an int >= 1"),
    (dict(fs=-1.0), "fs must be > 0"),
    (dict(surrogate="relu"), "unknown surrogate"),
    (dict(compute_dtype="float16"), "compute_dtype must be one of"),
    (dict(remat="stream", surrogate="atan"), "remat='stream' needs the 'ste' surrogate"),
    (dict(eval_chunk=-1), "eval_chunk must be an int >= 0"),
])
def test_bad_configs_rejected_before_compile(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_batch_must_divide_over_devices():
  out = subprocess.run(
      [sys.executable, "-c", "from tests.helpers import tiny_config; from bitnet_jax import "
       "run_config; run_config.validate_config(tiny_config(batch_size=12))"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert "batch_size=12 does not divide over the 8 devices" in out.stderr


@pytest.mark.slow
def test_workdir_of_another_architecture_is_refused(uninterrupted, tmp_path):
  workdir = uninterrupted[0]
  with pytest.raises(ValueError, match="another architecture .*fs: checkpoint 0.125 vs config 0.25"):
    trainer.train_and_evaluate(tiny_config(fs=0.25), str(workdir))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  # The loss is bounded by construction, so the fault is injected into the step's metrics.
  real_make_step = run_config.train_step

  def make_step(*args):
    step = real_make_step(*args)
    def poisoned(state, batch):
      state, metrics = step(state, batch)
      if int(state.step) >= 5:
        metrics = dict(metrics, loss=metrics["loss"] * np.nan)
      return state, metrics
    return poisoned

  monkeypatch.setattr(run_config, "train_step", make_step)
  with pytest.raises(FloatingPointError, match="between optimizer steps 5 and 6"):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100_max", "tiny_imagenet"])
def test_seed_configs_compile_at_full_size(name):
  """The seed's models (fs=4/5, 50 training time steps) compile their train step on CPU;
  compile only (abstract inputs), and XLA reports the step's memory."""
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  if name == "tiny_imagenet":
    config.data_dir = "tiny-imagenet-200"  # required by the config's checks; nothing is read
  run_config.validate_config(config)
  hw = 64 if name == "tiny_imagenet" else 32
  classes = {"cifar10": 10, "cifar100_max": 100, "tiny_imagenet": 200}[name]
  compiled = run_config.compile_train_step(config, _info(name, classes, hw))
  memory = compiled.memory_analysis()
  assert memory is None or memory.temp_size_in_bytes > 0


def _info(name, classes, hw):
  from bitnet_jax import data
  return data.DatasetInfo(name=name, num_classes=classes, image_shape=(hw, hw, 3),
                              num_train=1000, num_test=100, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.slow
def test_train_on_tfds_mock_cifar10(tmp_path):
  """The TFDS path end to end (tfds.testing.mock_data: no network, no TensorFlow)."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = trainer.train_and_evaluate(tiny_config(dataset="cifar10", num_epochs=1),
                                        str(tmp_path))
  assert result["n"] == 24
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    again = evaluate.run_evaluation(tiny_config(dataset="cifar10", num_epochs=1),
                                    workdir=str(tmp_path), which="latest")
  assert (again["top1"], again["loss"]) == (result["top1"], result["loss"])  # what was saved
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
