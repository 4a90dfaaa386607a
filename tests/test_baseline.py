"""The seed's ReLU baseline ("twin"): its forward pass, training through the same loop, the
side-by-side command, its errors, and a BITnet started from its balanced weights."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.cli import twin as twin_command
from bitnet_jax import run_config
from bitnet_jax import checkpointing
from bitnet_jax import evaluate
from bitnet_jax.data import pipeline
from bitnet_jax import trainer
from bitnet_jax import twin
from tests.helpers import ROOT, TINY, tiny_config


def _conv(x, kernel, bias):
  out = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  return out + bias


def _pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_forward_is_relu_on_the_same_layers(tiny_model, images):
  """Written out by hand: conv + ReLU per layer, 2x2 max pools after layer1, layer2 and layer4,
  then the linear layer on the NHWC-flattened map (no ReLU on the logits)."""
  p = tiny_model.params
  x = jnp.asarray(images)
  active = []
  for name, pool in (("begin", False), ("layer1", True), ("layer2", True), ("layer3", False),
                     ("layer4", True)):
    x = jax.nn.relu(_conv(x, p[name]["kernel"], p[name]["bias"]))
    active.append((x > 0).sum(axis=(1, 2, 3)))
    x = _pool(x) if pool else x
  logits = jnp.dot(x.reshape(x.shape[0], -1), p["mlp1"]["kernel"],
                   precision=jax.lax.Precision.HIGHEST) + p["mlp1"]["bias"]
  active.append((logits > 0).sum(-1))
  got_logits, got_active = twin.forward(tiny_model.module, p, jnp.asarray(images))
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_active, np.stack(active, -1))
  assert got_logits.shape == (4, 10)


def _plain_twin_loss(params, images, labels):
  """A ReLU twin written with plain jnp (autodiff everywhere): conv + ReLU, 2x2 max pools by
  reshape and max, the linear layer, softmax cross-entropy."""
  x = images
  for name, pool in (("begin", False), ("layer1", True), ("layer2", True), ("layer3", False),
                     ("layer4", True)):
    x = jax.nn.relu(_conv(x, params[name]["kernel"], params[name]["bias"]))
    x = _pool(x) if pool else x
  logits = jnp.dot(x.reshape(x.shape[0], -1), params["mlp1"]["kernel"],
                   precision=jax.lax.Precision.HIGHEST) + params["mlp1"]["bias"]
  return twin.per_example_loss(logits, labels).mean()


def test_twin_gradients_are_autodiff_of_a_plain_relu_twin(tiny_model, images):
  """Regression: `twin.activations` pools real ReLU outputs with `neuron.maxpool`, whose
  backward once assumed 0/1 inputs (relative errors 0.35-1.36 per layer). In float64, every
  parameter gradient of the twin equals autodiff of the plain twin."""
  labels = jnp.arange(4) % 10
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tiny_model.params)
    x = jnp.asarray(images, jnp.float64)
    module = tiny_model.module.clone(dtype=jnp.float64)

    def loss(params):
      logits, _ = twin.forward(module, params, x)
      return twin.per_example_loss(logits, labels).mean()

    ours = jax.tree_util.tree_map(np.asarray, jax.grad(loss)(params))
    ref = jax.tree_util.tree_map(np.asarray, jax.grad(_plain_twin_loss)(params, x, labels))
  for name in ref:
    for leaf in ("kernel", "bias"):
      assert np.abs(ref[name][leaf]).max() > 0, (name, leaf)  # not a silent layer
      np.testing.assert_allclose(ours[name][leaf], ref[name][leaf], rtol=1e-9, atol=1e-12,
                                 err_msg=f"{name}/{leaf}")


@pytest.mark.slow
def test_relu_twin_trains_through_the_same_loop(tmp_path):
  config = tiny_config(neuron="relu", num_epochs=4, learning_rate=0.01)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result["time_steps"] == 1 and result["n"] == 20
  assert result["top1"] >= 0.5, result  # 10 synthetic classes: chance is 0.1
  # The trained twin's conv layers are alive: neither all zeros nor all active.
  assert all(0 < s < 100 for s in result["sparsity"][:5]), result["sparsity"]
  train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert "output_rate" not in train[0] and train[-1]["kind"] == "eval"
  evaluated = evaluate.run_evaluation(config, workdir=str(tmp_path), which="latest")
  assert evaluated["top1"] == result["top1"]


@pytest.mark.slow
def test_baseline_command_prints_the_twin_beside_the_bitnet(tmp_path):
  bitnet = tmp_path / "bitnet"
  bitnet.mkdir()
  with open(bitnet / "metrics.jsonl", "w") as f:  # a BITnet run's validations
    for epoch, top1 in ((1.0, 0.25), (2.0, 0.5)):
      f.write(json.dumps({"step": int(8 * epoch), "kind": "eval", "epoch": epoch,
                          "top1": top1}) + "\n")
  out = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.cli.twin", "--config", "configs/default.py",
       "--workdir", str(tmp_path / "twin"), "--bitnet_workdir", str(bitnet), *TINY],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "ReLU twin" in out.stdout
  relu = twin_command.validation_top1(str(tmp_path / "twin"))
  assert sorted(relu) == [1.0, 2.0]
  table = out.stdout[out.stdout.index("| epoch |"):]
  assert f"| 2 | {100 * relu[2.0]:.2f} % | 50.00 % | {100 * (0.5 - relu[2.0]):+.2f} |" in table


def test_bad_neuron_is_rejected():
  with pytest.raises(ValueError, match="neuron must be one of .*got 'lif'"):
    run_config.validate_config(tiny_config(neuron="lif"))
  with pytest.raises(ValueError, match="no time steps"):
    evaluate.make_eval_step(None, time_steps=4, mean=(0.,), std=(1.,), neuron="relu",
                            sweep=(2,))


def test_balance_rescales_each_layer_into_the_window(tiny_model, images):
  """Balanced, each layer's chosen percentile maps to 1, and the twin's predictions are those of
  the original weights scaled down (positive scales commute with ReLU and max pooling)."""
  module, params = tiny_model.module, tiny_model.params
  scaled, lams = twin.balance(module, params, jnp.asarray(images), percentile=100.0)
  before = twin.activations(module, params, jnp.asarray(images))
  after = twin.activations(module, scaled, jnp.asarray(images))
  for lam, a, b in zip(lams, before, after):
    np.testing.assert_allclose(b, a / lam, rtol=1e-4, atol=1e-6)
    assert float(b.max()) == pytest.approx(1.0, rel=1e-5)  # percentile 100: the maximum is 1
  np.testing.assert_array_equal(np.argmax(after[-1], -1), np.argmax(before[-1], -1))
  with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\], got 0"):
    twin.balance(module, params, jnp.asarray(images), percentile=0)


def test_twin_of_a_sparse_module_runs_dense_synapses(tiny_model, images):
  """The sparse kernel adds kernel rows of 0/1 spikes; the twin's activations are real, so a
  sparse module's twin (what `init_from` balances under auto on a CPU) uses dense synapses."""
  sparse = tiny_model.module.clone(sparse=True)
  x = jnp.asarray(images)
  for a, b in zip(twin.activations(sparse, tiny_model.params, x),
                  twin.activations(tiny_model.module, tiny_model.params, x)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_init_from_a_twin_starts_the_bitnet_from_its_balanced_weights(tmp_path):
  relu_dir, bitnet_dir = tmp_path / "relu", tmp_path / "bitnet"
  trainer.train_and_evaluate(tiny_config(neuron="relu", max_train_steps=2), str(relu_dir))
  config = tiny_config(init_from=str(relu_dir), balance_examples=16, max_train_steps=1,
                       learning_rate=1e-9)  # one step that barely moves the weights
  trainer.train_and_evaluate(config, str(bitnet_dir))
  got, _ = checkpointing.load_params(str(bitnet_dir), "latest")
  relu, _ = checkpointing.load_params(str(relu_dir), "latest")
  info = run_config.dataset_info(config)
  module = run_config.make_module(run_config.resolve(config)[0], info)
  images, _ = run_config.source(config, "train").read(np.arange(16))
  expected, _ = twin.balance(module, relu, pipeline.normalize(
      jnp.asarray(images), info.mean, info.std))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="is a BITnet run, not a ReLU twin"):
    trainer.train_and_evaluate(tiny_config(init_from=str(bitnet_dir)), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="init_from must be the workdir of a trained ReLU twin"):
    run_config.validate_config(tiny_config(init_from=str(tmp_path / "missing")))
