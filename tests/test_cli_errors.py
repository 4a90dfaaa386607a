"""Bad input through the real train.py, eval.py and export command: each expected mistake ends
in one clear line (`error: ...`, exit status 2 for usage, 1 otherwise) and no traceback, and
leaves the workdir as it was; a damaged checkpoint is skipped, named and kept, for every item of
a checkpoint."""

import glob
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bitnet_jax import run_config
from bitnet_jax import checkpointing
from bitnet_jax import interop
from bitnet_jax import train_step
from bitnet_jax import trainer
from tests.helpers import ROOT, TINY, tiny_config


def _run(script, *args, timeout=300):
  """Runs `python script *args` (script may be "-m" and args a module's name and flags)."""
  out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
  return out.returncode, out.stdout, out.stderr


def _snapshot(folder) -> dict:
  """{relative path: sha256} of every file under `folder`."""
  files = {}
  for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return files


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny finished run: checkpoints/12 and /16 (keep 2), best/<step>, in a folder no test
  changes (tests damage copies)."""
  path = tmp_path_factory.mktemp("run") / "w"
  trainer.train_and_evaluate(tiny_config(checkpoint_every=4), str(path))
  assert sorted(os.listdir(path / "checkpoints")) == ["12", "16"]
  return path


def _copy(workdir, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(workdir, target)
  return target


def _damage(step_dir, item: str, kind: str) -> str:
  """Truncates, zeroes or deletes the file of `item` ("state": its largest data file) in a
  checkpoint step; returns the file's path."""
  if item == "state":
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p)]
    path = max(files, key=os.path.getsize)
  else:
    path = os.path.join(step_dir, item, "metadata")
  size = os.path.getsize(path)
  if kind == "truncate":
    with open(path, "r+b") as f:
      f.truncate(min(100, size // 2))
  elif kind == "zero":
    with open(path, "wb") as f:
      f.write(b"\0" * size)
  else:
    os.remove(path)
  return path


def _one_error_line(code, stdout, stderr, status, *parts, hint=None):
  """Exit `status`, no traceback, and an `error: ` line containing every part."""
  assert code == status, (code, stdout, stderr)
  assert "Traceback" not in stdout + stderr, stdout + stderr
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr
  for part in parts:
    assert part in lines[0], (part, lines[0])
  if hint is not None:
    after = stderr.splitlines()[stderr.splitlines().index(lines[0]) + 1]
    assert after == hint, (after, stderr)
  return lines[0]


# ------------------------------------------------------------------------------------------
# Usage errors and missing things: one line, the right status, the workdir untouched.

CONFIG = ["--config", "configs/default.py", *TINY]
# The abandoned reads of a damaged checkpoint (orbax), collected after a test: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("script, args, status, parts, hint", [
    ("train.py", [*CONFIG, "--config.batch_sise=8"], 2,
     ["--config.batch_sise: configs/default.py has no field 'batch_sise'"],
     "did you mean --config.batch_size?"),
    ("train.py", ["--config", "configs/quickstrat.py"], 2,
     ["--config configs/quickstrat.py: no such config file"],
     "did you mean --config configs/quickstart.py?"),
    ("eval.py", ["--config", "configs/quickstrat.py", "--workdir", "x"], 2,
     ["--config configs/quickstrat.py: no such config file"],
     "did you mean --config configs/quickstart.py?"),
    ("train.py", [], 2, ["--config is required"], None),
    ("train.py", [*CONFIG, "--steps", "0"], 2, ["--steps must be >= 1, got 0"], None),
    ("eval.py", [*CONFIG, "--steps", "-5", "--workdir", "x"], 2,
     ["--steps must be >= 1, got -5"], None),
    ("train.py", [*CONFIG, "--config.batch_size=abc"], 2,
     ["--config.batch_size=abc: invalid literal for int()"], None),
    ("train.py", [*CONFIG, "--config.fs=-1"], 2, ["config: fs must be > 0, got -1.0"], None),
    ("train.py", [*CONFIG, "--config.synapses=csr"], 2,
     ["config: synapses must be auto, dense or sparse, got 'csr'"], None),
    ("train.py", [*CONFIG, "extra"], 2, ["unexpected arguments: extra"], None),
    ("eval.py", [*CONFIG, "--workdir", "x", "--sweep", "10,a"], 2,
     ["--sweep takes integers >= 1, e.g. 10,50,200; got 10,a"], None),
    ("eval.py", [*CONFIG], 2, ["give --workdir (a training run) or --torch_checkpoint"], None),
])
@pytest.mark.slow
def test_usage_errors_are_one_line(script, args, status, parts, hint):
  _one_error_line(*_run(script, *args), status, *parts, hint=hint)


@pytest.mark.slow
def test_verbose_shows_the_traceback():
  code, _, stderr = _run("train.py", *CONFIG, "--config.fs=-1", "--verbose")
  assert code == 1 and "Traceback" in stderr and "ConfigError" in stderr


@pytest.mark.slow
def test_missing_or_empty_workdir(tmp_path):
  missing = tmp_path / "nope"
  _one_error_line(*_run("eval.py", *CONFIG, "--workdir", str(missing)), 1,
                  f"workdir {missing} does not exist")
  assert not missing.exists()
  (tmp_path / "empty").mkdir()
  _one_error_line(*_run("eval.py", *CONFIG, "--workdir", str(tmp_path / "empty")), 1,
                  "no checkpoint in", "train first")
  assert os.listdir(tmp_path / "empty") == []


@pytest.mark.slow
def test_release_checkpoint_mistakes(tmp_path):
  """eval.py --torch_checkpoint on a missing, damaged or mismatched .ckpt, and the export command
  on a missing workdir: one line each."""
  bad = tmp_path / "bad.ckpt"
  bad.write_bytes(b"not a zip")
  _one_error_line(*_run("eval.py", *CONFIG, "--torch_checkpoint", str(bad)), 1,
                  f"{bad} is not a torch.save zip archive")
  _one_error_line(*_run("eval.py", *CONFIG, "--torch_checkpoint", str(tmp_path / "nope.ckpt")), 1,
                  f"checkpoint not found: {tmp_path / 'nope.ckpt'}")
  other = tmp_path / "fs025.ckpt"  # the weights of another architecture
  interop.write_checkpoint(other, {
      f"model.{key}": np.zeros(shape, np.float32)
      for key, shape in interop.expected_torch_shapes(fs=0.25, num_classes=10).items()})
  _one_error_line(*_run("eval.py", *CONFIG, "--torch_checkpoint", str(other)), 2,
                  "state dict shapes do not match a BITnet6 with fs=0.125",
                  "looks like fs=0.25")
  _one_error_line(*_run("-m", "bitnet_jax.cli.export", *CONFIG, "--workdir",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "out.ckpt")), 1,
                  f"workdir {tmp_path / 'nope'} does not exist")
  assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.slow
def test_missing_and_wrong_data_create_no_workdir(tmp_path):
  workdir = tmp_path / "w"
  _one_error_line(*_run("train.py", *CONFIG, "--config.dataset=tiny_imagenet",
                        f"--config.data_dir={tmp_path / 'nope'}", "--workdir", str(workdir)), 1,
                  f"No Tiny-ImageNet folder at {tmp_path / 'nope'}")
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not an npz")
  _one_error_line(*_run("train.py", *CONFIG, "--config.dataset=npz", f"--config.data_dir={bad}",
                        "--workdir", str(workdir)), 1, f"Cannot read npz file {bad}")
  assert not workdir.exists()


@pytest.mark.slow
def test_errors_about_a_workdir_leave_it_as_it_was(workdir, tmp_path):
  """An unknown step: one line, nothing changed (another architecture: test_train, in one
  process)."""
  w = _copy(workdir, tmp_path)
  before = _snapshot(w)
  _one_error_line(*_run("eval.py", *CONFIG, "--workdir", str(w), "--checkpoint_step", "7"), 1,
                  "no checkpoint of step 7", "found steps [12, 16]")
  assert _snapshot(w) == before


@pytest.mark.slow
def test_a_finished_run_says_so(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  before = _snapshot(w)
  code, stdout, stderr = _run("train.py", *CONFIG, "--workdir", str(w))
  assert code == 0 and "Traceback" not in stdout + stderr
  last = stdout.strip().splitlines()[-1]
  assert last == f"already trained to step 16 (workdir {w}); nothing to do"
  assert _snapshot(w) == before


# ------------------------------------------------------------------------------------------
# Damaged checkpoints through the commands.


@pytest.mark.slow
def test_train_resumes_from_the_newest_readable_checkpoint(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  path = _damage(w / "checkpoints" / "16", "state", "truncate")
  damaged = open(path, "rb").read()
  before = _snapshot(w)
  code, stdout, stderr = _run("train.py", *CONFIG, "--config.num_epochs=3", "--workdir", str(w))
  assert code == 0 and "Traceback" not in stdout + stderr, stdout + stderr
  warning = [l for l in stdout.splitlines() if l.startswith("warning: ")]
  assert len(warning) == 1, stdout
  assert warning[0].startswith(f"warning: checkpoint step 16 ({w}/checkpoints/16/state")
  assert "truncated" in warning[0] and "resumed from step 12 instead" in warning[0]
  assert f"moved to {w}/unreadable/checkpoints" in warning[0]
  assert "resumed at step 12" in stdout
  # Every file of the damaged step is kept, byte for byte, under unreadable/; the files of the
  # run that the resumed run does not rewrite are unchanged.
  step_16 = os.path.join("checkpoints", "16")
  kept = w / "unreadable" / step_16 / os.path.relpath(path, w / step_16)
  assert open(kept, "rb").read() == damaged
  after = _snapshot(w)
  for name, digest in before.items():
    if name.startswith(step_16):
      assert after[os.path.join("unreadable", name)] == digest, name
    elif not name.startswith(("checkpoints", "best", "metrics.jsonl", "tensorboard")):
      assert after[name] == digest, name  # (old steps rotate out, a new best, more metrics)
  assert sorted(os.listdir(w / "checkpoints")) == ["22", "24"]  # checkpoint_every=2, keep 2


@pytest.mark.slow
def test_eval_latest_skips_a_damaged_step_and_changes_nothing(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  _damage(w / "checkpoints" / "16", "meta", "zero")
  before = _snapshot(w)
  code, stdout, stderr = _run("eval.py", *CONFIG, "--workdir", str(w), "--which", "latest")
  assert code == 0 and "Traceback" not in stdout + stderr, stdout + stderr
  assert (f"warning: checkpoint step 16 ({w}/checkpoints/16/meta: corrupt (not what orbax "
          "wrote)) is unreadable; using step 12 instead") in stdout
  assert stdout.strip().endswith(f"{w}/checkpoints/12")
  assert _snapshot(w) == before


@pytest.mark.slow
def test_eval_of_a_damaged_explicit_step_names_the_newest_good_one(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  _damage(w / "checkpoints" / "16", "state", "delete")
  before = _snapshot(w)
  _one_error_line(*_run("eval.py", *CONFIG, "--workdir", str(w), "--checkpoint_step", "16"), 1,
                  f"checkpoint step 16 ({w}/checkpoints/16/state", "is unreadable",
                  "the newest readable step is 12 (--checkpoint_step 12)")
  assert _snapshot(w) == before


@pytest.mark.slow
def test_eval_best_falls_back_to_the_latest_readable(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  (best,) = os.listdir(w / "best")
  _damage(w / "best" / best, "state", "zero")
  before = _snapshot(w)
  code, stdout, stderr = _run("eval.py", *CONFIG, "--workdir", str(w))
  assert code == 0 and "Traceback" not in stdout + stderr, stdout + stderr
  assert f"warning: checkpoint step {best} ({w}/best/{best}/state" in stdout
  assert "using step 16 instead" in stdout and stdout.strip().endswith(f"{w}/checkpoints/16")
  assert _snapshot(w) == before


# ------------------------------------------------------------------------------------------
# Every item and kind of damage, for both managers, through the library (fast: no process).


@pytest.fixture(scope="module")
def abstract_state():
  config, _ = run_config.resolve(tiny_config(checkpoint_every=4))
  module = run_config.make_module(config, run_config.dataset_info(config))
  tx = run_config.optimizer(config, 8, 16)
  state = jax.eval_shape(lambda: train_step.init_state(module, tx, jax.random.PRNGKey(0)))
  return state, checkpointing.architecture(module)


@pytest.mark.parametrize("item", ["state", "data", "meta"])
@pytest.mark.parametrize("kind", ["truncate", "zero", "delete"])
def test_latest_manager_skips_any_damaged_item(workdir, tmp_path, abstract_state, item, kind):
  w = _copy(workdir, tmp_path)
  _damage(w / "checkpoints" / "16", item, kind)
  lines = []
  ckpts = checkpointing.Checkpoints(str(w))
  try:
    state, data, meta = ckpts.restore_latest(*abstract_state, log=lines.append)
  finally:
    ckpts.close()
  assert int(state.step) == 12 and meta["config"]["fs"] == 0.125 and data
  assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint step 16 ({w}/checkpoints"
                                                 f"/16/{item}")
  assert "resumed from step 12 instead" in lines[0]
  assert os.path.isdir(w / "unreadable" / "checkpoints" / "16")


@pytest.mark.parametrize("item", ["state", "meta"])
@pytest.mark.parametrize("kind", ["truncate", "zero", "delete"])
def test_best_manager_skips_any_damaged_item(workdir, tmp_path, item, kind):
  w = _copy(workdir, tmp_path)
  (best,) = os.listdir(w / "best")
  _damage(w / "best" / best, item, kind)
  before = _snapshot(w)
  lines = []
  params, meta = checkpointing.load_params(str(w), "best", log=lines.append)
  assert meta["step"] == 16 and meta["source"] == f"{w}/checkpoints/16"
  assert params["begin"]["kernel"].shape == (3, 3, 3, 8)
  assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint step {best} ({w}/best/"
                                                 f"{best}/{item}")
  assert _snapshot(w) == before


def test_the_data_item_is_not_needed_to_evaluate(workdir, tmp_path):
  """Evaluation reads `state` and `meta` only: a damaged iterator position does not matter."""
  w = _copy(workdir, tmp_path)
  _damage(w / "checkpoints" / "16", "data", "truncate")
  lines = []
  _, meta = checkpointing.load_params(str(w), "latest", log=lines.append)
  assert meta["step"] == 16 and not lines


def test_nothing_readable_is_one_error(workdir, tmp_path, abstract_state):
  w = _copy(workdir, tmp_path)
  for step in ("12", "16"):
    _damage(w / "checkpoints" / step, "meta", "delete")
  ckpts = checkpointing.Checkpoints(str(w))
  try:
    with pytest.raises(checkpointing.errors.CheckpointError,
                       match="no readable checkpoint in .*step 16 .*missing.*step 12"):
      ckpts.restore_latest(*abstract_state, log=lambda _: None)
  finally:
    ckpts.close()
  assert np.array_equal(sorted(os.listdir(w / "checkpoints")), ["12", "16"])  # nothing moved
