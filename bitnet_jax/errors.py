"""The expected mistakes: errors whose message says what was expected, what was found, and what to
do, so that a command-line entry point prints them as one line (`error: ...`) without a traceback.

Each is also the built-in exception it refines (ValueError, FileNotFoundError), so library
callers can catch either. Anything else that escapes is a bug, and keeps its traceback.
"""


class UserError(Exception):
  """An expected mistake in the input; `exit_code` is what a command exits with."""
  exit_code = 1

  def __init__(self, message: str, hint: str | None = None):
    super().__init__(message)
    self.hint = hint  # an optional second line, e.g. "did you mean --config.batch_size?"


class UsageError(UserError):
  """A command used wrongly: an unknown or invalid flag, a missing argument (exit status 2)."""
  exit_code = 2


class ConfigError(UsageError, ValueError):
  """An invalid config field or flag value: a usage error (exit status 2)."""


class DataError(UserError, ValueError):
  """Data that is there but wrong: a bad file, shape, dtype or label."""


class DataNotFound(UserError, FileNotFoundError):
  """Data that is not where the config says (a missing folder, file or TFDS preparation)."""


class CheckpointError(UserError, FileNotFoundError):
  """A missing workdir or checkpoint, or a checkpoint that cannot be read."""
