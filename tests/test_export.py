"""`python -m bitnet_jax.cli.export`: a JAX-trained model in the release's layout, read back by the
PyTorch copy of the release's structure and by eval.py, with the same spike counts."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax
from bitnet_jax import checkpointing
from bitnet_jax import evaluate
from bitnet_jax import interop
from bitnet_jax import trainer
from bitnet_jax.interop import export
from tests.helpers import ROOT, TINY, tiny_config

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"


try:
  import torch
except ImportError:
  torch = None

STEPS = 12  # time steps of the count comparison


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny model trained for 4 steps here, exported with the command line."""
  workdir = tmp_path_factory.mktemp("run")
  trainer.train_and_evaluate(tiny_config(max_train_steps=4, num_epochs=1), str(workdir))
  out = workdir / "model.ckpt"
  run = subprocess.run([sys.executable, "-m", "bitnet_jax.cli.export", "--config",
                        "configs/default.py", "--workdir", str(workdir), "--out", str(out), *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  assert f"wrote {out}: BITnet6 fs=0.125, 10 classes, step 4" in run.stdout
  return workdir, out


def test_exported_file_is_the_release_layout(exported):
  workdir, out = exported
  params, _ = checkpointing.load_params(str(workdir), "latest")
  obj = interop.load_checkpoint(str(out))
  assert obj["global_step"] == 4 and obj["hyper_parameters"]["fs"] == 0.125
  sd = obj["state_dict"]
  assert list(sd) == [f"model.{n}.layer.{k}" for n in bitnet_jax.models.LAYERS
                      for k in ("weight", "bias")]
  np.testing.assert_array_equal(sd["model.layer2.layer.weight"],
                                np.asarray(params["layer2"]["kernel"]).transpose(3, 2, 0, 1))


@pytest.mark.skipif(torch is None, reason="torch is not installed (requirements-dev.txt)")
def test_pytorch_copy_of_the_release_gives_our_counts_in_float64(exported):
  """The release's own structure (benchmarks/torch_baseline.py), loaded with torch.load from the
  exported file, counts exactly the spikes our model counts, in float64."""
  from benchmarks import torch_baseline  # pylint: disable=import-outside-toplevel
  _, out = exported
  sd = torch.load(str(out), weights_only=True)["state_dict"]
  net = torch_baseline.build_model(fs=0.125, classes=10).double()
  net.load_state_dict({k[len("model."):]: v.double() for k, v in sd.items()}, strict=True)
  images = np.random.default_rng(0).normal(size=(6, 32, 32, 3))  # normalised NHWC
  with torch.no_grad():
    theirs = net(torch.from_numpy(images.transpose(0, 3, 1, 2)), STEPS).numpy()  # (6, 10)
  with jax.enable_x64(True):
    model = bitnet_jax.load_torch_checkpoint(str(out), fs=0.125, num_classes=10,
                                             dtype=jnp.float64)
    ours = np.asarray(bitnet_jax.spike_counts(model, images, STEPS))
  assert theirs.sum() > 0, "the trained model is silent: the comparison would be empty"
  np.testing.assert_array_equal(ours, theirs)


def test_eval_of_the_export_equals_eval_of_the_workdir(exported):
  workdir, out = exported
  config = tiny_config()
  ours = evaluate.run_evaluation(config, workdir=str(workdir), which="latest")
  theirs = evaluate.run_evaluation(config, torch_ckpt=str(out))
  assert ours["top1"] == theirs["top1"] and ours["loss"] == theirs["loss"]


def test_config_of_another_architecture_is_refused(exported):
  workdir, _ = exported
  with pytest.raises(ValueError, match=r"has fs=0.125, the config fs=0.25; give the config it "
                                       r"was trained with"):
    config = tiny_config(fs=0.25)
    export.export_workdir(str(workdir), os.devnull, variant=config.variant, fs=config.fs,
                          dataset=config.dataset, time_steps=config.time_steps,
                          eval_time_steps=config.eval_time_steps)
