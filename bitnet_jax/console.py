"""What a training run prints: its header in words, and progress and messages that never collide.

In a terminal, a tqdm progress bar shows the loss, training accuracy and images/s, and every
message (validations, warnings, the signal's) is written through the bar, so it is never glued to
it. When stdout is not a terminal (a log file, SLURM, Colab's captured output), the bar's
carriage-return redraws would pile up, so plain timestamped lines are printed every `log_every`
steps instead. Only process 0 prints.
"""

import sys
import time

import jax

from bitnet_jax import models


def describe_model(module, n_params: int, relu_twin: bool = False) -> str:
  """e.g. "BITnet6, fs 0.25 (16/32/64/128 channels), 10 classes, 32x32x1 images | 119,962
  parameters"."""
  widths = "/".join(str(c) for c in models.channels(module.fs))
  name = type(module).__name__
  size = f"{module.img_size}x{module.img_size}x{module.in_channels}"
  return (f"{'ReLU twin of ' if relu_twin else ''}{name}, fs {module.fs:g} ({widths} channels), "
          f"{module.num_classes} classes, {size} images | {n_params:,} parameters")


class Console:
  """Progress and messages of one run (process 0 only).

  Args:
    total: the step the run ends at.
    initial: the step it starts from.
    tty: whether stdout is a terminal (default: asked); False prints log lines instead of a bar.
  """

  def __init__(self, total: int, initial: int, tty: bool | None = None):
    self.enabled = jax.process_index() == 0
    self.total = total
    self.tty = sys.stdout.isatty() if tty is None else tty
    self.bar = None
    if self.enabled and self.tty:
      try:
        from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
      except ImportError:
        self.bar = None

  def print(self, message: str):
    """One line, above the bar when there is one."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(message)
    else:
      print(message, flush=True)

  def step(self, step: int, values: dict | None, epoch: float):
    """Advances the bar to `step`; `values` (the window's mean metrics) when a log line is due."""
    if not self.enabled:
      return
    if self.bar is not None:
      if values is not None:
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                             img_s=f"{values['images_per_s']:.0f}", refresh=False)
      self.bar.update(step - self.bar.n)
    elif values is not None:
      stamp = time.strftime("%Y-%m-%d %H:%M:%S")
      self.print(f"{stamp} step {step}/{self.total} (epoch {epoch:.2f}) | loss "
                 f"{values['loss']:.4f} | train top-1 {100 * values['accuracy']:.1f} % | "
                 f"{values['images_per_s']:.0f} images/s")

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
