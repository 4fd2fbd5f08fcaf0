"""The one error type a user sees.

Every check on user input (config, data files, mesh shapes) raises `UserError` with a single line that
names the fix. The CLI prints it as ``error: <message>`` and exits with status 2, before anything is
compiled or written.
"""


class UserError(ValueError):
    """Bad input from the user: a config value, a data file, a device request. One line, names the fix."""

    exit_code = 2

    def __init__(self, message: str):
        if "\n" in message:
            raise AssertionError(f"UserError messages are one line, got: {message!r}")
        super().__init__(message)


class TrainingStopped(RuntimeError):
    """The run stopped itself: a NaN or Inf loss. One line naming the step, the last good checkpoint
    and the fix; the CLI exits with status 3."""

    exit_code = 3

    def __init__(self, message: str):
        if "\n" in message:
            raise AssertionError(f"TrainingStopped messages are one line, got: {message!r}")
        super().__init__(message)
