"""The installable package (pyproject.toml) and its dependency floors.

- requirements.txt (the package's dependencies: pyproject.toml reads it), requirements-min.txt
  (the floors, pinned; CI runs a test subset against them in .ci/run) and the installed
  package's metadata must name the same packages at the same versions.
- `pip install .` into a fresh venv works, and the package then runs from any directory: the
  kernel source ships inside it and the kernel is cached in ~/.cache/bitnet_jax.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from bitnet_jax.kernels import shared_library
from bitnet_jax.kernels import spike_conv

pytestmark = pytest.mark.slow  # the fast subset: python -m pytest -m "not slow"

ROOT = Path(__file__).resolve().parent.parent
# What pyproject.toml builds from: a copy of these is installed (not the checkout itself, whose
# in-tree build/ and *.egg-info would collide with other runs).
PACKAGE_FILES = ("pyproject.toml", "requirements.txt", "README.md", "bitnet_jax")

# Run by the test process and by the installed package (from outside the repository): a tiny
# model's class scores.
COUNTS = """
import jax, numpy as np, bitnet_jax
def tiny_counts():
  model = bitnet_jax.create_model(fs=0.25, num_classes=10, seed=0)
  model = model.replace(params=jax.tree_util.tree_map(lambda a: 2 * a, model.params))  # fires
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return np.asarray(bitnet_jax.spike_counts(model, images, time_steps=4))  # (2, 10)
"""

# Also builds (or finds) the sparse-synapse kernel from the installed source.
PROBE = COUNTS + """
import json, sys
import bitnet_jax.cli.runner, bitnet_jax.data  # the sub-packages are installed too
from bitnet_jax.kernels import shared_library, spike_conv

ok, why = spike_conv.available()
np.save(sys.argv[1] + "/counts.npy", tiny_counts())
print(json.dumps({"file": bitnet_jax.__file__, "source": str(shared_library.SOURCE),
                  "cache": str(shared_library._cache_dir()), "kernel": [ok, why],
                  "cached": sorted(p.name for p in shared_library._cache_dir().glob("*.so"))}))
"""

WHERE = "import json, bitnet_jax; print(json.dumps({'file': bitnet_jax.__file__}))"


def read_requirements(path: Path) -> dict[str, Requirement]:
  """Parses a requirements file that setuptools can read as well as pip.

  Args:
    path: a file of one requirement a line; blank lines and whole-line comments allowed.

  Returns:
    {canonical name: Requirement}.

  Raises:
    ValueError: a line that is not one plain requirement (a trailing comment, a pip option such
      as -r or -e), or a package named twice.
  """
  out = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    try:
      req = Requirement(line)
    except InvalidRequirement as e:
      raise ValueError(f"{path.name}:{number}: expected one requirement (whole-line comments "
                       f"only, no pip options), found {line!r}") from e
    name = canonicalize_name(req.name)
    if name in out:
      raise ValueError(f"{path.name}:{number}: {req.name} is already listed")
    out[name] = req
  return out


def single_bound(req: Requirement, operator: str) -> str:
  """The version of `req` when its only specifier uses `operator`, else ValueError."""
  specs = list(req.specifier)
  if len(specs) != 1 or specs[0].operator != operator or req.marker or req.extras:
    raise ValueError(f"{req.name}: expected exactly one '{operator}' bound and no extras or "
                     f"markers, found {str(req)!r}")
  return specs[0].version


def test_floors_pins_and_pyproject_agree():
  """requirements.txt's `>=` floors are requirements-min.txt's `==` pins, and pyproject.toml
  takes its dependencies from requirements.txt (so the three cannot drift apart)."""
  floors = {name: single_bound(req, ">=")
            for name, req in read_requirements(ROOT / "requirements.txt").items()}
  pins = {name: single_bound(req, "==")
          for name, req in read_requirements(ROOT / "requirements-min.txt").items()}
  assert floors == pins
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "dependencies" not in project["project"]
  assert "dependencies" in project["project"]["dynamic"]
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


@pytest.mark.parametrize("text,match", [
    ("pillow>=10.0  # JPEGs\n", "expected one requirement"),
    ("-r requirements.txt\n", "expected one requirement"),
    ("numpy>=1.26\nNumPy>=2\n", "already listed"),
])
def test_read_requirements_rejects_what_setuptools_cannot_read(tmp_path, text, match):
  path = tmp_path / "requirements.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    read_requirements(path)


@pytest.mark.parametrize("text,operator,match", [
    ("jax>=0.5,<1", ">=", "exactly one '>=' bound"),
    ("jax==0.5.0", ">=", "exactly one '>=' bound"),
    ("jax[cuda12]>=0.5.0", ">=", "no extras"),
    ("jax", "==", "exactly one '==' bound"),
])
def test_single_bound_rejects_other_specifiers(text, operator, match):
  with pytest.raises(ValueError, match=match):
    single_bound(Requirement(text), operator)


def _run(cmd, cwd, timeout=180):
  """Runs `cmd` with the repository off the path; returns stdout, or fails with its output."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "BITNET_JAX_CACHE", "XDG_CACHE_HOME")}
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
  return done.stdout


def _fresh_venv(path: Path) -> Path:
  """A new venv that sees this test's packages (its python's python).

  `venv --system-site-packages` would show the *base* interpreter's site-packages: from inside
  a venv (how most users run the tests) that is not where jax and the others are, and the base's
  bundled setuptools may be too old to build a wheel. So the new venv has no pip of its own and a
  .pth file that appends this interpreter's site-packages to its path: pip, setuptools, jax, ...
  are this environment's, and `pip install` still installs into the new venv.
  """
  _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent, timeout=120)
  python = path / "bin" / "python"
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                 cwd=path.parent).strip()
  ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
  (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(ours) + "\n")
  return python


def _builds_wheels_offline() -> bool:
  """Whether this environment's setuptools (seen through the .pth file) can build a wheel: it has
  bdist_wheel from 70.1 on, older ones need the `wheel` package (Python 3.11's venvs bundle
  setuptools 65.5 without it)."""
  if importlib.util.find_spec("setuptools") is None:
    return False
  import setuptools  # pylint: disable=import-outside-toplevel
  version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
  return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _pip_install(python, *target):
  """pip install into the venv without downloads where this environment's setuptools builds
  wheels, else with an isolated build (setuptools from PyPI)."""
  offline = ["--no-index", "--no-build-isolation"] if _builds_wheels_offline() else []
  _run([python, "-m", "pip", "install", "-q", "--no-deps", *offline, *target], cwd=target[-1])


def test_pip_install_then_run_from_outside_the_repository(tmp_path):
  """`pip install .` then `pip install -e .`, each used from a directory outside the checkout."""
  src = tmp_path / "src"
  src.mkdir()
  for name in PACKAGE_FILES:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(ROOT / name, src / name)
  venv, work = tmp_path / "venv", tmp_path / "work"
  work.mkdir()
  python = _fresh_venv(venv)

  _pip_install(python, src)
  got = json.loads(_run([python, "-c", PROBE, work], cwd=work).splitlines()[-1])
  package = Path(got["file"]).parent
  assert package.parent.name == "site-packages" and venv in package.parents, got["file"]
  assert Path(got["source"]) == package / "kernels" / "csrc" / "spike_conv.cc"
  assert (package / "kernels" / "csrc" / "spike_conv.cc").read_bytes() == (
      shared_library.SOURCE.read_bytes())
  assert Path(got["cache"]) == Path.home() / ".cache" / "bitnet_jax"

  namespace = {}
  exec(COUNTS, namespace)  # pylint: disable=exec-used
  counts = namespace["tiny_counts"]()
  assert counts.sum() > 0
  np.testing.assert_array_equal(np.load(work / "counts.npy"), counts)
  ok, why = spike_conv.available()
  assert got["kernel"] == [ok, why]
  if ok:  # the installed source built (or found) the kernel, in the default cache
    assert any(name.startswith("spike_conv-") for name in got["cached"]), got

  metadata = _run([python, "-c", "import importlib.metadata as m; "
                   "print('\\n'.join(m.requires('bitnet-jax')))"], cwd=work)
  declared = {str(req) for req in read_requirements(ROOT / "requirements.txt").values()}
  installed = {line for line in metadata.splitlines() if "extra ==" not in line}
  assert {str(Requirement(line)) for line in installed} == declared

  _pip_install(python, "-e", src)
  got = json.loads(_run([python, "-c", WHERE], cwd=work).splitlines()[-1])
  assert Path(got["file"]) == src / "bitnet_jax" / "__init__.py"
