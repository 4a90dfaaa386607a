"""Evaluates a BITnet on the whole test split.

  python eval.py --config configs/cifar100.py --workdir DIR [--steps 200]
  python eval.py --config configs/cifar10.py --torch_checkpoint cifar10.ckpt   # the release's
  python eval.py ... --sweep 10,50,100,200 --sparsity --score potential --json out.json

Thin entry point: the logic lives in `bitnet_jax.evaluate`.
  --steps N            time steps T (shorthand for --config.eval_time_steps=N; wins over it)
  --which best|latest  which checkpoint of the workdir (default: best, else latest)
  --checkpoint_step K  a specific step of workdir/checkpoints
  --torch_checkpoint   a .ckpt of the original PyTorch release (no PyTorch needed); its "auto"
                       compute settings resolve to float32 at matmul precision "highest" on
                       every platform (the release's spikes), where a workdir's evaluation uses
                       the platform's fast path (README, "Defaults: auto")
  --sweep 10,50,200    top-1 at several step counts, from ONE run to the largest; table, JSON
                       and a PNG plot (--plot, default sweep.png beside --json or in the workdir)
  --sparsity           the seed's table: % zeros of each layer's spike output
  --score count|potential  argmax of counts (the release, first maximum on ties) or counts +
                       final membrane potential (breaks ties)
  --distributed, or --coordinator_address H:P --num_processes N --process_id I
                       a multi-process evaluation (as in train.py): every process runs the same
                       command; the test split is split over all processes' devices, process 0
                       prints and writes --json/--plot
  --verbose            expected errors print one line (`error: ...`, exit status 2 for usage, 1
                       otherwise); --verbose (or BITNET_JAX_VERBOSE=1) shows their traceback
"""

import json
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from bitnet_jax import errors
from bitnet_jax.cli import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding orbax checkpoints.")
_STEPS = flags.DEFINE_integer("steps", None, "Time steps T (overrides config.eval_time_steps).")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of the workdir.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Evaluate this step of the workdir.")
_TORCH = flags.DEFINE_string("torch_checkpoint", None, "A .ckpt of the original release, "
                             "evaluated in float32 at matmul precision highest on every platform "
                             "unless the config sets compute_dtype/matmul_precision explicitly.")
_SWEEP = flags.DEFINE_list("sweep", [], "Step counts for an accuracy-vs-steps sweep.")
_SPARSITY = flags.DEFINE_bool("sparsity", False, "Print the per-layer sparsity table.")
_SCORE = flags.DEFINE_enum("score", "count", ["count", "potential"], "How classes are scored.")
_JSON = flags.DEFINE_string("json", None, "Write the metrics to this JSON file.")
_PLOT = flags.DEFINE_string("plot", None, "PNG path of the sweep plot.")
runner.define_distributed_flags()  # --distributed, --coordinator_address, ...


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags start with --)")
  if not (_WORKDIR.value or _TORCH.value):
    raise errors.UsageError("give --workdir (a training run) or --torch_checkpoint (a .ckpt)")
  try:
    sweep = tuple(int(s) for s in _SWEEP.value)
  except ValueError:
    raise errors.UsageError(f"--sweep takes integers >= 1, e.g. 10,50,200; got "
                            f"{','.join(_SWEEP.value)}") from None
  for name, value in (("--steps", _STEPS.value), ("--sweep", min(sweep, default=None))):
    if value is not None and value < 1:
      raise errors.UsageError(f"{name} must be >= 1, got {value}")
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  from bitnet_jax import evaluate, plots  # pylint: disable=import-outside-toplevel
  runner.initialize_distributed()
  config = _CONFIG.value
  if _STEPS.value is not None:
    with config.unlocked():
      config.eval_time_steps = _STEPS.value
  result = evaluate.run_evaluation(
      config, workdir=None if _TORCH.value else _WORKDIR.value, which=_WHICH.value,
      checkpoint_step=_STEP.value, torch_ckpt=_TORCH.value, sweep=sweep,
      score=_SCORE.value)
  if jax.process_index() != 0:  # every process computed the same result; one reports it
    return
  print(f"{result['dataset']}: {result['n']} test images, T={result['time_steps']}, "
        f"score={result['score']} | top-1 {100 * result['top1']:.2f}% | "
        f"top-5 {100 * result['top5']:.2f}% | loss {result['loss']:.4f} | "
        f"ties decided {100 * result['tie_rate']:.2f}% of predictions | {result['checkpoint']}")
  if sweep:
    print(evaluate.sweep_table(result))
    plot = _PLOT.value or os.path.join(
        os.path.dirname(_JSON.value) if _JSON.value else (_WORKDIR.value or "."), "sweep.png")
    plots.plot_sweep(result, plot)
    print(f"plot: {plot}")
  if _SPARSITY.value:
    print(evaluate.sparsity_table(result, f"{result['dataset']} - {config.variant} fs={config.fs}"))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  runner.run(main, _CONFIG)
