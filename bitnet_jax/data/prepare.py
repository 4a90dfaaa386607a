"""Prepares a TFDS dataset as ArrayRecord files, the format that training reads.

The command is `bitnet_jax/cli/prepare.py`:

  python -m bitnet_jax.cli.prepare cifar10|cifar100|mnist|fashion_mnist [--data_dir DIR]
      [--overwrite]

`data_dir` is the TFDS data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets); give
training the same folder as `--config.data_dir`. TFDS downloads the files (network) and writes
`DIR/<name>/<version>/*.array_record-*` plus `dataset_info.json`; the downloads stay in
`DIR/downloads`.

TFDS's builders need TensorFlow to prepare (tf.io.gfile, PNG encoding), but not to read. So
`download_and_prepare` runs in a child process (`sys.executable`) with the accelerators hidden
from it (CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS=cpu): the training process never imports
TensorFlow, and TensorFlow never takes GPU memory. Without TensorFlow (or importlib_resources,
which TFDS needs here but does not install) nothing starts and the error names the fix
(`pip install tensorflow-cpu`; where a `tensorflow` package is installed, that one works too).

A dataset already prepared as ArrayRecord is left as it is (nothing runs). A TFRecord
preparation (e.g. left by `tfds.load`) in the same place is an error, because TFDS would reuse
it instead of writing ArrayRecord; `--overwrite` replaces it (the downloads are reused).

Test hook: when the environment variable BITNET_JAX_TEST_DOWNLOADS_FROM names a folder, the child
takes each file TFDS would download from that folder (matched by the URL's file name), without
checksum checks; everything after the download (extraction, example generation, writing) is
TFDS's own code. tests/test_prepare.py uses it to prepare the real `fashion_mnist` builder
offline from Debian's copy of the same files; BITNET_JAX_TEST_MAX_EXAMPLES_PER_SPLIT=N keeps only
the first N examples of each split (TFDS's `max_examples_per_split`) to keep that test fast.
Neither is meant for anything else.
"""

import importlib.util
import os
import subprocess
import sys
import time

from etils import epath

from bitnet_jax.data import tfds

NAMES = tfds.NAMES
# What preparing imports beyond requirements.txt, and the pip package of each. TFDS's builders
# need importlib_resources, which TFDS 4.9.10 declares only for Python < 3.9
# (tensorflow/datasets#11212).
NEEDS = {"tensorflow": "tensorflow-cpu", "importlib_resources": "importlib_resources"}
TEST_DOWNLOADS_ENV = "BITNET_JAX_TEST_DOWNLOADS_FROM"
TEST_MAX_EXAMPLES_ENV = "BITNET_JAX_TEST_MAX_EXAMPLES_PER_SPLIT"
_CANNOT_IMPORT = 3  # exit status of the child when it cannot import a module of NEEDS


def prepare(name: str, data_dir: str | None = None, *, overwrite: bool = False,
            timeout_s: float | None = None) -> str:
  """Prepares TFDS dataset `name` as ArrayRecord in `data_dir`, in a child process.

  The child's output (TFDS's progress bars) goes to this process's stdout/stderr.

  Args:
    name: one of `NAMES`.
    data_dir: the TFDS data dir; '' or None: TFDS's default.
    overwrite: replace a preparation in another file format (TFRecord).
    timeout_s: bound on the child's run time in seconds; None: no bound.

  Returns:
    The folder holding the prepared files (`<data_dir>/<name>/<version>`).

  Raises:
    ValueError: if `name` is not one of `NAMES`.
    FileExistsError: if a preparation in another format is there and not `overwrite`.
    ModuleNotFoundError: if TensorFlow or importlib_resources cannot be imported (the message
      names the pip command).
    RuntimeError: if the child fails otherwise (its output is above the error).
    subprocess.TimeoutExpired: if the child runs longer than `timeout_s`.
  """
  if name not in NAMES:
    raise ValueError(f"Cannot prepare {name!r}: expected one of {', '.join(NAMES)}.")
  missing = [module for module in NEEDS if importlib.util.find_spec(module) is None]
  if missing:
    raise ModuleNotFoundError(_needs(name, f"not installed here: {', '.join(missing)}", missing))
  if data_dir and "://" not in data_dir:  # a local folder, not e.g. gs://bucket/tfds
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  path, formats = tfds.tfds_prepared(name, data_dir or None)
  if "array_record" in formats:
    print(f"{name} is already prepared as ArrayRecord in {path}; nothing to do.", flush=True)
    return path
  if formats and not overwrite:
    raise FileExistsError(
        f"{path} holds a {'/'.join(formats)} preparation of {name}, not ArrayRecord; TFDS would "
        f"reuse it. Replace it with `{tfds.prepare_command(name, data_dir, overwrite=True)}` "
        "(the downloads are kept), or choose another --data_dir.")
  if formats:  # TFDS cannot change the format of a preparation in place
    print(f"Removing the {'/'.join(formats)} preparation in {path} (--overwrite).", flush=True)
    epath.Path(path).rmtree()
  print(f"Preparing {name} as ArrayRecord in {path} (in a child process without "
        "accelerators) ...", flush=True)
  start = time.monotonic()
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "bitnet_jax.cli.prepare", name, "--child"]  # runs `child`
  if data_dir:
    cmd += ["--data_dir", data_dir]
  status = subprocess.run(cmd, env=env, timeout=timeout_s, check=False).returncode
  if status == _CANNOT_IMPORT:
    raise ModuleNotFoundError(_needs(name, "the child process cannot import one of them; the "
                                     "reason is above", list(NEEDS)))
  if status != 0:
    raise RuntimeError(f"Preparing {name} in {path} failed: the child process exited with "
                       f"status {status}; its output is above.")
  path, formats = tfds.tfds_prepared(name, data_dir)
  if "array_record" not in formats:
    raise RuntimeError(f"Preparing {name} ended without error, but {path} holds no ArrayRecord "
                       f"preparation (file formats found: {list(formats) or 'none'}).")
  print(f"Prepared {name} in {path} in {time.monotonic() - start:.0f} s.", flush=True)
  return path


def _needs(name: str, found: str, modules: list[str]) -> str:
  """The message for missing modules of NEEDS: what was found and the one pip command."""
  return (f"Preparing {name} needs TensorFlow (TFDS's builder writes the files with it; training "
          f"does not) and importlib_resources ({found}). Install with: "
          f"pip install {' '.join(NEEDS[m] for m in modules)}")


def child(name: str, data_dir: str | None) -> None:
  """Runs TFDS's download_and_prepare (ArrayRecord): the body of the child process of `prepare`
  (`python -m bitnet_jax.cli.prepare NAME --child`); exits with status 3 if it cannot import
  what preparing needs."""
  try:
    import importlib_resources  # pylint: disable=import-outside-toplevel,unused-import
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"Cannot import a module that preparing needs: {e}", file=sys.stderr, flush=True)
    sys.exit(_CANNOT_IMPORT)
  tf.config.set_visible_devices([], "GPU")  # belt and braces with CUDA_VISIBLE_DEVICES=''
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel
  if os.environ.get(TEST_DOWNLOADS_ENV):
    _serve_downloads_from(os.environ[TEST_DOWNLOADS_ENV])
  max_examples = int(os.environ.get(TEST_MAX_EXAMPLES_ENV, 0)) or None  # test hook
  config = tensorflow_datasets.download.DownloadConfig(max_examples_per_split=max_examples)
  builder = tensorflow_datasets.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(file_format="array_record", download_config=config)


def _serve_downloads_from(folder: str) -> None:
  """Test hook: TFDS's DownloadManager takes each URL's file from `folder` (no checksums)."""
  import promise  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from tensorflow_datasets.core.download import download_manager

  def local_file(self, resource):  # replaces DownloadManager._download_or_get_cache
    del self
    url = getattr(resource, "url", resource)  # a tfds.download.Resource or a str
    path = epath.Path(folder) / os.path.basename(url)
    if not path.exists():
      raise FileNotFoundError(f"{TEST_DOWNLOADS_ENV}: {path} not found (for {url}).")
    return promise.Promise.resolve(path)

  print(f"Test hook: TFDS downloads are served from {folder}.", flush=True)
  # pylint: disable-next=protected-access
  download_manager.DownloadManager._download_or_get_cache = local_file

