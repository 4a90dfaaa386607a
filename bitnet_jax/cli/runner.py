"""What every command shares: flags that turn mistakes into one line, and the multi-process flags.

`run(main, config_flag)` is `absl.app.run(main)`, except that an expected mistake (a mistyped
flag or config field, a missing config file, an invalid value, a missing workdir or data: any
`errors.UserError`) prints

    error: <what, where, what to do>
    <an optional hint, e.g. "did you mean --config.batch_size?">

on stderr and exits with status 2 (a usage error) or 1 (anything else), without a traceback.
`--verbose`, or the environment variable BITNET_JAX_VERBOSE=1, shows the traceback too.
Unexpected exceptions (bugs) always keep their traceback.
"""

import asyncio
import difflib
import functools
import logging
import os
import re
import sys

from absl import app
from absl import flags

from bitnet_jax import distributed
from bitnet_jax import errors

VERBOSE_ENV = "BITNET_JAX_VERBOSE"
VERBOSE_HELP = (f"Show the full traceback of expected errors too (or set {VERBOSE_ENV}=1); "
                "unexpected errors always show it.")


def run(main, config_flag=None):
  """Runs `main(argv)` as `absl.app.run` does, with one-line errors (see the module docstring).

  Args:
    main: the command's main.
    config_flag: the `config_flags.DEFINE_config_file` holder, whose file is loaded (and whose
      overrides are applied) while the flags are parsed, so its mistakes are usage errors.
  """
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
  _quiet_abandoned_reads()
  app.run(_guarded(main), flags_parser=functools.partial(_parse, config_flag))


def verbose() -> bool:
  env = os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")
  return env or "--verbose" in sys.argv or (flags.FLAGS.is_parsed() and flags.FLAGS.verbose)


def fail(message: str, hint: str | None = None, exit_code: int = 1):
  """Prints `error: message` (and the hint) on stderr and exits with `exit_code`."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr)
  if hint:
    print(hint, file=sys.stderr)
  sys.stderr.flush()
  sys.exit(exit_code)


def _guarded(main):
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if verbose():
        raise
      fail(str(e), e.hint, e.exit_code)
  return wrapped


def _parse(config_flag, argv):
  """absl's flag parsing; a mistake becomes a one-line usage error (exit status 2)."""
  try:
    rest = flags.FLAGS(argv)
    if config_flag is not None and config_flag.value is not None:
      config_flag.value.keys()  # a config file that failed to load raises here
    return rest
  except Exception as e:  # pylint: disable=broad-except; every parse failure is a usage error
    if verbose():
      raise
    message, hint = _usage_message(e, argv)
    fail(message, hint, exit_code=2)


def _chain(e: BaseException):
  """`e` and its causes / contexts, outermost first."""
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _usage_message(e: Exception, argv) -> tuple[str, str | None]:
  """(message, hint) for a flag-parsing failure, naming what the user typed."""
  chain = list(_chain(e))
  text = "\n".join(str(x) for x in chain)
  config_arg = next((a for a in argv[1:] if a.startswith("--config=") or a == "--config"), None)
  if config_arg is not None:
    i = argv.index(config_arg)
    path = (config_arg.split("=", 1)[1] if "=" in config_arg
            else argv[i + 1] if i + 1 < len(argv) else "")
  else:
    path = ""
  if "Failed loading config file" in text or "Configuration is not available" in text:
    if path and not os.path.isfile(path):
      folder = os.path.dirname(path) or "."
      names = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
          folder) else []
      close = difflib.get_close_matches(os.path.basename(path), names, n=1)
      hint = (f"did you mean --config {os.path.join(os.path.dirname(path), close[0])}?" if close
              else f"the configs are in configs/: {', '.join(names)}" if names else None)
      return f"--config {path}: no such config file", hint
    cause = chain[-1]
    return f"--config {path}: the config file failed to load: {type(cause).__name__}: {cause}", None
  if "--config must have a value" in text:
    return "--config is required: a config file, e.g. --config configs/quickstart.py", None
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    right, wrong = suggestion.groups()
    typed = next((a.split("=", 1)[0] for a in argv[1:]
                  if a.startswith("--config.") and a.split("=", 1)[0].endswith("." + wrong)),
                 f"--config.{wrong}")
    return (f"{typed}: {path or 'the config'} has no field {wrong!r} (configs/default.py lists "
            "every field)", f"did you mean {typed[:-len(wrong)]}{right}?")
  missing = re.search(r"""KeyError: ["']?'?([\w.]+)""", text) or re.search(
      r"""has no attribute '?(\w+)'?""", text)
  if isinstance(chain[-1], (KeyError, AttributeError)) and missing:
    name = missing.group(1)
    typed = next((a.split("=", 1)[0] for a in argv[1:]
                  if a.startswith("--config.") and a.split("=", 1)[0].endswith("." + name)),
                 f"--config.{name}")
    return (f"{typed}: {path or 'the config'} has no field {name!r} (configs/default.py lists "
            "every field)", None)
  lines = str(e).strip().splitlines()  # absl's own messages name the flag: "flag --x=y: ..."
  message = lines[-1] if lines else type(e).__name__
  return (message[len("flag "):] if message.startswith("flag --") else message), None


def _quiet_abandoned_reads():
  """Keeps the abandoned reads of a damaged checkpoint from printing pages of tracebacks.

  When one array of a damaged checkpoint fails to read (the trainer then names the step and
  resumes from an older one), orbax closes its event loop while the reads of the other arrays
  are still in flight. Later, (1) each finished tensorstore read calls
  `loop.call_soon_threadsafe` on the closed loop, and tensorstore prints the
  RuntimeError("Event loop is closed") with its traceback; (2) the abandoned coroutines and
  tasks, when collected, print "Exception ignored in: <coroutine ...>" or "Task exception was
  never retrieved", each with a ~60-line TensorStore spec. None of these callbacks can run and
  the failure is already reported, so they are dropped. Done for the commands only: the library
  leaves asyncio alone.
  """
  base = asyncio.BaseEventLoop
  if getattr(base.call_soon_threadsafe, "_bitnet_quiet", False):
    return
  original = base.call_soon_threadsafe

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None
    return original(self, callback, *args, context=context)

  call_soon_threadsafe._bitnet_quiet = True  # pylint: disable=protected-access
  base.call_soon_threadsafe = call_soon_threadsafe

  previous_hook = sys.unraisablehook

  def unraisablehook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    previous_hook(unraisable)

  sys.unraisablehook = unraisablehook
  logging.getLogger("asyncio").addFilter(
      lambda record: not ("never retrieved" in record.getMessage()
                          and "orbax" in record.getMessage()))


# ------------------------------------------------------------------------------------------
# Multi-process flags (train.py, eval.py).


def define_distributed_flags() -> None:
  """Defines --distributed, --coordinator_address, --num_processes, --process_id and
  --distributed_timeout_s (call once, at module level)."""
  flags.DEFINE_bool("distributed", False, "Join a multi-process job (jax.distributed), found "
                    "from the scheduler (SLURM, Cloud TPU, ...) or the three flags below.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                      "without a scheduler).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
  flags.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for the other processes "
                       "(connect, heartbeat, exit).")


def initialize_distributed() -> None:
  """`distributed.initialize` with the flags of `define_distributed_flags`, when any of them
  asks for a job."""
  f = flags.FLAGS
  if f.distributed or f.coordinator_address or f.num_processes is not None or (
      f.process_id is not None):
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           f.distributed_timeout_s)
