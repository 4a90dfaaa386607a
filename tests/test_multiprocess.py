"""Multi-process training and evaluation, for real: several train.py / eval.py processes on
localhost joined by `jax.distributed` (gloo collectives between CPU devices), against one process
with the same global batch.

Each job is a set of processes started with --coordinator_address/--num_processes/--process_id;
every wait is bounded (subprocess timeouts, --distributed_timeout_s) and every process is killed
in a `finally`, so a hung collective fails a test instead of stalling CI.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bitnet_jax import checkpointing
from bitnet_jax import distributed

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny model on the shipped Fashion-MNIST subset: 64 training images in global batches of 8
# (8 steps per epoch, 2 epochs), 20 test images in global evaluation batches of 8 (the last one
# is 4 images and 4 padding: over 2 processes, process 1's half of it is all padding). A high
# learning rate without warm-up makes the output layer fire from step 3 on, so the losses are
# not a constant (a silent network's loss is 0.1 whatever its parameters).
TINY = ["--config", "configs/quickstart.py", "--config.fs=0.125", "--config.time_steps=4",
        "--config.eval_time_steps=4", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.max_train_examples=64", "--config.max_eval_examples=20",
        "--config.num_epochs=2", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.warmup_epochs=0", "--config.learning_rate=0.05"]
STEPS = 16
TEST_IMAGES = 20
TIMEOUT_S = 240  # one job, compile included, on a loaded 2-core machine
PEER_TIMEOUT_S = 30  # --distributed_timeout_s: connect, and declare a silent peer dead


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Job:
  """`num_processes` processes of `script`, each with `devices` CPU devices and its own log."""

  def __init__(self, logdir, name, script, args, num_processes, devices):
    self.logs = [os.path.join(logdir, f"{name}.{i}.log") for i in range(num_processes)]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    port = _free_port()
    self.procs = []
    for i, log in enumerate(self.logs):
      cmd = [sys.executable, script, *args]
      if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                f"--process_id={i}", f"--distributed_timeout_s={PEER_TIMEOUT_S}"]
      with open(log, "w") as f:  # a file, not a pipe: a full pipe would block the process
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                           stderr=subprocess.STDOUT))

  def output(self, i) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait(self, timeout=TIMEOUT_S) -> list[int]:
    """Waits for every process (all within `timeout` s); returns their exit codes."""
    deadline = time.time() + timeout
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"process {i} of {len(self.procs)} still running after {timeout} s:\n"
                    + self.output(i)[-3000:])
    return [p.returncode for p in self.procs]

  def check(self, timeout=TIMEOUT_S):
    codes = self.wait(timeout)
    for i, code in enumerate(codes):
      assert code == 0, f"process {i} exited with {code}:\n{self.output(i)[-3000:]}"

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


@contextlib.contextmanager
def _job(logdir, name, workdir, *extra, num_processes=2, devices=1, script="train.py"):
  job = _Job(logdir, name, script, [*TINY, "--workdir", str(workdir), *extra], num_processes,
             devices)
  try:
    yield job
  finally:
    job.kill()


def _wait_for(predicate, job, timeout=TIMEOUT_S, what=""):
  """Polls `predicate()` until it holds; fails if it does not within `timeout` s, or if a
  process of `job` exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    for i, p in enumerate(job.procs):
      if p.poll() is not None:
        pytest.fail(f"process {i} exited ({p.returncode}) before {what}:\n"
                    + job.output(i)[-3000:])
    time.sleep(0.05)
  pytest.fail(f"no {what} after {timeout} s")


def _records(workdir):
  """metrics.jsonl without the timing field."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in f]


def _steps(workdir, name="checkpoints"):
  path = os.path.join(workdir, name)
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _params(workdir):
  params, meta = checkpointing.load_params(str(workdir), "latest")
  return jax.tree_util.tree_map(np.asarray, params), meta


def _assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
  return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, logdir):
  """The reference: one process, 2 CPU devices, the same global batch."""
  workdir = tmp_path_factory.mktemp("one")
  with _job(logdir, "one", workdir, num_processes=1, devices=2) as job:
    job.check()
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, logdir):
  """2 processes with 1 CPU device each: (workdir, the job's outputs)."""
  workdir = tmp_path_factory.mktemp("two")
  with _job(logdir, "two", workdir) as job:
    job.check()
    return workdir, [job.output(i) for i in range(2)]


def test_two_processes_train_exactly_like_one(one_process, two_processes):
  """Same losses, accuracies and evaluations at every step, and bitwise the same final
  parameters: each process reads its half of the global batch and the gradient all-reduce
  sums the 2 devices' halves (one addition, the same in either order)."""
  workdir, _ = two_processes
  one, two = _records(one_process), _records(workdir)
  assert [r["step"] for r in one if r["kind"] == "train"] == list(range(1, STEPS + 1))
  assert len({r["loss"] for r in one}) > 3, "the tiny model should fire (a non-constant loss)"
  assert two == one
  (p1, m1), (p2, m2) = _params(one_process), _params(workdir)
  assert m1["step"] == m2["step"] == STEPS
  _assert_same_params(p2, p1)


def test_evaluation_counts_every_test_image_once(two_processes):
  """20 test images in global batches of 8: the last batch is half padding, all of it on
  process 1; the masked sums still count each image exactly once."""
  workdir, _ = two_processes
  evals = [r for r in _records(workdir) if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [8, 16]
  assert all(r["n"] == TEST_IMAGES for r in evals)


def test_only_process_0_writes_metrics_and_progress(one_process, two_processes):
  workdir, (out0, out1) = two_processes
  assert len(_records(workdir)) == len(_records(one_process))  # one line per record, not two
  assert "devices: 2 x cpu (2 processes)" in out0 and "parameters" in out0
  assert f"{TEST_IMAGES} test images" in out0
  for line in ("parameters", "test images", "step/s", "Traceback"):
    assert line not in out1, f"process 1 printed {line!r}:\n{out1[-3000:]}"


@pytest.mark.parametrize("num_processes,devices", [(2, 2), (4, 1)])
def test_eval_py_over_several_processes(two_processes, logdir, tmp_path, num_processes,
                                        devices):
  """eval.py on 2 processes x 2 devices and on 4 processes x 1 device (a global batch of 8 = 2
  images per device; the last batch's 4 images all on the first 2 devices, the other devices
  get only padding) restores the checkpoint saved under another device layout and counts the
  20 test images once."""
  workdir, _ = two_processes
  out = tmp_path / "eval.json"
  with _job(logdir, f"eval{num_processes}x{devices}", workdir, "--which", "latest", "--json",
            str(out), num_processes=num_processes, devices=devices, script="eval.py") as job:
    job.check()
    assert f"{TEST_IMAGES} test images" in job.output(0)
    for i in range(1, num_processes):
      assert "test images" not in job.output(i)
  with open(out) as f:
    result = json.load(f)
  final = [r for r in _records(workdir) if r["kind"] == "eval"][-1]
  assert result["n"] == TEST_IMAGES and result["top1"] == final["top1"]
  # Summed over 4 devices instead of 2: float rounding only.
  assert result["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_kill_9_one_process_then_restart_all_resumes_exactly(two_processes, logdir, tmp_path):
  """SIGKILL of process 1 mid-run: process 0 fails instead of hanging in the next collective;
  rerunning both resumes from the last checkpoint on the exact next batch and ends with the
  uninterrupted run's parameters, bitwise."""
  with _job(logdir, "killed", tmp_path) as job:
    _wait_for(lambda: any(s >= 4 for s in _steps(tmp_path)), job, what="checkpoint >= 4")
    job.procs[1].send_signal(signal.SIGKILL)
    # A gloo collective (a step) raises at once; a coordination barrier (orbax finishing a
    # save) raises when the dead peer's heartbeat times out (PEER_TIMEOUT_S). The exit then
    # waits for the peer again, so only the error is awaited.
    deadline = time.time() + PEER_TIMEOUT_S + 30
    while "Traceback" not in job.output(0) and job.procs[0].poll() is None:
      if time.time() > deadline:
        pytest.fail(f"process 0 neither failed nor exited within {PEER_TIMEOUT_S + 30} s of "
                    "process 1's kill:\n" + job.output(0)[-3000:])
      time.sleep(0.05)
    assert job.procs[0].poll() != 0, "process 0 finished normally despite the kill"
  killed_at = max(_steps(tmp_path))
  assert killed_at < STEPS, "the run finished before it could be killed"
  with _job(logdir, "restarted", tmp_path) as job:
    job.check()
    assert f"resumed at step {killed_at}" in job.output(0)
  _assert_same_params(_params(tmp_path)[0], _params(two_processes[0])[0])


def _saved_step(out):
  assert "saved step " in out, out[-3000:]
  return int(out.split("saved step ")[1].split()[0])


def test_signals_save_one_agreed_step(logdir, tmp_path):
  """SIGTERM to process 1 only, then (after a restart) SIGINT to both: each time every process
  stops after the same step, exits cleanly, and that step is the checkpoint on disk."""
  long_run = ("--config.num_epochs=500",)
  first_record = lambda: os.path.exists(tmp_path / "metrics.jsonl") and _records(tmp_path)
  with _job(logdir, "sigterm", tmp_path, *long_run) as job:
    _wait_for(first_record, job, what="the first metrics record")
    job.procs[1].send_signal(signal.SIGTERM)
    job.check()
    out0, out1 = job.output(0), job.output(1)
  step = _saved_step(out0)
  assert "saved step" not in out1, out1[-3000:]
  assert max(_steps(tmp_path)) == step < 500 * 8

  n_records = len(_records(tmp_path))
  with _job(logdir, "sigint", tmp_path, *long_run) as job:
    _wait_for(lambda: len(_records(tmp_path)) > n_records, job, what="a record after resuming")
    for p in job.procs:
      p.send_signal(signal.SIGINT)
    job.check()
    out0 = job.output(0)
  assert f"resumed at step {step}" in out0
  again = _saved_step(out0)
  assert "SIGINT" in out0 and again > step
  assert max(_steps(tmp_path)) == again


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="localhost:1234"), r"give all of .* missing \['num_processes', "
     r"'process_id'\]"),
    (dict(num_processes=2, process_id=0), r"missing \['coordinator_address'\]"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     r"process_id must be an int in \[0, 2\), got 2"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0),
     "num_processes must be an int >= 1, got 0"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0),
     "coordinator_address must be host:port, got 'localhost'"),
    (dict(timeout_s=0), "timeout_s must be an int >= 1, got 0"),
])
def test_distributed_settings_are_checked_before_connecting(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**kwargs)
