"""notebooks/colab.ipynb: the committed file is the generator's output, and it runs top to bottom.

The notebook runs on the CPU with its parameters overridden papermill-style (a cell tagged
"injected-parameters" after the one tagged "parameters"): the shipped Fashion-MNIST subset, 3
training steps, T=2, 64 test images, a workdir in tmp_path, no Drive, no pip, and a release-layout
.ckpt written here. Test-only cells appended after the notebook's own check its `run` helper: a
failing command raises, and an interrupt of the kernel reaches train.py as a SIGTERM, which saves a
checkpoint.
"""

import importlib.util
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (requirements-dev.txt)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (requirements-dev.txt)")

import bitnet_jax  # noqa: E402
import jax  # noqa: E402
from bitnet_jax import interop  # noqa: E402

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
CELL_TIMEOUT_S = 300  # per cell; this whole file: 113 s wall, 45 s CPU (2 shared cores, load 11)


def _generator():
  spec = importlib.util.spec_from_file_location("make_colab", ROOT / "notebooks" / "make_colab.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _stream_text(cell) -> str:
  """What a code cell printed (stdout and stderr)."""
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _ci_parameters(tmp_path) -> str:
  ckpt = tmp_path / "release.ckpt"
  model = bitnet_jax.create_model(fs=0.25, num_classes=10, in_channels=1, seed=1)
  interop.write_checkpoint(str(ckpt), interop.to_torch_state_dict(model.params))
  return "\n".join([
      'CONFIG = "configs/quickstart.py"',
      'DATASET = "fashion_mnist"',
      'PREPARE = False',
      f'DATA_DIR = {str(ROOT / "data" / "fashion_mnist_subset")!r}',
      'TRAIN_STEPS = 3',
      'EVAL_STEPS = 2',
      'SWEEP = "1,2"',
      'MAX_EVAL_EXAMPLES = 64',
      'OVERRIDES = "--config.time_steps=2 --config.eval_time_steps=2"',
      'USE_DRIVE = False',
      f'WORKDIR = {str(tmp_path / "run")!r}',
      f'CHECKPOINT = {str(ckpt)!r}',
      'INSTALL = False',
  ])


# Appended after the notebook's cells: its `run` helper on a failing command, then on an
# interrupted train.py (the kernel gets SIGINT, as from the stop button, once a checkpoint exists).
_FAILING = """
try:
  run(sys.executable, "-c", "import sys; sys.exit(3)")
except subprocess.CalledProcessError as e:
  print(f"failing command raised: status {e.returncode}")
"""
_INTERRUPT = """
import threading, time


def _interrupt_kernel(path, deadline):
  # Any saved step will do: with checkpoint_every=1, step 1 may be pruned before a poll sees it.
  while time.time() < deadline and not (
      path.is_dir() and any(p.name.isdigit() for p in path.iterdir())):
    time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGINT)

RUN2 = WORKDIR.parent / "interrupted"
threading.Thread(target=_interrupt_kernel, daemon=True,
                 args=(RUN2 / "checkpoints", time.time() + 120)).start()
try:
  run(sys.executable, "train.py", "--config", CONFIG_FILE, "--workdir", RUN2,
      "--config.max_train_steps=500", "--config.checkpoint_every=1", *COMMON)
except KeyboardInterrupt as e:
  print(f"KeyboardInterrupt: {e}")
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook after running it on the CPU: (notebook, workdir, {cell id: printed text})."""
  tmp_path = tmp_path_factory.mktemp("notebook")
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(index) == 1, f"expected one cell tagged 'parameters', found {len(index)}"
  injected = nbformat.v4.new_code_cell(_ci_parameters(tmp_path), id="injected-parameters")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index[0] + 1, injected)
  nb.cells.append(nbformat.v4.new_code_cell(_FAILING.strip(), id="test-failing"))
  nb.cells.append(nbformat.v4.new_code_cell(_INTERRUPT.strip(), id="test-interrupt"))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, startup_timeout=60, kernel_name="python3",
      resources={"metadata": {"path": str(ROOT / "notebooks")}})  # cwd: below the checkout
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    failed = next(c for c in nb.cells if any(o.output_type == "error" for o in c.get("outputs", [])))
    pytest.fail(f"the notebook's cell {failed.id!r} failed; its output:\n"
                f"{_stream_text(failed)[-4000:]}\n{e.ename}: {e.evalue}")
  text = {c.id: _stream_text(c) for c in nb.cells if c.cell_type == "code"}
  return nb, tmp_path / "run", text


def test_committed_notebook_is_the_generators_output():
  generator = _generator()
  assert NOTEBOOK.read_text(encoding="utf-8") == generator.render(), (
      "notebooks/colab.ipynb is stale: run python notebooks/make_colab.py")
  params = next(c for c in generator.build().cells if c.id == "params")
  assert f'REPO_URL = "{generator.REPO_URL}"' in params.source
  assert params.metadata["tags"] == ["parameters"]


def test_notebook_runs_top_to_bottom(executed):
  nb, workdir, text = executed
  assert "runtime: CPU | Colab: False" in text["runtime"]
  assert f"checkout: {ROOT}" in text["checkout"]
  assert f"jax=={jax.__version__}" in text["install"]  # the pin that keeps Colab's jax
  assert "INSTALL is False" in text["install"] and "x cpu" in text["install"]
  assert "PREPARE is False: skipped" in text["prepare"]
  # Training ran its 3 steps and printed the final validation.
  assert re.search(r"step 3 \(epoch [\d.]+\): test top-1 [\d.]+ %, top-5", text["train"]), text["train"]
  assert "64 test images" in text["train"]
  # Evaluation printed top-1 and the sweep table, and the plot was written and displayed.
  assert re.search(r"fashion_mnist: 64 test images, T=2, .*\| top-1 [\d.]+%", text["eval"])
  assert "| 1 |" in text["eval"] and "| 2 |" in text["eval"]
  assert (workdir / "sweep.png").stat().st_size > 1000
  assert (workdir / "eval.json").exists()
  cell = next(c for c in nb.cells if c.id == "eval")
  assert any(o.output_type == "display_data" and "image/png" in o.data for o in cell.outputs)
  # The release-layout checkpoint was read and evaluated with the sparsity table.
  assert "release.ckpt" in text["release"] and "| Layer1 |" in text["release"]


def test_run_helper_raises_on_failure_and_forwards_an_interrupt(executed):
  _, workdir, text = executed
  assert "failing command raised: status 3" in text["test-failing"]
  out = text["test-interrupt"]
  assert "[interrupted: SIGTERM sent" in out and "KeyboardInterrupt: interrupted" in out, out
  saved = re.search(r"saved step (\d+) to", out)
  assert saved, out
  assert (workdir.parent / "interrupted" / "checkpoints" / saved.group(1)).is_dir()


def test_a_gpu_runtime_whose_jax_sees_no_gpu_is_refused(tmp_path, monkeypatch):
  """The install cell stops the notebook when JAX would silently train on the CPU of a GPU machine.

  A fake `nvidia-smi` on PATH makes the runtime look like a GPU one; JAX_PLATFORMS=cpu (conftest)
  makes JAX see only the CPU, as after pip had replaced Colab's CUDA build.
  """
  fake = tmp_path / "bin" / "nvidia-smi"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\necho 'GPU 0: a fake GPU'\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  keep = {"params", "runtime", "checkout", "install"}
  nb.cells = [c for c in nb.cells if c.get("id") in keep]
  nb.cells.insert(1, nbformat.v4.new_code_cell("INSTALL = False", id="injected-parameters"))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, startup_timeout=60, kernel_name="python3",
      resources={"metadata": {"path": str(ROOT / "notebooks")}})
  with pytest.raises(nbclient.exceptions.CellExecutionError,
                     match="the runtime has a GPU but JAX found only cpu devices"):
    client.execute()
  runtime = next(c for c in nb.cells if c.id == "runtime")
  assert "runtime: GPU" in _stream_text(runtime)
