"""Trains the seed's ReLU "Baseline" (the twin) of any config and sets it beside the BITnet.

  python -m bitnet_jax.cli.twin --config configs/fashion_mnist.py
  python -m bitnet_jax.cli.twin --config configs/quickstart.py --workdir DIR --bitnet_workdir DIR

The twin (`twin.py`) is the config's own architecture with ReLU and softmax cross-entropy, trained
by the same loop, data, optimizer, schedule and logging (`config.neuron = "relu"`; every other
`--config.<field>` override applies as in train.py). Its workdir defaults to
workdirs/<config name>_relu and resumes like any run. At the end the command prints the test top-1
of both runs at each validation, from their metrics.jsonl; the BITnet's workdir (default
workdirs/<config name>, i.e. where `python train.py --config ...` trains) may be missing, and
then only the twin's column is filled.
"""

import json
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from bitnet_jax import errors
from bitnet_jax.cli import runner

def validation_top1(workdir: str) -> dict[float, float]:
  """{epoch: test top-1} of a run's validations, from its metrics.jsonl ({} if it has none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {round(r["epoch"], 2): r["top1"] for r in records if r.get("kind") == "eval"}


def side_by_side(twin_workdir: str, bitnet_workdir: str) -> str:
  """A Markdown table of test top-1 per validated epoch: the ReLU twin beside the BITnet."""
  relu, bitnet = validation_top1(twin_workdir), validation_top1(bitnet_workdir)
  rows = ["| epoch | ReLU twin top-1 | BITnet top-1 | BITnet - twin |", "|---:|---:|---:|---:|"]
  for epoch in sorted(relu.keys() | bitnet.keys()):
    a, b = relu.get(epoch), bitnet.get(epoch)
    gap = "" if a is None or b is None else f"{100 * (b - a):+.2f}"
    rows.append(f"| {epoch:g} | {_percent(a)} | {_percent(b)} | {gap} |")
  return "\n".join(rows)


def _percent(value: float | None) -> str:
  return "" if value is None else f"{100 * value:.2f} %"


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
  logging.set_verbosity(logging.WARNING)
  from bitnet_jax import trainer  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  with config.unlocked():
    config.neuron = "relu"
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("workdirs", f"{name}_relu")
  bitnet_workdir = _BITNET.value or os.path.join("workdirs", name)
  result = trainer.train_and_evaluate(config, workdir)
  if result.get("preempted"):
    return
  print(f"ReLU twin: {workdir}; BITnet: {bitnet_workdir}"
        + ("" if os.path.isdir(bitnet_workdir) else " (not trained yet)"))
  print(side_by_side(workdir, bitnet_workdir))


if __name__ == "__main__":  # flags only when run: this module is also imported (tests)
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The twin's run directory; default "
                                 "workdirs/<config name>_relu.")
  _BITNET = flags.DEFINE_string("bitnet_workdir", None, "The BITnet run to compare with; default "
                                "workdirs/<config name>.")
  flags.mark_flags_as_required(["config"])
  runner.run(main, _CONFIG)
