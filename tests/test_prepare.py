"""TFDS end to end, offline: `python -m bitnet_jax.cli.prepare` writes ArrayRecord with TFDS's
real `fashion_mnist` builder into a non-default data dir, and train.py / eval.py read it without
TensorFlow; the unprepared, TFRecord-prepared and TensorFlow-less cases are clear errors.

The builder's download step is served from Debian's `dataset-fashion-mnist` files (the same
images; their gzip bytes differ from TFDS's registered checksums) through data/prepare.py's hook
(BITNET_JAX_TEST_DOWNLOADS_FROM); extraction, example generation, PNG encoding and writing are
TFDS's own code. Each preparation keeps the first 256 examples of each split (TFDS's
`max_examples_per_split`, through BITNET_JAX_TEST_MAX_EXAMPLES_PER_SPLIT) so that the file stays
fast. The pytest process never imports TensorFlow: preparing runs in child processes, and
train.py / eval.py run with a `tensorflow` package on their path that refuses to be imported.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from bitnet_jax import run_config
from bitnet_jax.data import idx
from bitnet_jax.data import prepare
from bitnet_jax.data import tfds

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = "/usr/share/datasets/fashion-mnist"
N = 256  # examples kept per split
HOOKS = {prepare.TEST_DOWNLOADS_ENV: DEBIAN, prepare.TEST_MAX_EXAMPLES_ENV: str(N)}

needs_tensorflow = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in prepare.NEEDS) or not os.path.isdir(DEBIAN),
    reason="preparing needs TensorFlow and importlib_resources (pip install tensorflow-cpu "
    f"importlib_resources) and Debian's dataset-fashion-mnist in {DEBIAN}")

# A TFRecord preparation, as `tfds.load` leaves it (TFDS's default format), from the same files.
_TFRECORD_SCRIPT = """
import sys
import tensorflow_datasets as tfds
from bitnet_jax.data import prepare

prepare._serve_downloads_from(sys.argv[1])
tfds.builder("fashion_mnist", data_dir=sys.argv[2]).download_and_prepare(
    download_config=tfds.download.DownloadConfig(max_examples_per_split=int(sys.argv[3])))
"""


def _run(args, env=None, timeout=600):
  """Runs `python *args` in the repository root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
  """PYTHONPATH under which `import tensorflow` raises ImportError."""
  shim = tmp_path_factory.mktemp("shim")
  (shim / "tensorflow").mkdir()
  (shim / "tensorflow" / "__init__.py").write_text(
      'raise ImportError("tensorflow is hidden by tests/test_prepare.py")\n')
  return {"PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH"))
                                        if p)}


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory):
  """A data dir holding a real TFRecord preparation of fashion_mnist (and its downloads)."""
  data_dir = tmp_path_factory.mktemp("tfrecord")
  out = _run(["-c", _TFRECORD_SCRIPT, DEBIAN, str(data_dir), str(N)],
             env={"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stdout + out.stderr
  return data_dir


@pytest.fixture(scope="module")
def prepared(tfrecord_dir, tmp_path_factory):
  """A copy of `tfrecord_dir` whose preparation `prepare --overwrite` replaced by ArrayRecord."""
  data_dir = tmp_path_factory.mktemp("array_record") / "tfds"
  shutil.copytree(tfrecord_dir, data_dir)
  out = _run(["-m", "bitnet_jax.cli.prepare", "fashion_mnist", "--data_dir", str(data_dir),
              "--overwrite"], env=HOOKS)
  assert out.returncode == 0, out.stdout + out.stderr
  assert f"Removing the tfrecord preparation in {data_dir}/fashion_mnist/3.0.1" in out.stdout
  assert "Test hook: TFDS downloads are served from" in out.stdout
  assert f"Prepared fashion_mnist in {data_dir}/fashion_mnist/3.0.1 in" in out.stdout
  return data_dir


def _config(data_dir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"dataset": "fashion_mnist", "data_dir": str(data_dir)})


def _fingerprints(images, labels):
  """Sorted hashes of (image, label) pairs: equal for the same examples in any order."""
  return sorted(hashlib.sha1(x.tobytes() + bytes([y])).hexdigest() for x, y in zip(images, labels))


@needs_tensorflow
def test_prepared_records_are_the_original_images(prepared, capsys):
  version_dir = prepared / "fashion_mnist" / "3.0.1"
  assert tfds.tfds_prepared("fashion_mnist", str(prepared)) == (str(version_dir),
                                                                ("array_record",))
  files = sorted(os.listdir(version_dir))
  assert "fashion_mnist-train.array_record-00000-of-00001" in files
  assert not [f for f in files if "tfrecord" in f]
  info = run_config.dataset_info(_config(prepared))
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
      10, (32, 32, 1), N, N)
  for split, prefix in (("train", "train"), ("test", "t10k")):
    source = run_config.source(_config(prepared), split)
    ids = np.arange(N)
    images, labels = source.read(ids)  # (N, 32, 32, 1) padded, (N,)
    raw = source.read_raw(ids)  # (N, 28, 28, 1), as stored
    np.testing.assert_array_equal(images[:, 2:-2, 2:-2], raw)
    expected = idx.read_idx(f"{DEBIAN}/{prefix}-images-idx3-ubyte.gz")[:N, :, :, None]
    expected_labels = idx.read_idx(f"{DEBIAN}/{prefix}-labels-idx1-ubyte.gz")[:N]
    # TFDS shuffles the records; the first N examples of Debian's files, in some order.
    assert _fingerprints(raw, labels) == _fingerprints(expected, expected_labels)
  # Preparing again finds the ArrayRecord preparation and starts no child process.
  assert prepare.prepare("fashion_mnist", str(prepared)) == str(version_dir)
  assert "already prepared as ArrayRecord" in capsys.readouterr().out


@needs_tensorflow
def test_train_and_eval_read_it_without_tensorflow(prepared, no_tensorflow, tmp_path):
  data = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path),
          "--config.dataset=fashion_mnist", f"--config.data_dir={prepared}",
          "--config.fs=0.125", "--config.time_steps=2", "--config.eval_time_steps=2",
          "--config.batch_size=8", "--config.eval_batch_size=32",
          "--config.max_eval_examples=64"]
  out = _run(["train.py", *data, "--config.max_train_steps=3", "--config.log_every=1"],
             env=no_tensorflow)
  assert out.returncode == 0, out.stdout + out.stderr
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
  assert [r["n"] for r in records if r["kind"] == "eval"] == [64]
  out = _run(["eval.py", *data, "--json", str(tmp_path / "eval.json")], env=no_tensorflow)
  assert out.returncode == 0, out.stdout + out.stderr
  result = json.loads((tmp_path / "eval.json").read_text())
  validation = [r for r in records if r["kind"] == "eval"][0]
  assert result["n"] == 64 and result["top1"] == validation["top1"]  # the same checkpoint


@needs_tensorflow
def test_tfrecord_preparation_is_named(tfrecord_dir):
  version_dir = tfrecord_dir / "fashion_mnist" / "3.0.1"
  assert tfds.tfds_prepared("fashion_mnist", str(tfrecord_dir)) == (str(version_dir),
                                                                    ("tfrecord",))
  with pytest.raises(FileNotFoundError, match=(
      rf"(?s){version_dir} holds a tfrecord preparation of TFDS dataset 'fashion_mnist'.*"
      rf"not ArrayRecord.*python -m bitnet_jax.cli.prepare fashion_mnist --data_dir "
      rf"{tfrecord_dir} --overwrite")):
    run_config.dataset_info(_config(tfrecord_dir))
  with pytest.raises(FileExistsError, match=(
      rf"{version_dir} holds a tfrecord preparation of fashion_mnist, not ArrayRecord.*"
      rf"`python -m bitnet_jax.cli.prepare fashion_mnist --data_dir {tfrecord_dir} "
      "--overwrite`")):
    prepare.prepare("fashion_mnist", str(tfrecord_dir))
  assert "fashion_mnist-train.tfrecord-00000-of-00001" in os.listdir(version_dir)  # untouched


def test_unprepared_dataset_says_what_to_run(tmp_path):
  """The default data dir ($TFDS_DATA_DIR here; TFDS reads it on import) is named in the
  command; nothing is written."""
  pytest.importorskip("tensorflow_datasets")
  read = ("from bitnet_jax import data\n"
          "data.get_source(data.DataSpec('mnist', data_dir=''), 'train')")
  out = _run(["-c", read], env={"TFDS_DATA_DIR": str(tmp_path)}, timeout=300)
  assert out.returncode != 0
  assert (f"DataNotFound: TFDS dataset 'mnist' is not prepared in {tmp_path} (no "
          f"{tmp_path}/mnist/3.0.1/dataset_info.json). Prepare it once (this downloads it, and "
          "needs TensorFlow in that step only):\n"
          f"  python -m bitnet_jax.cli.prepare mnist --data_dir {tmp_path}\n") in out.stderr
  assert os.listdir(tmp_path) == []


def test_missing_tensorflow_names_the_pip_command(no_tensorflow, tmp_path):
  """TensorFlow that cannot be imported (a shim here) stops the child before any download."""
  pytest.importorskip("importlib_resources")  # else the parent stops first, naming it
  out = _run(["-m", "bitnet_jax.cli.prepare", "mnist", "--data_dir", str(tmp_path)],
             env=no_tensorflow, timeout=300)
  assert out.returncode != 0
  assert "Cannot import a module that preparing needs: tensorflow is hidden" in out.stderr
  assert out.stderr.rstrip().endswith(
      "error: Preparing mnist needs TensorFlow (TFDS's builder writes the files with it; "
      "training does not) and importlib_resources (the child process cannot import one of "
      "them; the reason is above). Install with: pip install tensorflow-cpu importlib_resources")
  assert tfds.tfds_prepared("mnist", str(tmp_path))[1] == ()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("absent, pip", [
    (("tensorflow",), "pip install tensorflow-cpu"),
    (("tensorflow", "importlib_resources"), "pip install tensorflow-cpu importlib_resources")])
def test_not_installed_names_the_pip_command(absent, pip, monkeypatch, tmp_path):
  """Modules that are not installed at all are found before any child process starts."""
  find_spec = prepare.importlib.util.find_spec
  monkeypatch.setattr(prepare.importlib.util, "find_spec",
                      lambda module: None if module in absent else find_spec(module))
  monkeypatch.setattr(prepare.subprocess, "run", None)  # a child would fail loudly
  with pytest.raises(ModuleNotFoundError, match=(
      rf"needs TensorFlow .*\(not installed here: {', '.join(absent)}\)\. Install with: {pip}$")):
    prepare.prepare("cifar100", str(tmp_path))


def test_child_process_runs_without_accelerators(monkeypatch, tmp_path):
  """The child gets the accelerators hidden; its exit status 3 (cannot import) is mapped."""
  calls = []

  def fake_run(cmd, env, timeout, check):
    calls.append((cmd, env, timeout, check))
    return subprocess.CompletedProcess(cmd, 3)
  monkeypatch.setattr(prepare.subprocess, "run", fake_run)
  monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda module: object())  # installed
  monkeypatch.setattr(prepare.tfds, "tfds_prepared", lambda name, data_dir: ("x", ()))
  with pytest.raises(ModuleNotFoundError, match="Install with: pip install tensorflow-cpu"):
    prepare.prepare("cifar10", str(tmp_path), timeout_s=5)
  (cmd, env, timeout, check), = calls
  assert cmd == [sys.executable, "-m", "bitnet_jax.cli.prepare", "cifar10", "--child",
                 "--data_dir", str(tmp_path)]
  assert (env["CUDA_VISIBLE_DEVICES"], env["JAX_PLATFORMS"], timeout, check) == ("", "cpu", 5,
                                                                                 False)
  assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT  # finds bitnet_jax from any cwd


def test_unknown_name():
  with pytest.raises(ValueError, match=(
      "Cannot prepare 'cifar': expected one of cifar10, cifar100, fashion_mnist, mnist.")):
    prepare.prepare("cifar")


def test_command_usage_errors_are_one_line():
  """The command (`bitnet_jax/cli/prepare.py`) names a wrong or missing dataset in one line,
  with the exit status of a usage error."""
  out = _run(["-m", "bitnet_jax.cli.prepare", "cifar"], timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.splitlines()[-1] == (
      "error: Cannot prepare 'cifar': expected one of cifar10, cifar100, fashion_mnist, mnist.")
  out = _run(["-m", "bitnet_jax.cli.prepare"], timeout=300)
  assert out.returncode == 2 and "error: expected one dataset name" in out.stderr, out.stderr
