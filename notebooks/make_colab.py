"""Writes notebooks/colab.ipynb: train and evaluate BITnet in Colab (GPU, TPU or CPU runtime).

  python notebooks/make_colab.py           # rewrite the notebook after editing the cells below
  python notebooks/make_colab.py --check   # exit 1 if the committed notebook is stale

The notebook is generated so that its code is reviewed here as plain Python; tests/test_notebook.py
checks that the committed .ipynb equals this script's output, then executes it on the CPU with
small parameters (the shipped Fashion-MNIST subset, 3 training steps).

Design: the notebook's kernel never imports jax. Every JAX program (prepare, train.py, eval.py)
runs as a child process through the notebook's `run()` helper, because a TPU can be held by one
process only and a GPU's memory is preallocated by the first JAX process: a kernel holding the
accelerator would starve the commands it starts.
"""

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat import v4

REPO_URL = "https://github.com/bitnet-jax/bitnet-jax"  # the public repository; cloned only in Colab
BRANCH = "main"
NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab.ipynb")
COLAB_URL = ("https://colab.research.google.com/github/" + REPO_URL.split("github.com/")[1] +
             f"/blob/{BRANCH}/notebooks/colab.ipynb")
BADGE = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})"


def _md(cell_id: str, text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip(), id=cell_id)


def _code(cell_id: str, text: str, tags: tuple[str, ...] = ()):
  cell = v4.new_code_cell(textwrap.dedent(text).strip(), id=cell_id)
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def _cells() -> list:
  return [
      _md("intro", f"""
        # BITnet in Colab: train, evaluate, load the release's weights

        {BADGE}

        Spiking CNNs with the **bddi** activation in JAX ([bitnet-jax]({REPO_URL})). This notebook
        sets up the repository, prepares CIFAR-10, trains a short run, evaluates it at 200 time
        steps with an accuracy-vs-steps plot, and (optionally) evaluates a checkpoint of the
        original PyTorch release.

        Pick the accelerator first: *Runtime → Change runtime type* → a GPU or a TPU (the notebook
        also runs on a CPU runtime, slowly). Then *Runtime → Run all*.

        Every JAX program runs as a separate command (`train.py`, `eval.py`, ...), never inside
        this notebook's own Python: a TPU can be used by one process at a time, and the first JAX
        process on a GPU reserves most of its memory.
      """),
      _md("params-md", """
        ## Parameters

        Edit them here, or let papermill-style tools override them (this cell is tagged
        `parameters`). The defaults train the seed's CIFAR-10 model (`configs/cifar10.py`, fs=4,
        T=50) for a few steps only: a demonstration, not a full training (the config's
        `num_epochs` is 200).
      """),
      _code("params", f"""
        REPO_URL = "{REPO_URL}"  # cloned only when not already inside a checkout
        CONFIG = "configs/cifar10.py"    # config file, relative to the checkout
        DATASET = "cifar10"              # --config.dataset
        PREPARE = True                   # prepare DATASET (TFDS) first; False when DATA_DIR holds it already
        TRAIN_STEPS = 100                # optimizer steps of this run (--config.max_train_steps)
        EVAL_STEPS = 200                 # time steps T at evaluation (eval.py --steps)
        SWEEP = "10,50,100,200"          # step counts of the accuracy-vs-steps plot; "" = no sweep
        MAX_EVAL_EXAMPLES = -1           # test images evaluated; -1 = the whole test split
        OVERRIDES = ""                   # more flags for train.py and eval.py, e.g. "--config.batch_size=64"
        USE_DRIVE = True                 # in Colab: keep the workdir and the data on Google Drive
        DRIVE_DIR = "/content/drive/MyDrive/bitnet-jax"  # folder on Drive (when USE_DRIVE)
        WORKDIR = ""                     # run directory; "" = <Drive folder or checkout>/workdirs/<config name>
        DATA_DIR = ""                    # TFDS data dir; "" = <Drive folder>/tensorflow_datasets or ~/tensorflow_datasets
        CHECKPOINT = ""                  # a .ckpt of the original release to evaluate; "" = skip that step
        INSTALL = True                   # pip-install the package (False: its requirements are installed)
      """, tags=("parameters",)),
      _md("runtime-md", """
        ## 1. Runtime and the `run` helper

        The runtime is detected without importing JAX: TPU from the environment
        (`COLAB_TPU_ADDR`, `TPU_NAME`, `TPU_ACCELERATOR_TYPE`), GPU from `nvidia-smi`, TPU again
        from the chips' device files (`/dev/accel*`, `/dev/vfio/*`), otherwise CPU. After the
        install, a child process prints what JAX itself finds.

        `run(...)` starts a command, streams its output here, and stops the notebook if the command
        fails (a `!command` only prints the failure and goes on). Interrupting a cell that runs a
        command (the stop button) sends the command one SIGTERM and waits for it: `train.py` then
        saves a checkpoint and exits. A second interrupt kills the command.
      """),
      _code("runtime", """
        import codecs
        import ctypes
        import glob
        import importlib.metadata
        import importlib.util
        import os
        import shlex
        import shutil
        import signal
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        from IPython.display import Image, display

        IN_COLAB = "google.colab" in sys.modules


        def detect_runtime() -> str:
          \"\"\"'TPU', 'GPU' or 'CPU', found without importing jax.\"\"\"
          if any(os.environ.get(k) for k in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")):
            return "TPU"
          if shutil.which("nvidia-smi") and subprocess.run(
              ["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0:
            return "GPU"
          if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VM chips
            return "TPU"
          return "CPU"


        try:  # Linux: a command started by run() gets SIGTERM when this kernel dies (it then saves)
          _PRCTL = ctypes.CDLL(None).prctl
        except (AttributeError, OSError):
          _PRCTL = None


        def _child_setup():
          if _PRCTL is not None:
            _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


        def run(*args):
          \"\"\"Runs a command, streaming its output into the cell.

          The command runs in its own session, so an interrupt of the kernel reaches it only as the
          one SIGTERM sent here.

          Raises:
            subprocess.CalledProcessError: the command exited with a non-zero status.
            KeyboardInterrupt: the cell was interrupted (after the command has exited).
          \"\"\"
          cmd = [str(a) for a in args]
          print("$ " + shlex.join("python" if c == sys.executable else c for c in cmd), flush=True)
          proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_child_setup)
          decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
          interrupts = 0
          while True:
            try:
              data = os.read(proc.stdout.fileno(), 1 << 16)
              if not data:
                break
              sys.stdout.write(decoder.decode(data))
              sys.stdout.flush()
            except KeyboardInterrupt:
              interrupts += 1
              if interrupts == 1:
                print("\\n[interrupted: SIGTERM sent; waiting for the command to save and exit]",
                      flush=True)
                proc.terminate()
              else:
                print("\\n[interrupted again: killing the command]", flush=True)
                proc.kill()
          proc.stdout.close()
          code = proc.wait()
          if interrupts:
            raise KeyboardInterrupt(f"interrupted; the command exited with status {code}")
          if code:
            raise subprocess.CalledProcessError(code, cmd)


        RUNTIME = detect_runtime()
        print(f"runtime: {RUNTIME} | Colab: {IN_COLAB} | Python {sys.version.split()[0]}")
        if RUNTIME == "GPU":
          run("nvidia-smi", "-L")
      """),
      _md("checkout-md", """
        ## 2. The repository

        Inside a checkout (a `bitnet_jax/` folder in the current directory or above it), the
        notebook uses it; otherwise it clones `REPO_URL`. `%cd` (not `!cd`, which only changes the
        directory of its own short-lived shell) makes the checkout the working directory of every
        later cell.
      """),
      _code("checkout", """
        def find_checkout(start: Path):
          \"\"\"The nearest folder at or above `start` (or a bitnet-jax/ in it) holding bitnet_jax/.\"\"\"
          for d in (start, *start.parents, start / "bitnet-jax"):
            if (d / "bitnet_jax").is_dir() and (d / "train.py").is_file():
              return d
          return None


        REPO = find_checkout(Path.cwd().resolve())
        if REPO is None:
          REPO = Path("/content/bitnet-jax" if IN_COLAB else "bitnet-jax").resolve()
          run("git", "clone", "--depth", "1", REPO_URL, REPO)
        print(f"checkout: {REPO}")
        %cd {REPO}
      """),
      _md("install-md", """
        ## 3. Install without replacing Colab's JAX

        Colab's JAX is built for the runtime's accelerator; a plain `pip install` could swap it for
        the CPU build. The installed `jax`, `jaxlib` (and CUDA/TPU plugins) are pinned in a pip
        constraints file, so pip keeps them or fails loudly. Without JAX (a plain CPU machine) pip
        installs the CPU build. With `PREPARE`, TFDS's preparation also needs TensorFlow (Colab
        has it; elsewhere `tensorflow-cpu` is installed) and `importlib_resources`. A child
        process then reports what JAX sees.
      """),
      _code("install", """
        PINNED = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                  "jax-cuda13-pjrt", "libtpu", "libtpu-nightly")
        pins = []
        for name in PINNED:
          try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
          except importlib.metadata.PackageNotFoundError:
            pass
        CONSTRAINTS = Path(tempfile.gettempdir()) / "bitnet_jax_constraints.txt"
        CONSTRAINTS.write_text("".join(p + "\\n" for p in pins))
        print("pip constraints: " + (", ".join(pins) if pins else "none (jax is not installed: pip "
                                     "installs the CPU build)"))
        if not INSTALL:
          print("INSTALL is False: nothing installed")
        elif (REPO / "pyproject.toml").exists():
          run(sys.executable, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "-e", REPO)
        else:  # a checkout without pyproject.toml: its requirements; commands import it from REPO
          run(sys.executable, "-m", "pip", "install", "-q", "-c", CONSTRAINTS,
              "-r", REPO / "requirements.txt")
        if INSTALL and PREPARE:  # preparing TFDS data also needs TensorFlow (Colab has it)
          tensorflow = [] if importlib.util.find_spec("tensorflow") else ["tensorflow-cpu"]
          run(sys.executable, "-m", "pip", "install", "-q", "-c", CONSTRAINTS,
              "importlib_resources", *tensorflow)

        probe = subprocess.run(
            [sys.executable, "-c", "import jax; d = jax.devices(); "
             "print(jax.__version__, d[0].platform, len(d), d[0].device_kind, sep='|')"],
            capture_output=True, text=True, timeout=600)
        if probe.returncode:
          raise RuntimeError(f"importing jax failed (exit status {probe.returncode}):\\n"
                             f"{probe.stderr[-3000:]}")
        jax_version, platform, n_devices, kind = probe.stdout.strip().splitlines()[-1].split("|")
        print(f"JAX {jax_version}: {n_devices} x {platform} ({kind})")
        if RUNTIME != "CPU" and platform != RUNTIME.lower():
          raise RuntimeError(
              f"the runtime has a {RUNTIME} but JAX found only {platform} devices. Install the "
              f"accelerator build (pip install -U \\"jax[{'tpu' if RUNTIME == 'TPU' else 'cuda12'}]\\"), "
              "restart the session and run all cells again")
      """),
      _md("paths-md", """
        ## 4. Where runs and data live

        In Colab with `USE_DRIVE`, Google Drive is mounted and the workdir (checkpoints,
        `metrics.jsonl`, plots) and the prepared data go to `DRIVE_DIR`, so they outlive the
        session: a later session resumes training and skips the download. Otherwise they stay on
        the machine: `workdirs/<config name>` in the checkout (`train.py`'s default) and TFDS's
        default data dir.
      """),
      _code("paths", """
        if IN_COLAB and USE_DRIVE:
          from google.colab import drive
          drive.mount("/content/drive")
          BASE, DEFAULT_DATA = Path(DRIVE_DIR), Path(DRIVE_DIR) / "tensorflow_datasets"
        else:
          if USE_DRIVE:
            print("not in Colab: local folders instead of Google Drive")
          BASE, DEFAULT_DATA = REPO, Path.home() / "tensorflow_datasets"
        NAME = Path(CONFIG).stem
        WORKDIR = Path(WORKDIR or BASE / "workdirs" / NAME).resolve()
        DATA_DIR = Path(DATA_DIR or DEFAULT_DATA).resolve()
        CONFIG_FILE = REPO / CONFIG
        WORKDIR.mkdir(parents=True, exist_ok=True)
        # Flags shared by train.py and eval.py.
        COMMON = [f"--config.dataset={DATASET}", f"--config.data_dir={DATA_DIR}",
                  f"--config.max_eval_examples={MAX_EVAL_EXAMPLES}", *shlex.split(OVERRIDES)]
        print(f"config:  {CONFIG_FILE}\\nworkdir: {WORKDIR}\\ndata:    {DATA_DIR}")
      """),
      _md("prepare-md", """
        ## 5. Prepare the dataset

        `python -m bitnet_jax.cli.prepare NAME --data_dir DIR` downloads the dataset with TFDS and
        writes it as ArrayRecord files (in a child process; a prepared dataset is reused). With
        `PREPARE = False` the data is read from `DATA_DIR` as it is, e.g. the Fashion-MNIST subset
        shipped in `data/fashion_mnist_subset` (`DATASET = "fashion_mnist"`).
      """),
      _code("prepare", """
        if PREPARE:
          run(sys.executable, "-m", "bitnet_jax.cli.prepare", DATASET, "--data_dir", DATA_DIR)
        else:
          print(f"PREPARE is False: skipped; {DATASET} is read from {DATA_DIR}")
      """),
      _md("train-md", """
        ## 6. Train

        A short run of `TRAIN_STEPS` optimizer steps, validated at its end (the line
        `step N (...): top-1 ...`). **Interrupting this cell saves a checkpoint; running it again
        resumes from it** (same workdir, same batches as an uninterrupted run). A workdir that
        already holds the finished run is not trained again.

        No precision or synapse flags are needed: the config's `auto` defaults pick the fast path
        for this runtime (bfloat16 synapses on a GPU or TPU; float32 with the zero-skipping sparse
        kernel on a CPU), and the run's header prints what they resolved to, e.g. `compute:
        bfloat16 synapses, float32 state and parameters, dense synapses (XLA), remat=stream (auto
        on gpu: Tesla T4)`. An explicit `--config.compute_dtype=...` in `OVERRIDES` wins.
      """),
      _code("train", """
        run(sys.executable, "train.py", "--config", CONFIG_FILE, "--workdir", WORKDIR,
            f"--config.max_train_steps={TRAIN_STEPS}", *COMMON)
      """),
      _md("eval-md", """
        ## 7. Evaluate

        `eval.py` evaluates the latest checkpoint on the test split at `EVAL_STEPS` time steps.
        With `SWEEP` it also reports top-1 at each of those step counts from the same run (the
        counts at step t are partial sums; T is the largest of `EVAL_STEPS` and the sweep), writes
        the metrics to `eval.json` and plots accuracy against time steps.
      """),
      _code("eval", """
        SWEEP_PNG = WORKDIR / "sweep.png"
        sweep_flags = ["--sweep", SWEEP, "--plot", SWEEP_PNG] if SWEEP else []
        run(sys.executable, "eval.py", "--config", CONFIG_FILE, "--workdir", WORKDIR,
            "--which", "latest", "--steps", EVAL_STEPS, "--json", WORKDIR / "eval.json",
            *sweep_flags, *COMMON)
        if SWEEP:
          display(Image(filename=str(SWEEP_PNG)))
      """),
      _md("release-md", """
        ## 8. The release's weights (optional)

        `CHECKPOINT` is a `.ckpt` of the original PyTorch release (e.g. copied to Drive), for the
        architecture of `CONFIG`. It is read without PyTorch and without running its pickle, then
        evaluated at the config's own T (`eval_time_steps`, 50 for CIFAR-10, where the seed
        reports 94.37 % for BITnet6 over the whole test split) with the per-layer sparsity table.
      """),
      _code("release", """
        if CHECKPOINT:
          run(sys.executable, "eval.py", "--config", CONFIG_FILE, "--torch_checkpoint", CHECKPOINT,
              "--sparsity", *COMMON)
        else:
          print("CHECKPOINT is empty: skipped (set it to a release .ckpt and run this cell)")
      """),
  ]


def build() -> nbformat.NotebookNode:
  """The notebook, without outputs."""
  nb = v4.new_notebook(cells=_cells())
  nb.metadata = {
      "accelerator": "GPU",  # Colab opens it on a GPU runtime; switch to a TPU in Colab's menu
      "colab": {"gpuType": "T4", "provenance": [], "toc_visible": True},
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
  }
  nbformat.validate(nb)
  return nb


def render() -> str:
  """The notebook file's text."""
  return nbformat.writes(build()) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if notebooks/colab.ipynb differs from this script's output")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    with open(NOTEBOOK, encoding="utf-8") as f:
      if f.read() != text:
        sys.exit(f"{NOTEBOOK} is stale: run python notebooks/make_colab.py")
    print(f"{NOTEBOOK} is up to date")
    return
  with open(NOTEBOOK, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
  main()
