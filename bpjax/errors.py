"""The errors a user sees: each one line that names the fix.

Every check on user input (config, data files, mesh shapes) raises `UserError`; the CLI prints it as
``error: <message>`` and exits with status 2, before anything is compiled or written. A run that stops
itself on a NaN or Inf loss raises `TrainingStopped` (status 3).
"""


class OneLineError(Exception):
    """An error whose message is one line, printed as ``error: ...``; the CLI exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str):
        if "\n" in message:
            raise AssertionError(f"{type(self).__name__} messages are one line, got: {message!r}")
        super().__init__(message)


class UserError(OneLineError, ValueError):
    """Bad input from the user: a config value, a data file, a device request. One line, names the fix."""

    exit_code = 2


class TrainingStopped(OneLineError, RuntimeError):
    """The run stopped itself: a NaN or Inf loss. One line naming the step, the last good checkpoint
    and the fix; the CLI exits with status 3."""

    exit_code = 3
