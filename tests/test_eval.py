"""Evaluation: sweep = separate runs, sparsity = a direct count, eval.py end to end (orbax and
release checkpoints), scoring, and clear errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from bitnet_jax import run_config
from bitnet_jax import defaults
from bitnet_jax import evaluate
from bitnet_jax import interop
from bitnet_jax.data import pipeline
from bitnet_jax import reference
from tests.helpers import firing_params
from tests.helpers import ROOT, TINY, tiny_config

MESH = jax.sharding.Mesh(np.array(jax.devices()), ("data",))


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(synthetic_num_test=21, eval_batch_size=8)
  info = run_config.dataset_info(config)
  module = run_config.make_module(run_config.resolve(config)[0], info)
  params = module.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3), np.float32))["params"]
  return config, info, module, firing_params(params, gain=2.5)


def _evaluate(setup, steps, **kwargs):
  config, info, module, params = setup
  step = evaluate.make_eval_step(module, time_steps=steps, mean=info.mean, std=info.std, **kwargs)
  sums = evaluate.evaluate(step, params, run_config.eval_iter(config, info), MESH)
  return evaluate.summarize(sums, module, steps, kwargs.get("sweep", ()))


@pytest.mark.slow
def test_sweep_equals_separate_runs(setup):
  swept = _evaluate(setup, 12, sweep=(1, 3, 7, 12))
  assert swept["n"] == 21
  for t, top1 in swept["sweep_top1"].items():
    assert top1 == _evaluate(setup, t)["top1"], t
  assert swept["sweep_top1"][12] == swept["top1"]


@pytest.mark.slow
def test_sparsity_equals_a_direct_count(setup):
  config, info, module, params = setup
  steps = 5
  result = _evaluate(setup, steps)
  images, _ = run_config.source(config, "test").read(np.arange(21))
  normalized = np.asarray(pipeline.normalize(images, info.mean, info.std), np.float64)
  ref = reference.run(interop.to_reference_weights(params),
                      normalized.transpose(0, 3, 1, 2), steps)
  neurons = np.array([np.prod(s.shape) for s in module.plan()])
  direct = 100 * (1 - ref["layer_spikes"].sum(0) / (21 * steps * neurons))
  # float32 engine vs float64 reference: a spike may move at an exact float boundary.
  np.testing.assert_allclose(result["sparsity"], direct, atol=0.05)
  assert all(0 < s < 100 for s in result["sparsity"])


def test_potential_score_breaks_ties(setup):
  counts = _evaluate(setup, 3)
  potential = _evaluate(setup, 3, score="potential")
  assert counts["tie_rate"] > 0            # 3 steps: integer counts tie often
  assert potential["tie_rate"] < counts["tie_rate"]
  assert counts["top5"] >= counts["top1"]


def test_eval_step_rejects_bad_arguments(setup):
  _, info, module, _ = setup
  with pytest.raises(ValueError, match=r"sweep steps must be in \[1, 4\]"):
    evaluate.make_eval_step(module, time_steps=4, mean=info.mean, std=info.std, sweep=(2, 9))
  with pytest.raises(ValueError, match="unknown score 'vote'"):
    evaluate.make_eval_step(module, time_steps=4, mean=info.mean, std=info.std, score="vote")


def _eval_py(*args):
  cmd = [sys.executable, "eval.py", "--config", "configs/default.py", *TINY, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_py_on_a_training_workdir(tmp_path):
  train = subprocess.run([sys.executable, "train.py", "--config", "configs/default.py",
                          "--workdir", str(tmp_path), *TINY, "--config.max_train_steps=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr
  out = _eval_py("--workdir", str(tmp_path), "--steps", "4", "--sweep", "1,2,4", "--sparsity",
                 "--json", str(tmp_path / "eval.json"))
  assert out.returncode == 0, out.stderr
  result = json.loads((tmp_path / "eval.json").read_text())
  assert result["n"] == 20 and result["time_steps"] == 4
  assert set(result["sweep_top1"]) == {"1", "2", "4"}
  assert "| Dataset - Model | Layer1 |" in out.stdout and "top-1" in out.stdout
  assert (tmp_path / "sweep.png").stat().st_size > 1000
  # A checkpoint of another architecture is refused, naming the difference.
  out = _eval_py("--workdir", str(tmp_path), "--config.fs=0.25")
  assert out.returncode != 0 and "fs: checkpoint 0.125 vs config 0.25" in out.stderr


def test_eval_py_on_a_release_checkpoint(setup, tmp_path):
  """A .ckpt in the release's layout gives the same top-1 as the same weights evaluated here."""
  _, _, _, params = setup
  path = tmp_path / "release.ckpt"
  interop.write_checkpoint(str(path), interop.to_torch_state_dict(params), extra={"epoch": 7})
  out = _eval_py("--torch_checkpoint", str(path), "--steps", "5", "--config.synthetic_num_test=21",
                 "--json", str(tmp_path / "r.json"))
  assert out.returncode == 0, out.stderr
  assert json.loads((tmp_path / "r.json").read_text())["top1"] == _evaluate(setup, 5)["top1"]


def test_release_weights_are_evaluated_in_float32_highest_on_an_accelerator(setup, tmp_path,
                                                                          monkeypatch):
  """On a GPU or TPU `auto` is bfloat16, but a checkpoint of the release is evaluated in float32
  at `highest` (its spikes), while a workdir of ours gets the platform's auto. The platform is
  faked (the computation runs on this CPU either way)."""
  config, _, _, params = setup
  path = tmp_path / "release.ckpt"
  interop.write_checkpoint(str(path), interop.to_torch_state_dict(params))
  monkeypatch.setattr(defaults, "platform_and_kind", lambda: ("gpu", "NVIDIA H200"))
  lines = []
  evaluate.run_evaluation(tiny_config(synthetic_num_test=21, eval_time_steps=3),
                          torch_ckpt=str(path), log=lines.append)
  assert lines == ["compute: float32 synapses, float32 state and parameters, matmul precision "
                   "highest, dense synapses (XLA), remat=stream (auto on gpu: NVIDIA H200)"]
  resolved, _ = run_config.resolve(tiny_config())
  assert (resolved.compute_dtype, resolved.matmul_precision) == ("bfloat16", "default")


def test_eval_errors(tmp_path):
  out = _eval_py("--workdir", str(tmp_path))
  assert out.returncode != 0 and "no checkpoint in" in out.stderr
  bad = tmp_path / "bad.ckpt"
  bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
  out = _eval_py("--torch_checkpoint", str(bad))
  assert out.returncode != 0 and str(bad) in out.stderr
  out = _eval_py("--torch_checkpoint", str(tmp_path / "missing.ckpt"))
  assert out.returncode != 0 and "missing.ckpt" in out.stderr
